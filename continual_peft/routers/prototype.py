"""The prototype router: nearest task mean of L2-normalised frozen features (cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from continual_peft.routers.base import ROUTERS, ScoringRouter, take


@ROUTERS.register("prototype")
class PrototypeRouter(ScoringRouter):
    """Score = cosine between a row's normalised features and each task's mean normalised feature.

    Normalising first makes the router blind to feature scale, which suits sentence embeddings
    whose direction carries the meaning; it cannot separate tasks that differ only in scale or
    along low-variance directions (use `mahalanobis` there).

    Args:
        reject_rate, familiarity, calibration_share, max_calibration, knn_k, knn_rows: See
            `ScoringRouter`; familiarity "cosine" thresholds this router's own score.
        layers: See `ScoringRouter`; the last layer by default: cosine over several depths
            side by side weighs them badly (on the dbpedia class split it routed 75 % right,
            against 86 % on the last layer; benchmarks/RESULTS.md).
    """

    name = "prototype"

    own_familiarities = ("cosine",)

    def __init__(
        self,
        reject_rate: float = 0.0,
        layers: str | list[int] = "last",
        familiarity: str = "knn",
        calibration_share: float = 0.2,
        max_calibration: int = 1000,
        knn_k: int = 10,
        knn_rows: int = 1000,
    ) -> None:
        super().__init__(
            reject_rate, layers, familiarity, calibration_share, max_calibration, knn_k, knn_rows
        )
        f64 = {"dtype": torch.float64, "device": self.device}
        self.means = torch.zeros(0, 0, **f64)  # (T, d) mean unit feature per task
        self.counts = torch.zeros(0, **f64)  # (T,)

    def _fit(self, x: torch.Tensor) -> None:
        mean = F.normalize(x, dim=1).mean(dim=0, keepdim=True)  # (1, d)
        self.means = torch.cat([self.means.reshape(-1, x.shape[1]), mean])
        count = torch.tensor([float(len(x))], dtype=torch.float64, device=self.device)
        self.counts = torch.cat([self.counts, count])

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.means, dim=1).T  # (B, T)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.clone(), "counts": self.counts.clone()}

    def _task_rows(self) -> dict[str, list[int]]:
        return dict.fromkeys(("means", "counts"), [1] * self.num_tasks)

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.means = take(tensors, "means", (self.num_tasks, self.dim or 0))
        self.counts = take(tensors, "counts", (self.num_tasks,))
