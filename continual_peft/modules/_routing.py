"""Which slot each row of the current batch uses; shared by every injected site of one bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Per-row slot choice for the batch in flight.

    With `indices is None and single is None` every site adds nothing (the bare backbone).
    """

    indices: torch.Tensor | None = None  # (B, k) slot ids, -1 = no module; (1, k): every row
    weights: torch.Tensor | None = None  # (B, k) mixing weights, (1, k) like `indices`
    single: int | None = None  # every row on this one slot with weight 1: a faster path

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


def gather_weights(
    indices: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp 'no module' entries (-1) to slot 0 and give them weight 0; fold in per-slot scale.

    Returns:
        (safe indices (B, k), effective weights (B, k)).
    """
    valid = indices >= 0
    safe = indices.clamp(min=0)
    effective = torch.where(valid, weights * scale[safe], torch.zeros_like(weights))
    return safe, effective
