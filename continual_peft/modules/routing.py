"""Which slot each row of the current batch uses; shared by every injected site of one bank.

The bank resolves a batch's routing ONCE per forward (`Routing.rows`): 'no module' entries (-1)
are clamped to slot 0 with weight 0 and each slot's scale is folded into its weight, so the
sites (one per wrapped layer, 154 in a 22-layer Llama) only read two small tensors and never
recompute them or synchronise with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class Routing:
    """Per-row slot choice for the batch in flight.

    With `indices is None and single is None` every site adds nothing (the bare backbone).
    """

    indices: torch.Tensor | None = None  # (B, k) slot ids >= 0; (1, k): every row
    weights: torch.Tensor | None = None  # (B, k) float32 weights, scale folded in, 0 = unused
    single: int | None = None  # every row on this one slot with weight 1: a faster path
    derived: dict = field(default_factory=dict)  # per-forward tensors the sites share (`derive`)

    @classmethod
    def rows(
        cls, indices: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None = None
    ) -> Routing:
        """Resolve raw routing: `indices` (B, k) with -1 for none, `weights` (B, k), and
        `scale` (B, k) the fixed scale of each entry's slot (1 when None)."""
        valid = indices >= 0
        if scale is not None:
            weights = weights * scale
        effective = torch.where(valid, weights.to(torch.float32), 0.0)
        return cls(indices=indices.clamp(min=0), weights=effective)

    def derive(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor derived from this routing, made by the first site that asks and reused by
        the others in the same forward (e.g. the weights repeated r times, in the compute
        dtype). An entry holds for the `weights` tensor it was made from and is made again for
        any other, so routing set by hand never meets a stale value."""
        entry = self.derived.get(key)
        if entry is None or entry[0] is not self.weights:
            entry = (self.weights, make())
            self.derived[key] = entry
        return entry[1]

    @property
    def off(self) -> bool:
        return self.indices is None and self.single is None

    @property
    def shared(self) -> bool:
        """One row of slots and weights that every row of the batch uses (`bank.use_slots`)."""
        return self.indices is not None and self.indices.shape[0] == 1

    def for_rows(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, k) indices and weights; a shared (1, k) routing is repeated for every row."""
        return self.indices.expand(rows, -1), self.weights.expand(rows, -1)
