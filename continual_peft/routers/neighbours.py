"""k-nearest-neighbour familiarity (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors"): how far a row is from the k-th nearest of a task's kept rows, on features
L2-normalised per layer block.

Features from several depths side by side ("auto") are blocks of the backbone's hidden width;
each block is normalised on its own and the whole scaled by 1/√blocks, so every depth weighs the
same and the row stays a unit vector. Measured on the shared streams (benchmarks/rejection.py),
per-block normalisation told unknown tasks from known ones better than normalising the whole
row or reading the last layer alone.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from continual_peft.backbones.placement import CPU, Placement
from continual_peft.errors import ContinualPeftError

ROWS_PER_CHUNK = 256  # rows scored at once: a chunk's distances are ROWS_PER_CHUNK x Σ kept rows


def normalise_blocks(x: torch.Tensor, block_width: int | None) -> torch.Tensor:
    """(B, d) rows with every `block_width`-wide block L2-normalised, scaled to unit length;
    the whole row as one block when `block_width` is None or does not divide d."""
    width = x.shape[1]
    if not block_width or width % block_width:
        return F.normalize(x, dim=1)
    blocks = width // block_width
    parts = F.normalize(x.reshape(len(x), blocks, block_width), dim=2)
    return parts.reshape(len(x), width) / blocks**0.5


class NeighbourBank:
    """Per task, at most `size` of the rows its statistics were fitted on (a seeded draw),
    normalised per block and kept as float16 (unit vectors lose nothing that matters there):
    `size` · d · 2 bytes per task.

    Args:
        k: Which neighbour's distance counts (the k-th nearest).
        size: Rows kept per task at most.
        device: Where the rows live.
    """

    def __init__(self, k: int, size: int, device: torch.device = CPU) -> None:
        for name, value in (("knn_k", k), ("knn_rows", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ContinualPeftError(f"{name} must be an integer >= 1, got {value!r}")
        self.k, self.size, self.device = k, size, device
        self.rows = torch.empty(0, 0, dtype=torch.float16, device=device)  # (Σ kept, d)
        self.sizes: list[int] = []
        self.block_width: int | None = None

    def add(self, x: torch.Tensor) -> None:
        """Keep a seeded draw of one task's (N, d) float64 fitted rows."""
        task = len(self.sizes)
        keep = min(self.size, len(x))
        order = torch.randperm(len(x), generator=Placement.generator(10_007 + task), device=CPU)
        kept = normalise_blocks(x[order[:keep].to(x.device)], self.block_width).half()
        if self.rows.numel() == 0:
            self.rows = torch.empty(0, x.shape[1], dtype=torch.float16, device=self.device)
        self.rows = torch.cat([self.rows, kept.to(self.device)])
        self.sizes.append(keep)

    def familiarity(self, x: torch.Tensor, tasks: range | None = None) -> torch.Tensor:
        """(B, T') minus the distance from each normalised row to its k-th nearest kept row of
        each task (of `tasks`, all by default); k is capped at the task's kept rows."""
        tasks = range(len(self.sizes)) if tasks is None else tasks
        if not tasks:
            return torch.zeros(len(x), 0, dtype=torch.float64, device=x.device)
        first = sum(self.sizes[: tasks[0]])
        kept = self.rows[first : first + sum(self.sizes[t] for t in tasks)].double()  # (M, d)
        kept_sq = kept.pow(2).sum(1)
        bounds = [0, *itertools.accumulate(self.sizes[t] for t in tasks)]
        z = normalise_blocks(x, self.block_width)
        out = []
        for start in range(0, len(z), ROWS_PER_CHUNK):
            chunk = z[start : start + ROWS_PER_CHUNK]
            # squared distances to every kept row at once: ‖z‖² + ‖b‖² − 2 z·b, (b, M)
            squared = chunk.pow(2).sum(1, keepdim=True) + kept_sq - 2 * chunk @ kept.T
            columns = [
                squared[:, lo:hi].topk(min(self.k, hi - lo), dim=1, largest=False).values[:, -1]
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            out.append(-torch.stack(columns, dim=1).clamp_min(0).sqrt())
        if not out:  # no rows
            return torch.zeros(0, len(tasks), dtype=torch.float64, device=x.device)
        return torch.cat(out)

    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"neighbours": self.rows.clone()}

    def load(self, tensors: dict[str, torch.Tensor], sizes: list[int], dim: int) -> None:
        """Take back `tensors()`'s output with the kept rows per task (`sizes`)."""
        shape = (sum(sizes), dim)
        rows = tensors.get("neighbours")
        if sum(sizes) == 0 and (rows is None or rows.numel() == 0):  # none kept: as when new
            rows = torch.empty(0, 0, dtype=torch.float16, device=self.device)
        elif rows is None or tuple(rows.shape) != shape:
            found = None if rows is None else tuple(rows.shape)
            raise ContinualPeftError(
                f"router state tensor 'neighbours' has shape {found}, expected {shape}"
            )
        elif not rows.is_floating_point() or not torch.isfinite(rows).all():
            raise ContinualPeftError("router state tensor 'neighbours' is not finite floats")
        self.rows, self.sizes = rows.to(self.device, torch.float16), list(sizes)
        self.device = self.rows.device
