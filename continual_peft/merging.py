"""Merging task vectors into one: the arithmetic a merging strategy consolidates slots with.

A task vector is what fine-tuning on one task added to a weight (for LoRA, ΔW = B A · scale).
Stacked over T tasks, (T, *shape), they merge into one (*shape) tensor:

- "task_arithmetic" (Ilharco et al. 2023, "Editing models with task arithmetic"): Σ_t w_t τ_t.
- "ties" (Yadav et al. 2023, "TIES-Merging"): trim each τ_t to its `density` share of largest
  magnitudes, elect a sign per entry (the sign of Σ_t τ_t, or of Σ_t sign τ_t with
  `sign="frequency"`), and average, weighted, only the entries that agree with it (disjoint
  mean: divided by how many tasks agree there, at least 1).
- "dare_linear" / "dare_ties" (Yu et al. 2024, "Language models are Super Mario"): drop each
  entry with probability 1 − density and rescale what stays by 1 / density, then sum weighted
  (linear) or elect and take the disjoint mean as TIES does.

The formulas follow peft's `peft.utils.merge_utils` (tested equal to it, with the same random
draws for DARE); unlike it, the random drop takes an explicit generator, and inputs are checked.
"""

from __future__ import annotations

import torch

from continual_peft.errors import ContinualPeftError

MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def merge_task_vectors(
    vectors: torch.Tensor,
    weights: torch.Tensor,
    method: str = "task_arithmetic",
    density: float = 1.0,
    sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge T task vectors into one.

    Args:
        vectors: (T, *shape) float task vectors, stacked on dimension 0.
        weights: (T,) the weight of each task's vector.
        method: One of `MERGES` (module docstring).
        density: For TIES and DARE, the share of each vector's entries kept, in (0, 1]; 1
            keeps every entry (no trimming, no dropping).
        sign: For the TIES-style election: "total" (sign of the sum) or "frequency" (sign of
            the count of signs).
        generator: For DARE, the random source of the drop (on the vectors' device); None
            uses torch's default one.

    Returns:
        (*shape) the merged vector, on the vectors' device and dtype.

    Raises:
        ContinualPeftError: an unknown method or sign rule, vectors that are not a floating
            (T, ...) tensor with T >= 1, weights that are not (T,) and finite, a density
            outside (0, 1].
    """
    if method not in MERGES:
        raise ContinualPeftError(f"unknown merge {method!r}; valid choices: {', '.join(MERGES)}")
    if sign not in SIGN_METHODS:
        raise ContinualPeftError(
            f"unknown sign rule {sign!r}; valid choices: {', '.join(SIGN_METHODS)}"
        )
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ContinualPeftError("vectors must be a floating tensor of shape (T, ...)")
    if vectors.ndim < 1 or len(vectors) == 0:
        raise ContinualPeftError(f"vectors must hold at least one task, got {tuple(vectors.shape)}")
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (len(vectors),):
        found = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights)
        raise ContinualPeftError(f"weights must have shape ({len(vectors)},), got {found}")
    if not torch.isfinite(weights).all():
        raise ContinualPeftError("weights must be finite")
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ContinualPeftError(f"density must be in (0, 1], got {density!r}")
    w = weights.to(vectors.device, vectors.dtype).view(-1, *(1,) * (vectors.ndim - 1))
    if method == "task_arithmetic":
        return (w * vectors).sum(0)
    if method == "ties":
        kept = torch.stack([trim(v, density) for v in vectors])
    else:
        kept = drop(vectors, density, generator)
    if method == "dare_linear":
        return (w * kept).sum(0)
    agree = kept.sign() == elect_sign(kept, sign)
    return (w * kept * agree).sum(0) / agree.sum(0).clamp(min=1)


def trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: `vector` with all but its ⌊density · numel⌋ largest magnitudes set to 0."""
    if density >= 1:
        return vector
    flat = vector.reshape(-1)
    keep = flat.abs().topk(int(density * flat.numel())).indices
    mask = torch.zeros_like(flat)
    mask[keep] = 1
    return (flat * mask).reshape(vector.shape)


def drop(
    vectors: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability `density`, divided by it."""
    if density >= 1:
        return vectors
    keep = torch.bernoulli(torch.full_like(vectors, density), generator=generator)
    return vectors * keep / density


def elect_sign(vectors: torch.Tensor, rule: str = "total") -> torch.Tensor:
    """(*shape) the elected sign, +1 or -1 (ties go to +1), of (T, *shape) vectors."""
    strength = vectors.sum(0) if rule == "total" else vectors.sign().sum(0)
    one = torch.ones((), dtype=vectors.dtype, device=vectors.device)
    return torch.where(strength >= 0, one, -one)
