"""Which slot each row of the current batch uses; shared by every injected site of one bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Per-row slot choice for the batch in flight.

    With `indices is None and single is None` every site adds nothing (the bare backbone).
    """

    indices: torch.Tensor | None = None  # (B, k) slot ids, -1 = no module for that entry
    weights: torch.Tensor | None = None  # (B, k) mixing weights
    single: int | None = None  # every row on this one slot with weight 1: a faster path

    @property
    def off(self) -> bool:
        return self.indices is None and self.single is None


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
