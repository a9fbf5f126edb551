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

A hybrid slot holds several kinds at once (`"lora+prompt"`: `modules.kind_parts`); each part is
one row of its kind's stacks, so a hybrid slot and plain slots of its kinds share those stacks, and
each part keeps its own scale. A hybrid slot's state names every tensor `<kind>/<site>.<tensor>`
(two kinds may wrap the same layer); a plain slot's, `<site>.<tensor>`.

Each kind keeps its own stacks and its own `Routing`; the bank translates global slot ids into
each kind's local ids, giving -1 (no module) to rows whose slot has no part of that kind. It does so
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
from continual_peft.modules import HYBRID, MODULE_KINDS, Routing, kind_parts


class ModuleBank:
    """All slots on `backbone`, injected into it in place.

    Args:
        backbone: The frozen backbone; target layers get wrapped.
        kind: The default module kind for new slots (see `MODULE_KINDS.names()`), or a hybrid
            of several (`"lora+prompt"`).
        config: That kind's config dataclass; its defaults when None (a plain kind only).
        configs: Configs of the kinds that slots may use, by plain kind (defaults for any not
            given).
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
        self.kind_sites: dict[str, dict[str, nn.Module]] = {}  # plain kind -> its sites
        self.routings: dict[str, Routing] = {}  # plain kind -> its routing
        self.slot_kinds: list[str] = []  # kind of each global slot, as declared ("lora+prompt")
        # each slot's part kinds -> its index within that kind's stacks, in the declared order
        self.slot_parts: list[dict[str, int]] = []
        # each slot's part kinds -> the part's fixed scale (1 for kinds without one)
        self.slot_scale: list[dict[str, float]] = []
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # `_kind_tables`
        self.training_slot: int | None = None  # the trainable slot's index, if one is open
        self.released: list[int] = []  # slots `add_slot` reopens before appending (a budget)
        self._inject(kind)

    @property
    def config(self) -> object:
        """The default kind's config (a hybrid kind has one per part: `configs[part]`)."""
        parts = kind_parts(self.kind)
        if len(parts) > 1:
            raise ContinualPeftError(
                f"hybrid kind {self.kind!r} has one config per part: bank.configs[part] for "
                f"part in {list(parts)}"
            )
        return self.configs[self.kind]

    @property
    def sites(self) -> dict[str, nn.Module]:
        """The default kind's injected sites, by wrapped layer name (a hybrid kind's by
        `<part>/<layer>`, as its slot state names them)."""
        parts = kind_parts(self.kind)
        if len(parts) == 1:
            return self.kind_sites[self.kind]
        return {f"{part}/{name}": s for part in parts for name, s in self.kind_sites[part].items()}

    @property
    def num_slots(self) -> int:
        return len(self.slot_kinds)

    @property
    def has_trainable(self) -> bool:
        return self.training_slot is not None

    def local_slot(self, slot: int, kind: str) -> int:
        """`slot`'s row in the stacks of plain kind `kind` (one of its parts)."""
        self._check_slot(slot)
        return self.slot_parts[slot][kind]

    def _inject(self, kind: str) -> dict[str, dict[str, nn.Module]]:
        """The sites of each part of `kind`, by part, each part injected when first used."""
        parts = {}
        for part in kind_parts(kind, "module kind"):
            if part not in self.kind_sites:
                config = self.configs.setdefault(part, MODULE_KINDS.options_type(part)())
                self.routings[part] = Routing()
                built = MODULE_KINDS.build(part, dataclasses.asdict(config), "module kind")
                sites = built.inject(self.backbone, self.routings[part])
                for site in sites.values():
                    site.train(self.backbone.training)  # a new module starts in train mode
                self.kind_sites[part] = sites
            parts[part] = self.kind_sites[part]
        return parts

    def add_slot(self, seed: int, kind: str | None = None) -> int:
        """Open a trainable slot of `kind` (default kind if None), initialised from `seed`:
        the lowest released slot reopened, else a new one; returns its index."""
        if self.has_trainable:
            raise RuntimeError("freeze the trainable slot before opening another")
        kind = kind or self.kind
        parts = self._inject(kind)
        slot = min(self.released) if self.released else None
        if slot is not None:
            self._remove_row(slot)
            self.released.remove(slot)
        generator = self.backbone.placement.generator(seed)  # drawn on the CPU, then moved
        for sites in parts.values():  # a hybrid's parts in their declared order
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
        for part, sites in self._inject(kind).items():
            for name, site in sites.items():
                site.load_slot(_site_state(state, kind, part, name))
        self._place(slot, kind)
        if slot in self.released:
            self.released.remove(slot)

    def freeze_slot(self) -> None:
        """Freeze the trainable slot; its tensors never change after this."""
        for site in self._slot_sites(self.training_slot):
            site.freeze_slot()
        self.training_slot = None

    def truncate(self, num_slots: int) -> None:
        """Drop every slot from index `num_slots` on, newest first (a failed task's rollback)."""
        while self.num_slots > num_slots:
            slot = self.num_slots - 1
            self._remove_row(slot)
            self.slot_kinds.pop()
            self.slot_parts.pop()
            self.slot_scale.pop()
            if self.training_slot == slot:
                self.training_slot = None
            if slot in self.released:
                self.released.remove(slot)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.has_trainable:
            return []
        sites = self._slot_sites(self.training_slot)
        return [p for site in sites for p in site.trainable_parameters()]

    def _slot_sites(self, slot: int) -> list[nn.Module]:
        """Every site that holds a part of `slot`."""
        return [site for part in self.slot_parts[slot] for site in self.kind_sites[part].values()]

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's tensors, keyed `<site>.<tensor>` (a hybrid slot's `<kind>/<site>.<tensor>`),
        for safetensors."""
        self._check_slot(slot)
        parts = self.slot_parts[slot]
        return {
            f"{_part_prefix(self.slot_kinds[slot], part)}{name}.{key}": tensor
            for part, local in parts.items()
            for name, site in self.kind_sites[part].items()
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
        for part, sites in self._inject(kind).items():
            for name, site in sites.items():
                site.load_slot(_site_state(state, kind, part, name), trainable=trainable)
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
        kind = self.slot_kinds[slot]
        for part, local in self.slot_parts[slot].items():
            for name, site in self.kind_sites[part].items():
                site.overwrite_slot(local, _site_state(state, kind, part, name))
            self.slot_scale[slot][part] = self._scale(part, local)
        self._tables = None

    def _append(self, kind: str) -> int:
        """Register the slot just opened or loaded in its parts' stacks; returns its index."""
        self.slot_kinds.append(kind)
        self.slot_parts.append({})
        self.slot_scale.append({})
        return self._place(self.num_slots - 1, kind)

    def _place(self, slot: int, kind: str) -> int:
        """Make `slot` the row just opened or loaded at the end of each of its parts' stacks
        (its local id there, the part's count of other slots); returns `slot`."""
        parts, scales = {}, {}
        for part in kind_parts(kind):
            local = sum(1 for s, p in enumerate(self.slot_parts) if part in p and s != slot)
            parts[part], scales[part] = local, self._scale(part, local)
        self.slot_kinds[slot], self.slot_parts[slot], self.slot_scale[slot] = kind, parts, scales
        self._tables = None
        return slot

    def _scale(self, part: str, local: int) -> float:
        """The fixed scale of row `local` of kind `part` (LoRA: alpha / r; 1 for kinds without
        one)."""
        scale = next(iter(self.kind_sites[part].values())).slot_tensors(local).get("scale")
        return 1.0 if scale is None else float(scale)

    def _remove_row(self, slot: int) -> None:
        """Take each part of `slot` out of its kind's stacks, keeping the other slots' values:
        the kind's newest row moves into its place (its slot's local id follows), then the
        newest row is dropped. `slot` keeps its index and must be placed again (`_place`)."""
        for part, local in self.slot_parts[slot].items():
            sites = self.kind_sites[part]
            newest = sum(1 for p in self.slot_parts if part in p) - 1
            if local != newest:
                training = self.training_slot
                # the sites train only their newest row: a trainable one cannot move
                assert training is None or part not in self.slot_parts[training], "moving a row"
                moved = next(s for s, p in enumerate(self.slot_parts) if p.get(part) == newest)
                for site in sites.values():
                    site.overwrite_slot(local, site.slot_tensors(newest))
                self.slot_parts[moved][part] = local
            for site in sites.values():
                site.drop_newest_slot()
        self.slot_parts[slot], self.slot_scale[slot] = {}, {}
        self.slot_kinds[slot] = ""  # counted in no kind until placed again
        self._tables = None

    @contextlib.contextmanager
    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> Iterator[None]:
        """Rows use per-row slots: `indices` (B,) or (B, k), -1 for none (a batch of only -1
        runs the bare backbone); `weights` like it."""
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
        with self._set(
            {part: Routing(single=local) for part, local in self.slot_parts[slot].items()}
        ):
            yield

    @contextlib.contextmanager
    def use_slots(self, slots: list[int], weights: list[float] | None = None) -> Iterator[None]:
        """Every row on the same mix of `slots` with `weights` (1 each when None).

        One slot at weight 1 is exactly `use_slot`; no slot at all is `base_only` (a task with
        no slot of its own: `strategies.base.NO_SLOT`); otherwise the (1, k) routing is shared
        by every row of whatever batch runs inside, so the batch size need not be known.
        """
        if weights is None:
            weights = [1.0] * len(slots)
        if len(weights) != len(slots):
            raise ContinualPeftError(
                f"use_slots needs one weight per slot; got slots {slots} and weights {weights}"
            )
        for slot in slots:
            self._check_slot(slot)
        if len(slots) == 1 and weights[0] == 1:
            with self.use_slot(slots[0]):
                yield
            return
        indices = torch.tensor([slots], dtype=torch.long, device="cpu").reshape(1, -1)  # (1, k)
        mix = torch.tensor([weights], dtype=torch.float32, device="cpu").reshape(1, -1)  # (1, k)
        with self._set(self._per_kind(indices, mix)):
            yield

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """No module at all: the frozen backbone's own output."""
        with self._set({}):
            yield

    def _per_kind(self, indices: torch.Tensor, weights: torch.Tensor) -> dict[str, Routing]:
        """Each kind's resolved `Routing` of CPU `indices`/`weights` (B, k): global slot ids
        become the kind's local ids (-1 where the slot has no part of that kind), each part's
        scale is folded into the weights, and the result goes to the backbone's device in one
        copy per tensor."""
        if not self.num_slots:
            return {}
        safe, valid = indices.clamp(min=0), indices >= 0
        put = self.backbone.placement.put
        routings = {}
        for kind, (local_of, scale_of) in self._kind_tables().items():
            local = torch.where(valid, local_of[safe], -1)
            mine = local >= 0
            if bool(mine.any()):  # a kind no row uses costs nothing
                resolved = Routing.rows(local, torch.where(mine, weights, 0.0), scale_of[safe])
                routings[kind] = Routing(
                    indices=put(resolved.indices), weights=put(resolved.weights)
                )
        return routings

    def _kind_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per plain kind, (S,) CPU tensors over global slots: the local id (-1: no part of the
        kind) and the part's scale; made again only after the slots change."""
        if self._tables is None:
            self._tables = {
                kind: (
                    torch.tensor(
                        [p.get(kind, -1) for p in self.slot_parts], dtype=torch.long, device="cpu"
                    ),
                    torch.tensor(
                        [s.get(kind, 1.0) for s in self.slot_scale],
                        dtype=torch.float32,
                        device="cpu",
                    ),
                )
                for kind in self.kind_sites
            }
        return self._tables

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


def _part_prefix(kind: str, part: str) -> str:
    """How a slot's state names `part`'s tensors: `<part>/` in a hybrid slot, nothing else."""
    return f"{part}/" if HYBRID in kind else ""


def _site_state(
    state: dict[str, torch.Tensor], kind: str, part: str, site: str
) -> dict[str, torch.Tensor]:
    """The tensors of one site of one part in a slot state of `kind` (`slot_state`'s keys)."""
    prefix = f"{_part_prefix(kind, part)}{site}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
