"""The ModuleBank: every task's module on one frozen backbone, addressed by slot index.

Slots are numbered in the order they were opened. At most one slot is trainable at a time (the
newest); all others are frozen. Which slot each row uses is set with a context manager:

    with bank.route(indices, weights):   # per-row slots, (B,) or (B, k), mixed in ONE forward
        ...
    with bank.use_slot(3):               # every row on slot 3
        ...
    with bank.base_only():               # the bare backbone (frozen features)
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from continual_peft.backbone import Backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import MODULE_KINDS, Routing


class ModuleBank:
    """All slots of one module kind, injected into `backbone` in place.

    Args:
        backbone: The frozen backbone; its target layers get wrapped.
        kind: A registered module kind (see `MODULE_KINDS.names()`).
        config: That kind's config dataclass; its defaults when None.
    """

    def __init__(
        self, backbone: Backbone, kind: str = "lora", config: object | None = None
    ) -> None:
        kind_class = MODULE_KINDS.get(kind)
        self.kind = kind
        self.config = config if config is not None else kind_class.config_class()
        self.routing = Routing()
        self.sites: dict[str, nn.Module] = kind_class(self.config).inject(
            backbone.model, self.routing
        )
        self.num_frozen = 0
        self.has_trainable = False

    @property
    def num_slots(self) -> int:
        return self.num_frozen + int(self.has_trainable)

    def add_slot(self, seed: int) -> int:
        """Open a new trainable slot (initialised from `seed`) and return its index."""
        if self.has_trainable:
            raise RuntimeError("freeze the trainable slot before opening another")
        generator = torch.Generator().manual_seed(seed)
        for site in self.sites.values():
            site.add_slot(generator)
        self.has_trainable = True
        return self.num_frozen

    def freeze_slot(self) -> None:
        """Freeze the trainable slot; its tensors never change after this."""
        for site in self.sites.values():
            site.freeze_slot()
        self.has_trainable = False
        self.num_frozen += 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for site in self.sites.values() for p in site.trainable_parameters()]

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's tensors, keyed `<site>.<tensor>`, for safetensors."""
        self._check_slot(slot)
        return {
            f"{name}.{key}": tensor
            for name, site in self.sites.items()
            for key, tensor in site.slot_tensors(slot).items()
        }

    def load_slot(self, state: dict[str, torch.Tensor]) -> int:
        """Append a frozen slot from `slot_state` output; returns its index."""
        if self.has_trainable:
            raise RuntimeError("cannot load a frozen slot while one is being trained")
        for name, site in self.sites.items():
            prefix = name + "."
            site.load_slot({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self.num_frozen += 1
        return self.num_frozen - 1

    @contextlib.contextmanager
    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> Iterator[None]:
        """Rows use per-row slots: `indices` (B,) or (B, k), -1 for none; `weights` like it."""
        if indices.dim() == 1:
            indices = indices[:, None]
        if weights is None:
            weights = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        if indices.numel() and int(indices.max()) >= self.num_slots:
            raise ContinualPeftError(
                f"slot {int(indices.max())} does not exist ({self.num_slots} slots)"
            )
        if _one_slot(indices, weights):
            # every row on one slot at weight 1: the cheaper unbatched path gives the same result
            with self.use_slot(int(indices[0, 0])):
                yield
            return
        with self._set(Routing(indices=indices, weights=weights.to(torch.float32))):
            yield

    @contextlib.contextmanager
    def use_slot(self, slot: int) -> Iterator[None]:
        """Every row on `slot` with weight 1."""
        self._check_slot(slot)
        with self._set(Routing(single=slot)):
            yield

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """No module at all: the frozen backbone's own output."""
        with self._set(Routing()):
            yield

    @contextlib.contextmanager
    def _set(self, routing: Routing) -> Iterator[None]:
        saved = (self.routing.indices, self.routing.weights, self.routing.single)
        self.routing.indices, self.routing.weights, self.routing.single = (
            routing.indices,
            routing.weights,
            routing.single,
        )
        try:
            yield
        finally:
            self.routing.indices, self.routing.weights, self.routing.single = saved

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ContinualPeftError(f"slot {slot} does not exist ({self.num_slots} slots)")


def _one_slot(indices: torch.Tensor, weights: torch.Tensor) -> bool:
    return (
        indices.numel() > 0
        and indices.shape[1] == 1
        and int(indices[0, 0]) >= 0
        and bool((indices == indices[0, 0]).all())
        and bool((weights == 1).all())
    )
