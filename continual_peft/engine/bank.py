"""The ModuleBank: every task's module on one frozen backbone, addressed by slot index.

Slots are numbered in the order they were opened, and each has a module kind (LoRA, adapter,
prompt, ...); kinds can be mixed in one bank. At most one slot is trainable at a time (the newest,
or a released slot reopened); all others are frozen. Under a slot budget (`engine.budget`) a slot
whose task moved to another is `release`d, and the next `add_slot` reopens that index instead of
appending one. Which slot each row uses is set with a context manager:

    with bank.route(indices, weights):   # per-row slots, (B,) or (B, k), mixed in ONE forward
        ...
    with bank.use_slot(3):               # every row on slot 3
        ...
    with bank.use_slots([0, 1, 3]):      # every row on slots 0, 1 and 3 (weights 1: summed)
        ...
    with bank.base_only():               # the bare backbone (frozen features)
        ...

Each kind keeps its own stacks and its own `Routing`; the bank translates global slot ids into
each kind's local ids, giving -1 (no module) to rows whose slot is of another kind. It does so
once per forward, on the CPU, and sends the result to the device in one copy per kind: the
sites inside the forward never synchronise with the host. A kind's local ids are a permutation of
0..n-1 whose trainable slot, if any, is always the newest row of the kind's stacks (the sites
train only that row), which is why a reopened slot's row moves to the end of its kind's stacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from continual_peft.backbones.text import Backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import MODULE_KINDS, Routing


class ModuleBank:
    """All slots on `backbone`, injected into it in place.

    Args:
        backbone: The frozen backbone; target layers get wrapped.
        kind: The default module kind for new slots (see `MODULE_KINDS.names()`).
        config: That kind's config dataclass; its defaults when None.
        configs: Configs of other kinds that slots may use (defaults for any not given).
    """

    def __init__(
        self,
        backbone: Backbone,
        kind: str = "lora",
        config: object | None = None,
        configs: dict[str, object] | None = None,
    ) -> None:
        self.backbone = backbone
        self.kind = kind
        self.configs = dict(configs or {})
        if config is not None:
            self.configs[kind] = config
        self.kind_sites: dict[str, dict[str, nn.Module]] = {}
        self.routings: dict[str, Routing] = {}
        self.slot_kinds: list[str] = []  # kind of each global slot
        self.slot_local: list[int] = []  # index of each global slot within its kind's stacks
        self.slot_scale: list[float] = []  # each slot's fixed scale (1 for kinds without one)
        self.training_slot: int | None = None  # the trainable slot's index, if one is open
        self.released: list[int] = []  # slots `add_slot` reopens before appending (a budget)
        self._inject(kind)

    @property
    def config(self) -> object:
        """The default kind's config."""
        return self.configs[self.kind]

    @property
    def sites(self) -> dict[str, nn.Module]:
        """The default kind's injected sites, by wrapped layer name."""
        return self.kind_sites[self.kind]

    @property
    def num_slots(self) -> int:
        return len(self.slot_kinds)

    @property
    def has_trainable(self) -> bool:
        return self.training_slot is not None

    def _inject(self, kind: str) -> dict[str, nn.Module]:
        if kind not in self.kind_sites:
            config = self.configs.setdefault(kind, MODULE_KINDS.options_type(kind)())
            self.routings[kind] = Routing()
            built = MODULE_KINDS.build(kind, dataclasses.asdict(config), "module kind")
            sites = built.inject(self.backbone, self.routings[kind])
            for site in sites.values():
                site.train(self.backbone.training)  # a new module starts in train mode
            self.kind_sites[kind] = sites
        return self.kind_sites[kind]

    def add_slot(self, seed: int, kind: str | None = None) -> int:
        """Open a trainable slot of `kind` (default kind if None), initialised from `seed`:
        the lowest released slot reopened, else a new one; returns its index."""
        if self.has_trainable:
            raise RuntimeError("freeze the trainable slot before opening another")
        kind = kind or self.kind
        sites = self._inject(kind)
        slot = min(self.released) if self.released else None
        if slot is not None:
            self._remove_row(slot)
            self.released.remove(slot)
        generator = self.backbone.placement.generator(seed)  # drawn on the CPU, then moved
        for site in sites.values():
            site.add_slot(generator)
        slot = self._append(kind) if slot is None else self._place(slot, kind)
        self.training_slot = slot
        return slot

    def release(self, slot: int) -> None:
        """Mark frozen `slot` free: no task uses it any more, and the next `add_slot` reopens
        it (its values stay until then)."""
        self._check_slot(slot)
        if slot == self.training_slot:
            raise ContinualPeftError(f"slot {slot} is training: only a frozen slot is released")
        if slot not in self.released:
            self.released.append(slot)

    def replace_slot(self, slot: int, state: dict[str, torch.Tensor], kind: str) -> None:
        """Put `slot_state`-shaped frozen values of `kind` into `slot`, whatever it holds now,
        trainable or not, and unrelease it: how a failed task's undo gives back a slot that a
        budget released and reopened.

        Raises:
            RuntimeError: another slot is training.
        """
        self._check_slot(slot)
        if self.has_trainable and slot != self.training_slot:
            raise RuntimeError("cannot replace a slot while another one is being trained")
        self._remove_row(slot)  # a trainable slot's row is its kind's newest
        self.training_slot = None
        for name, site in self._inject(kind).items():
            prefix = name + "."
            site.load_slot({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self._place(slot, kind)
        if slot in self.released:
            self.released.remove(slot)

    def freeze_slot(self) -> None:
        """Freeze the trainable slot; its tensors never change after this."""
        for site in self.kind_sites[self.slot_kinds[self.training_slot]].values():
            site.freeze_slot()
        self.training_slot = None

    def truncate(self, num_slots: int) -> None:
        """Drop every slot from index `num_slots` on, newest first (a failed task's rollback)."""
        while self.num_slots > num_slots:
            slot = self.num_slots - 1
            self._remove_row(slot)
            self.slot_kinds.pop()
            self.slot_local.pop()
            self.slot_scale.pop()
            if self.training_slot == slot:
                self.training_slot = None
            if slot in self.released:
                self.released.remove(slot)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.has_trainable:
            return []
        sites = self.kind_sites[self.slot_kinds[self.training_slot]].values()
        return [p for site in sites for p in site.trainable_parameters()]

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's tensors, keyed `<site>.<tensor>`, for safetensors."""
        self._check_slot(slot)
        sites, local = self.kind_sites[self.slot_kinds[slot]], self.slot_local[slot]
        return {
            f"{name}.{key}": tensor
            for name, site in sites.items()
            for key, tensor in site.slot_tensors(local).items()
        }

    def load_slot(
        self, state: dict[str, torch.Tensor], kind: str | None = None, trainable: bool = False
    ) -> int:
        """Append a slot of `kind` from `slot_state` output, frozen unless `trainable` (a shared
        slot that later tasks keep training); returns its index."""
        if self.has_trainable:
            raise RuntimeError("cannot load a slot while one is being trained")
        kind = kind or self.kind
        for name, site in self._inject(kind).items():
            prefix = name + "."
            tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            site.load_slot(tensors, trainable=trainable)
        slot = self._append(kind)
        self.training_slot = slot if trainable else None
        return slot

    def overwrite_slot(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Replace frozen `slot`'s values with `slot_state`-shaped `state` (a merged slot that
        is rebuilt after every task); its kind and index stay.

        Raises:
            ContinualPeftError: no such slot, or it is the one training.
        """
        self._check_slot(slot)
        if slot == self.training_slot:
            raise ContinualPeftError(f"slot {slot} is training: only a frozen slot is replaced")
        kind, local = self.slot_kinds[slot], self.slot_local[slot]
        for name, site in self.kind_sites[kind].items():
            prefix = name + "."
            site.overwrite_slot(
                local, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        scale = state.get(next(iter(self.kind_sites[kind])) + ".scale")
        self.slot_scale[slot] = 1.0 if scale is None else float(scale)

    def _append(self, kind: str) -> int:
        """Register the slot just opened or loaded in `kind`'s stacks; returns its index."""
        self.slot_kinds.append(kind)
        self.slot_local.append(-1)
        self.slot_scale.append(1.0)
        return self._place(self.num_slots - 1, kind)

    def _place(self, slot: int, kind: str) -> int:
        """Make `slot` the row just opened or loaded at the end of `kind`'s stacks (its local
        id, the kind's count of other slots); returns `slot`."""
        local = sum(1 for s, k in enumerate(self.slot_kinds) if k == kind and s != slot)
        first = next(iter(self.kind_sites[kind].values()))
        scale = first.slot_tensors(local).get("scale")  # LoRA: alpha / r; adapters: 1
        self.slot_kinds[slot], self.slot_local[slot] = kind, local
        self.slot_scale[slot] = 1.0 if scale is None else float(scale)
        return slot

    def _remove_row(self, slot: int) -> None:
        """Take `slot`'s row out of its kind's stacks, keeping the other slots' values: the
        kind's newest row moves into its place (its slot's local id follows), then the newest
        row is dropped. `slot` keeps its index and must be placed again (`_place`)."""
        kind, local = self.slot_kinds[slot], self.slot_local[slot]
        sites = self.kind_sites[kind]
        newest = self.slot_kinds.count(kind) - 1
        if local != newest:
            training = self.training_slot
            # the sites train only their newest row: a trainable one cannot move
            assert training is None or self.slot_kinds[training] != kind, "moving a training row"
            moved = next(
                s
                for s, k in enumerate(self.slot_kinds)
                if k == kind and self.slot_local[s] == newest
            )
            for site in sites.values():
                site.overwrite_slot(local, site.slot_tensors(newest))
            self.slot_local[moved] = local
        for site in sites.values():
            site.drop_newest_slot()
        self.slot_local[slot] = -1
        self.slot_kinds[slot] = ""  # counted in no kind until placed again

    @contextlib.contextmanager
    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> Iterator[None]:
        """Rows use per-row slots: `indices` (B,) or (B, k), -1 for none; `weights` like it."""
        # resolved on the CPU (free when the caller's tensors are there already), then sent
        indices = indices.to("cpu", torch.long)
        if indices.dim() == 1:
            indices = indices[:, None]
        if weights is None:
            weights = torch.ones(indices.shape, dtype=torch.float32, device="cpu")
        weights = weights.to("cpu", torch.float32).reshape(indices.shape)
        if indices.numel() and int(indices.max()) >= self.num_slots:
            raise ContinualPeftError(
                f"slot {int(indices.max())} does not exist ({self.num_slots} slots)"
            )
        if _one_slot(indices, weights):
            # every row on one slot at weight 1: the cheaper unbatched path gives the same result
            with self.use_slot(int(indices[0, 0])):
                yield
            return
        with self._set(self._per_kind(indices, weights)):
            yield

    @contextlib.contextmanager
    def use_slot(self, slot: int) -> Iterator[None]:
        """Every row on `slot` with weight 1."""
        self._check_slot(slot)
        kind = self.slot_kinds[slot]
        with self._set({kind: Routing(single=self.slot_local[slot])}):
            yield

    @contextlib.contextmanager
    def use_slots(self, slots: list[int], weights: list[float] | None = None) -> Iterator[None]:
        """Every row on the same mix of `slots` with `weights` (1 each when None).

        One slot at weight 1 is exactly `use_slot`; otherwise the (1, k) routing is shared by
        every row of whatever batch runs inside, so the batch size need not be known.
        """
        if weights is None:
            weights = [1.0] * len(slots)
        if not slots or len(weights) != len(slots):
            raise ContinualPeftError(
                f"use_slots needs one weight per slot and at least one slot; got slots {slots} "
                f"and weights {weights}"
            )
        for slot in slots:
            self._check_slot(slot)
        if len(slots) == 1 and weights[0] == 1:
            with self.use_slot(slots[0]):
                yield
            return
        indices = torch.tensor([slots], dtype=torch.long, device="cpu")  # (1, k)
        mix = torch.tensor([weights], dtype=torch.float32, device="cpu")  # (1, k)
        with self._set(self._per_kind(indices, mix)):
            yield

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """No module at all: the frozen backbone's own output."""
        with self._set({}):
            yield

    def _per_kind(self, indices: torch.Tensor, weights: torch.Tensor) -> dict[str, Routing]:
        """Each kind's resolved `Routing` of CPU `indices`/`weights` (B, k): global slot ids
        become the kind's local ids (-1 where another kind's), scales are folded into the
        weights, and the result goes to the backbone's device in one copy per tensor."""
        safe = indices.clamp(min=0)
        kinds = list(self.kind_sites)
        kind_of = torch.tensor([kinds.index(k) for k in self.slot_kinds], device="cpu")
        local_of = torch.tensor(self.slot_local, dtype=torch.long, device="cpu")
        scale_of = torch.tensor(self.slot_scale, dtype=torch.float32, device="cpu")
        put = self.backbone.placement.put
        routings = {}
        for number, kind in enumerate(kinds):
            mine = (indices >= 0) & (kind_of[safe] == number)
            if bool(mine.any()):  # a kind no row uses costs nothing
                local = torch.where(mine, local_of[safe], torch.full_like(indices, -1))
                resolved = Routing.rows(local, torch.where(mine, weights, 0.0), scale_of[safe])
                routings[kind] = Routing(
                    indices=put(resolved.indices), weights=put(resolved.weights)
                )
        return routings

    @contextlib.contextmanager
    def _set(self, routings: dict[str, Routing]) -> Iterator[None]:
        saved = {k: (r.indices, r.weights, r.single) for k, r in self.routings.items()}
        for kind, routing in self.routings.items():
            new = routings.get(kind, Routing())
            routing.indices, routing.weights, routing.single = new.indices, new.weights, new.single
            routing.derived = {}
        try:
            yield
        finally:
            for kind, (indices, weights, single) in saved.items():
                routing = self.routings[kind]
                routing.indices, routing.weights, routing.single = indices, weights, single
                routing.derived = {}

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
