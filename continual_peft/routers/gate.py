"""The gate router: a small learned gate over frozen features, trained continually without old data.

How it learns without keeping old inputs: the router keeps the same statistics as `mahalanobis`
(per-task sums and counts, the pooled within-task scatter), which describe each task as a
Gaussian N(mean_t, Σ) with the shared shrunk covariance Σ. After every task it draws
`samples_per_task` pseudo-features from each task's Gaussian, for every task so far, with a
generator seeded by `seed` (so a refit is reproducible), standardises them, and refits the gate
from a fixed initialisation with `steps` full-batch Adam steps on cross-entropy. Old tasks thus
stay in the gate through their statistics, and no real feature outlives its own `add_task`.

A softmax gate is overconfident far from its training data, so its scores say nothing about
familiarity: rejection thresholds the kept rows' nearest-neighbour distance ("knn", the
default) or the stored Gaussians ("mahalanobis": a row's negative Mahalanobis distance to
mean_t), never the gate's own score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from continual_peft.backbones.placement import CPU, Placement
from continual_peft.errors import ContinualPeftError
from continual_peft.routers.base import ROUTERS, ScoringRouter, take
from continual_peft.routers.gaussian import GaussianStats


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ContinualPeftError(f"gate: {name} must be an integer >= {minimum}, got {value!r}")
    return value


@ROUTERS.register("gate")
class GateRouter(ScoringRouter):
    """A linear (or one-hidden-layer) softmax gate refitted on pseudo-features after each task.

    Scores are the gate's log-probabilities. See the module docstring for the training scheme.

    Args:
        hidden: Hidden units of an MLP gate; 0 for a linear gate.
        samples_per_task: Pseudo-features drawn per task at every refit.
        steps: Full-batch Adam steps per refit.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the gate's weights (keeps logits finite on separable data).
            1e-2 by default: on the "auto" features (1,152 wide on MiniLM) 1e-4 let the gate
            fit its pseudo-features too closely (dbpedia class split: 93.1 % routing against
            95.1 %; four shared tasks: 98.1 % against 98.8 %; benchmarks/RESULTS.md).
        seed: Seeds the pseudo-features and the MLP's initial weights.
        shrinkage: Covariance estimator for the Gaussians: "ledoit_wolf" or "oas".
        reject_rate: See `ScoringRouter`; never thresholds the gate's own score.
        layers: See `ScoringRouter`; several depths side by side ("auto") by default.
        familiarity, calibration_share, max_calibration, knn_k, knn_rows: See
            `MahalanobisRouter`.
    """

    name = "gate"
    own_familiarities = ("mahalanobis", "relative")

    def __init__(
        self,
        hidden: int = 0,
        samples_per_task: int = 512,
        steps: int = 300,
        lr: float = 0.05,
        weight_decay: float = 1e-2,
        seed: int = 0,
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
        self.hidden = _positive_int("hidden", hidden, minimum=0)
        self.samples_per_task = _positive_int("samples_per_task", samples_per_task)
        self.steps = _positive_int("steps", steps)
        self.seed = _positive_int("seed", seed, minimum=0)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.stats = GaussianStats(shrinkage, self.device)
        self.params: dict[str, torch.Tensor] = {}  # the gate, see `_shapes`
        self.options = {
            "hidden": hidden,
            "samples_per_task": samples_per_task,
            "steps": steps,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": seed,
            "shrinkage": shrinkage,
            **self.options,
        }

    def _shapes(self, num_tasks: int, dim: int) -> dict[str, tuple[int, ...]]:
        shapes = {"shift": (dim,), "scale": (dim,)}  # input standardisation
        if self.hidden == 0:
            return shapes | {"w": (num_tasks, dim), "b": (num_tasks,)}
        h = self.hidden
        return shapes | {"w1": (h, dim), "b1": (h,), "w": (num_tasks, h), "b": (num_tasks,)}

    def _logits(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        h = (x - params["shift"]) / params["scale"]  # (B, d)
        if self.hidden:
            h = F.gelu(h @ params["w1"].T + params["b1"])  # (B, hidden)
        return h @ params["w"].T + params["b"]  # (B, T)

    def _pseudo_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T·n, d) samples from every task's Gaussian and their (T·n,) task labels."""
        generator = Placement.generator(self.seed)  # drawn on the CPU: the same on every device
        chol, means = self.stats.cholesky(), self.stats.means  # (d, d), (T, d)
        n, (num_tasks, dim) = self.samples_per_task, means.shape
        noise = torch.randn(num_tasks, n, dim, generator=generator, dtype=torch.float64, device=CPU)
        samples = means[:, None, :] + noise.to(self.device) @ chol.T  # (T, n, d)
        labels = torch.arange(num_tasks, device=self.device).repeat_interleave(n)
        return samples.reshape(-1, dim), labels

    def _init_params(self, num_tasks: int, dim: int) -> dict[str, torch.Tensor]:
        shapes = self._shapes(num_tasks, dim)
        params = {key: torch.zeros(shape, device=self.device) for key, shape in shapes.items()}
        if self.hidden:
            generator = Placement.generator(self.seed + 1)
            w1 = torch.randn(self.hidden, dim, generator=generator, device=CPU) / dim**0.5
            params["w1"] = w1.to(self.device)
        return params

    def _fit(self, x: torch.Tensor) -> None:
        self.stats.add(x)
        # The engine may add tasks under inference mode; training needs ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            samples, labels = self._pseudo_features()
            samples = samples.float().clone()
            params = self._init_params(self.stats.num_tasks, samples.shape[1])
            params["shift"] = samples.mean(dim=0)
            params["scale"] = samples.std(dim=0).clamp_min(1e-12)
            learned = [v.requires_grad_() for k, v in params.items() if k not in ("shift", "scale")]
            weights = [params[key] for key in ("w", "w1") if key in params]
            optimiser = torch.optim.Adam(learned, lr=self.lr)
            for _ in range(self.steps):
                loss = F.cross_entropy(self._logits(samples, params), labels)
                loss = loss + self.weight_decay * sum(w.pow(2).sum() for w in weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.params = {key: value.detach().clone() for key, value in params.items()}

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        params = {key: value.to(torch.float64) for key, value in self.params.items()}
        return torch.log_softmax(self._logits(x, params), dim=1)

    def _own_familiarity(self, x: torch.Tensor) -> torch.Tensor:
        return self.stats.familiarity(x, self.familiarity)

    def _tensors(self) -> dict[str, torch.Tensor]:
        gate = {f"gate.{key}": value.clone() for key, value in self.params.items()}
        return self.stats.tensors() | gate

    def _task_rows(self) -> dict[str, list[int]]:
        return self.stats.task_rows()  # the gate itself is retrained after every task: shared

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats.load(tensors, self.num_tasks, self.dim)
        if self.num_tasks:
            shapes = self._shapes(self.num_tasks, self.dim or 0)
            self.params = {
                key: take(tensors, f"gate.{key}", shape).float() for key, shape in shapes.items()
            }
