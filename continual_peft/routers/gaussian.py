"""Per-task Gaussians with one shared shrunk covariance, kept as statistics only.

`GaussianStats` holds, per task, the feature sum, the count and the sum of fourth powers of the
centred rows' norms, plus the within-task scatter pooled over tasks. From these alone it
recomputes, after every task, exactly what scikit-learn's `LedoitWolf` or `OAS` would give when
fitted on all tasks' within-task-centred features; no raw feature is ever kept.

Why the statistics suffice (X: the stacked centred rows, n of them, d features):
- both estimators start from the empirical covariance S = XᵀX / n (the pooled scatter over n);
- OAS needs nothing else;
- Ledoit-Wolf also needs Σᵢⱼ (X²ᵀX²)ᵢⱼ = Σₖ ‖xₖ‖⁴, which adds up over tasks.
"""

from __future__ import annotations

import torch

from continual_peft.backbones.placement import CPU
from continual_peft.errors import ContinualPeftError
from continual_peft.routers.base import ROUTERS, ScoringRouter, take

SHRINKAGES = ("ledoit_wolf", "oas")


def ledoit_wolf(scatter: torch.Tensor, n: int, fourth: float) -> tuple[torch.Tensor, float]:
    """scikit-learn's Ledoit-Wolf estimate from centred data's statistics.

    Args:
        scatter: (d, d) XᵀX of the centred rows.
        n: Number of rows.
        fourth: Σₖ ‖xₖ‖⁴ over the centred rows.

    Returns:
        The shrunk covariance and the shrinkage.
    """
    d = scatter.shape[0]
    emp = scatter / n
    if d == 1:
        return emp, 0.0
    mu = float(emp.trace()) / d
    delta_ = float((emp**2).sum())  # Σ (XᵀX)² / n²
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(emp.trace()) + d * mu**2) / d
    beta = min(beta, delta)  # never shrink past the target
    shrinkage = 0.0 if beta == 0 else beta / delta
    return _shrink(emp, mu, shrinkage), shrinkage


def oas(scatter: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """scikit-learn's Oracle Approximating Shrinkage estimate from centred data's statistics.

    Args:
        scatter: (d, d) XᵀX of the centred rows.
        n: Number of rows.

    Returns:
        The shrunk covariance and the shrinkage.
    """
    d = scatter.shape[0]
    emp = scatter / n
    if d == 1:
        return emp, 0.0
    alpha = float((emp**2).mean())
    mu = float(emp.trace()) / d
    den = (n + 1) * (alpha - mu**2 / d)
    shrinkage = 1.0 if den == 0 else min((alpha + mu**2) / den, 1.0)
    return _shrink(emp, mu, shrinkage), shrinkage


def _shrink(emp: torch.Tensor, mu: float, shrinkage: float) -> torch.Tensor:
    eye = torch.eye(emp.shape[0], dtype=emp.dtype, device=emp.device)
    return (1.0 - shrinkage) * emp + shrinkage * mu * eye


def _factor(cov: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a covariance; a tiny relative ridge keeps it defined when the
    features are degenerate."""
    d = cov.shape[0]
    ridge = 1e-10 * float(cov.trace()) / d + 1e-300
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return torch.linalg.cholesky(cov + ridge * eye)


class GaussianStats:
    """Sufficient statistics for per-task means and a shared shrunk covariance.

    Args:
        shrinkage: "ledoit_wolf" or "oas".
    """

    def __init__(self, shrinkage: str = "ledoit_wolf", device: torch.device = CPU) -> None:
        if shrinkage not in SHRINKAGES:
            raise ContinualPeftError(
                f"unknown shrinkage {shrinkage!r}; valid choices: {', '.join(SHRINKAGES)}"
            )
        self.shrinkage = shrinkage
        self.device = device  # where the statistics live (the router's)
        f64 = {"dtype": torch.float64, "device": device}
        self.sums = torch.zeros(0, 0, **f64)  # (T, d)
        self.counts = torch.zeros(0, **f64)  # (T,)
        self.fourth = torch.zeros(0, **f64)  # (T,) Σ ‖x − mean_t‖⁴ per task
        self.scatter = torch.zeros(0, 0, **f64)  # (d, d) pooled within-task
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._background: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.counts)

    @property
    def means(self) -> torch.Tensor:
        """(T, d) per-task means."""
        return self.sums / self.counts[:, None]

    def add(self, x: torch.Tensor) -> None:
        """Absorb one task's (N, d) float64 features."""
        f64 = {"dtype": torch.float64, "device": self.device}
        if self.num_tasks == 0:
            self.sums = torch.zeros(0, x.shape[1], **f64)
            self.scatter = torch.zeros(x.shape[1], x.shape[1], **f64)
        centred = x - x.mean(dim=0)  # (N, d)
        self.sums = torch.cat([self.sums, x.sum(dim=0, keepdim=True)])
        self.counts = torch.cat([self.counts, torch.tensor([float(len(x))], **f64)])
        fourth = centred.pow(2).sum(dim=1).pow(2).sum()
        self.fourth = torch.cat([self.fourth, fourth.reshape(1)])
        self.scatter = self.scatter + centred.T @ centred
        self._cache = self._background = None

    def covariance(self) -> torch.Tensor:
        """(d, d) the shrunk shared covariance of the within-task-centred features so far."""
        n = int(self.counts.sum())
        if self.shrinkage == "oas":
            return oas(self.scatter, n)[0]
        return ledoit_wolf(self.scatter, n, float(self.fourth.sum()))[0]

    def cholesky(self) -> torch.Tensor:
        """(d, d) lower Cholesky factor L of the shared covariance (L Lᵀ = Σ)."""
        return self._factors()[0]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cholesky factor and whitened task means, recomputed only after a change."""
        if self._cache is None:
            chol = _factor(self.covariance())
            centres = torch.linalg.solve_triangular(chol, self.means.T, upper=False).T  # (T, d)
            self._cache = (chol, centres)
        return self._cache

    def background_distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) Mahalanobis distances of (B, d) float64 features to the background Gaussian:
        one Gaussian over every task's rows (their mean, and their total scatter, which is the
        pooled within-task scatter plus Σₜ nₜ (μₜ − μ)(μₜ − μ)ᵀ, shrunk as scikit-learn's OAS),
        as in Ren et al. 2021, "A simple fix to Mahalanobis distance"."""
        if self._background is None:
            n = float(self.counts.sum())
            mean = self.sums.sum(dim=0) / n  # (d,)
            between = self.means - mean  # (T, d)
            total = self.scatter + (between.T * self.counts) @ between
            self._background = (_factor(oas(total, int(n))[0]), mean)
        chol, mean = self._background
        z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False)  # (d, B)
        return z.pow(2).sum(0).sqrt()

    def familiarity(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, T) how familiar (B, d) float64 rows look to each task, higher is more familiar.

        "mahalanobis": −Mahalanobis distance to the task's mean under the shared covariance
        (Lee et al. 2018). "relative": −(D²ₜ − D²₀), the squared distance to the task less the
        squared distance to the background Gaussian (`background_distances`; Ren et al. 2021),
        which discounts what every task shares.
        """
        if kind == "mahalanobis":
            return -self.distances(x)
        return -(self.distances(x).pow(2) - self.background_distances(x).pow(2)[:, None])

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) Mahalanobis distances of (B, d) float64 features to each task's mean."""
        chol, centres = self._factors()
        z = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # (B, d) whitened
        sq = z.pow(2).sum(1, keepdim=True) - 2 * z @ centres.T + centres.pow(2).sum(1)  # (B, T)
        return sq.clamp_min(0).sqrt()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "sums": self.sums.clone(),
            "counts": self.counts.clone(),
            "fourth_moments": self.fourth.clone(),
            "scatter": self.scatter.clone(),
        }

    def task_rows(self) -> dict[str, list[int]]:
        """One row per task in each per-task tensor (see `Router.task_rows`); the pooled
        scatter, which every task changes, is shared."""
        return dict.fromkeys(("sums", "counts", "fourth_moments"), [1] * self.num_tasks)

    def load(self, tensors: dict[str, torch.Tensor], num_tasks: int, dim: int | None) -> None:
        """Take back `tensors()`'s output; the statistics live where those tensors are."""
        d = dim or 0
        self.device = tensors["sums"].device if "sums" in tensors else self.device
        self.sums = take(tensors, "sums", (num_tasks, d))
        self.counts = take(tensors, "counts", (num_tasks,))
        self.fourth = take(tensors, "fourth_moments", (num_tasks,))
        self.scatter = take(tensors, "scatter", (d, d))
        self._cache = self._background = None


@ROUTERS.register("mahalanobis")
class MahalanobisRouter(ScoringRouter):
    """Nearest task Gaussian: score = −Mahalanobis distance under one shared shrunk covariance.

    Sharing one covariance across tasks (as in linear discriminant analysis) lets later tasks
    sharpen the estimate for all, and shrinkage keeps it well conditioned when the feature
    dimension rivals the number of examples. The covariance is recomputed from the pooled
    statistics after every task.

    Args:
        shrinkage: "ledoit_wolf" or "oas" (scikit-learn's estimators, recomputed from statistics).
        reject_rate: See `ScoringRouter`.
        familiarity: What rejection thresholds: "knn" (`ScoringRouter`), or the Gaussians'
            "mahalanobis" or "relative" (`GaussianStats.familiarity`); routing is the same
            under every one.
        calibration_share, max_calibration, knn_k, knn_rows: See `ScoringRouter`.
        layers: See `ScoringRouter`; "auto" (several depths side by side) by default, which
            routed the four shared tasks 99.6 % right against 96.1 % on the last layer
            (benchmarks/RESULTS.md).
    """

    name = "mahalanobis"
    own_familiarities = ("mahalanobis", "relative")

    def __init__(
        self,
        shrinkage: str = "ledoit_wolf",
        reject_rate: float = 0.0,
        layers: str | list[int] = "auto",
        familiarity: str = "knn",
        calibration_share: float = 0.2,
        max_calibration: int = 1000,
        knn_k: int = 10,
        knn_rows: int = 1000,
    ) -> None:
        super().__init__(
            reject_rate, layers, familiarity, calibration_share, max_calibration, knn_k, knn_rows
        )
        self.stats = GaussianStats(shrinkage, self.device)
        self.options = {"shrinkage": shrinkage, **self.options}

    def _fit(self, x: torch.Tensor) -> None:
        self.stats.add(x)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return -self.stats.distances(x)

    def _own_familiarity(self, x: torch.Tensor) -> torch.Tensor:
        return self.stats.familiarity(x, self.familiarity)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.stats.tensors()

    def _task_rows(self) -> dict[str, list[int]]:
        return self.stats.task_rows()

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats.load(tensors, self.num_tasks, self.dim)
