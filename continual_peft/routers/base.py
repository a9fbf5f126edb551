"""The router interface: frozen features in, per-row task indices and mixing weights out.

A router knows tasks only by their index 0..T-1 in learning order (the engine maps an index to
a slot and a head). Its input is the frozen backbone's features, which never change, so a
router's decisions depend only on the statistics it keeps. Those statistics (never raw features)
are its whole state: `state()` returns them as tensors plus JSON-able metadata, and
`from_state()` rebuilds a router that makes identical decisions.

Every computation runs in float64 on the router's `device` (the backbone's: the learner moves
its router there with `to`), whatever the features' device and dtype, so that a router reloaded
on the same device decides exactly as the original did; results come back on the input's device.
Every tensor a router makes is made on its device.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from continual_peft.backbones.features import check_layers
from continual_peft.backbones.placement import CPU, Placement
from continual_peft.distributed import same_everywhere, world
from continual_peft.errors import ContinualPeftError
from continual_peft.registry import Registry

ROUTERS: Registry[type[Router]] = Registry("router", "router_options in a strategy spec")


def build_router(name: str, **options: Any) -> Router:
    """The router registered as `name`, built with keyword `options` (`ROUTERS.build`: unknown
    options are refused, naming the valid ones).

    Raises:
        ContinualPeftError: an unknown name, unknown options or invalid values.
    """
    return ROUTERS.build(name, options)


def check_features(
    features: object, dim: int | None, where: str, device: torch.device = CPU
) -> torch.Tensor:
    """Validate an (N, d) float feature tensor and return it as float64 on `device`.

    Args:
        features: The candidate features.
        dim: The feature dimension the router was fitted on; None before its first task.
        where: What was called, for messages.
        device: The router's device.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ContinualPeftError(
            f"{where}: features must be a float tensor of shape (N, d), got {shape}"
        )
    if not features.is_floating_point():
        raise ContinualPeftError(f"{where}: features must be floating point, got {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise ContinualPeftError(
            f"{where}: features have dimension {features.shape[1]}, but this router was fitted on "
            f"dimension {dim}; use features of the same backbone"
        )
    x = features.detach().to(device, torch.float64)
    if not torch.isfinite(x).all():
        raise ContinualPeftError(f"{where}: features contain NaN or infinite values")
    return x


def take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A state tensor checked for presence and shape, as float64."""
    if key not in tensors:
        raise ContinualPeftError(f"router state lacks tensor {key!r}; found {sorted(tensors)}")
    value = tensors[key]
    if tuple(value.shape) != shape:
        raise ContinualPeftError(
            f"router state tensor {key!r} has shape {tuple(value.shape)}, expected {shape}"
        )
    return value.to(torch.float64)


class Ranking(NamedTuple):
    """The k best tasks per row, best first."""

    scores: torch.Tensor  # (B, k) float64; -inf in columns beyond the number of tasks
    indices: torch.Tensor  # (B, k) long; -1 beyond the number of tasks and in rejected rows
    rejected: torch.Tensor  # (B,) bool: the row looks unfamiliar to every task


class Router(abc.ABC):
    """Maps frozen features to sparse weights over tasks.

    Attributes:
        name: The registered name.
        options: The constructor's keyword arguments (JSON-able); `cls(**options)` rebuilds it.
        num_tasks: Tasks added so far.
    """

    name: ClassVar[str] = ""
    options: dict[str, Any]
    num_tasks: int
    device: torch.device = CPU  # where the statistics live and are computed
    # which hidden layers its features come from (`backbones.features`); the engine computes them
    layers: str | list[int] = "last"

    def to(self, device: str | torch.device) -> Router:
        """Move the statistics to `device` (and compute there from now on); returns self."""
        self.device = torch.device(device)
        tensors, meta = self.state()
        self._restore({key: value.to(self.device) for key, value in tensors.items()}, meta)
        return self

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:  # noqa: B027
        """Take back `state()`'s output (already on `self.device`); nothing to do by default."""

    def rejection(self) -> dict[str, Any] | None:
        """What this router's rejection promises, for the report: None when it rejects nothing
        by design (oracle); see `ScoringRouter.rejection`."""
        return None

    def agree(self) -> None:
        """Under torchrun, hold rank 0's statistics on every rank (each rank fits the same
        gathered features, but a GPU's reductions need not repeat bit for bit)."""
        if world().size > 1:
            tensors, meta = self.state()
            same_everywhere(list(tensors.values()))
            self._restore(tensors, meta)

    @abc.abstractmethod
    def add_task(self, features: torch.Tensor) -> None:
        """Learn task `num_tasks` from the (N, d) frozen features of its training inputs."""

    @abc.abstractmethod
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T) float32 scores per task; higher means more likely."""

    @abc.abstractmethod
    def route(
        self, features: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick tasks per row.

        Args:
            features: (B, d) frozen features.
            k: Columns to return; None for the router's own default (1, or topk's k).

        Returns:
            (indices, weights), both (B, k): long task indices (-1: no module, for rejected
            rows and columns beyond the number of tasks) and float32 weights (0 for -1).
        """

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Statistics as tensors, plus JSON-able metadata that includes `options`."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Router:
        """Rebuild a router from `state()`'s output; it makes identical decisions."""


class ScoringRouter(Router):
    """A router that scores every task and rejects rows unfamiliar to all of them.

    Rejection is split-conformal (Vovk et al. 2005; Angelopoulos & Bates 2021, section 1): with
    `reject_rate` α > 0, `add_task` holds out a seeded share of the task's rows (its
    calibration rows: `calibration_share` of them, at most `max_calibration`), fits the
    statistics on the rest only, and keeps the held-out rows. Task t's threshold τ_t is the k-th
    smallest familiarity of its n calibration rows to t, k = ⌊α (n + 1)⌋; a row is rejected when
    its familiarity to every task is below that task's τ. Since no statistic ever sees a
    calibration row, the calibration rows and the task's new inputs are exchangeable, so a new
    input of task t is rejected by t's threshold with probability k / (n + 1), in
    (α − 1 / (n + 1), α] (averaged over the held-out draw; for one draw the rate follows
    Beta(k, n + 1 − k), standard deviation about √(α / n)). Later tasks change shared
    statistics (a shared covariance), so every threshold is recomputed from the kept rows after
    every task: the promise holds at every step, not only when the task arrived. A known row
    that another task also accepts is kept, so the overall rate is at most the task's own.

    What is kept: n ≤ `max_calibration` float32 rows per task (n·d·4 bytes: 1.2 MB for 300 rows
    of MiniLM's 1,152 "auto" features). A task with fewer than ⌈1/α⌉ − 1 calibration rows
    cannot calibrate α: it warns and accepts every row (so nothing is rejected) rather than
    reject more than promised. With `reject_rate` 0 nothing is held out or kept.

    Args:
        reject_rate: α, the share of a known task's new inputs that may be rejected; 0 rejects
            nothing.
        layers: Which hidden layers the features come from: "last", "auto" or a list of depths
            (`backbones.features`). The engine computes them; features passed by hand must
            come from the same setting.
        calibration_share: Share of each task's rows held out for calibration (when α > 0).
        max_calibration: At most this many calibration rows per task.

    Raises:
        ContinualPeftError: a rate outside [0, 1), a share outside (0, 1), a non-positive cap.
    """

    def __init__(
        self,
        reject_rate: float = 0.0,
        layers: str | list[int] = "last",
        calibration_share: float = 0.2,
        max_calibration: int = 1000,
    ) -> None:
        if isinstance(reject_rate, bool) or not isinstance(reject_rate, int | float):
            raise ContinualPeftError(f"reject_rate must be a number, got {reject_rate!r}")
        if not 0.0 <= reject_rate < 1.0:
            raise ContinualPeftError(f"reject_rate must be in [0, 1), got {reject_rate}")
        if isinstance(calibration_share, bool) or not isinstance(calibration_share, int | float):
            raise ContinualPeftError(
                f"calibration_share must be a number, got {calibration_share!r}"
            )
        if not 0.0 < calibration_share < 1.0:
            raise ContinualPeftError(
                f"calibration_share must be in (0, 1), got {calibration_share}"
            )
        if isinstance(max_calibration, bool) or not isinstance(max_calibration, int):
            raise ContinualPeftError(f"max_calibration must be an integer, got {max_calibration!r}")
        if max_calibration < 1:
            raise ContinualPeftError(f"max_calibration must be >= 1, got {max_calibration}")
        self.reject_rate = float(reject_rate)
        self.calibration_share = float(calibration_share)
        self.max_calibration = max_calibration
        self.layers = check_layers(layers, f"router {self.name!r}")
        self.options = {
            "reject_rate": self.reject_rate,
            "layers": self.layers,
            "calibration_share": self.calibration_share,
            "max_calibration": self.max_calibration,
        }
        self.num_tasks = 0
        self.dim: int | None = None
        self.thresholds = torch.empty(0, dtype=torch.float64, device=self.device)  # (T,)
        # every task's held-out rows, stacked in task order, and how many each task has
        self.calibration = torch.empty(0, 0, dtype=torch.float32, device=self.device)  # (ΣN, d)
        self.calibration_sizes: list[int] = []

    @abc.abstractmethod
    def _fit(self, x: torch.Tensor) -> None:
        """Absorb task `num_tasks`'s (N, d) float64 features into the statistics."""

    @abc.abstractmethod
    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) float64 scores of (B, d) float64 features."""

    @abc.abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The subclass's statistics."""

    @abc.abstractmethod
    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `_tensors()`'s output; `num_tasks` and `dim` are already set."""

    def _familiarity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) how familiar each row looks to each task, for rejection."""
        return self._scores(x)

    def add_task(self, features: torch.Tensor) -> None:
        x = check_features(features, self.dim, f"{self.name}.add_task", self.device)
        if len(x) == 0:
            raise ContinualPeftError(f"{self.name}.add_task: a task needs at least one feature row")
        self.dim = x.shape[1]
        fit, held_out = self._split(x)
        self._fit(fit)
        self.num_tasks += 1
        if self.calibration.numel() == 0:
            self.calibration = torch.empty(0, self.dim, dtype=torch.float32, device=self.device)
        self.calibration = torch.cat([self.calibration, held_out.float()])
        self.calibration_sizes.append(len(held_out))
        self.thresholds = self._calibrate()
        if self.reject_rate > 0 and self.thresholds[-1] == -torch.inf:
            need = self._rows_needed()
            warnings.warn(
                f"{self.name}: task {self.num_tasks - 1} has {len(held_out)} calibration row(s), "
                f"too few to calibrate reject_rate {self.reject_rate} (it needs {need}: "
                f"{need / self.calibration_share:.0f} router inputs at calibration_share "
                f"{self.calibration_share}); it accepts every row, so this router rejects "
                "nothing. Give the task more router inputs, or raise reject_rate or "
                "calibration_share.",
                stacklevel=2,
            )

    def rejection(self) -> dict[str, Any]:
        """{"reject_rate": α, "familiarity": what is thresholded, "calibration_examples": per
        task, "calibration_bytes": what the kept rows take, "calibrated": per task, whether
        its threshold holds α (False: too few rows, it accepts every row)}."""
        calibrated = [bool(t > -torch.inf) for t in self.thresholds.tolist()]
        return {
            "reject_rate": self.reject_rate,
            "familiarity": getattr(self, "familiarity", "score"),
            "calibration_examples": list(self.calibration_sizes),
            "calibration_bytes": self.calibration.numel() * self.calibration.element_size(),
            "calibrated": calibrated if self.reject_rate > 0 else [False] * self.num_tasks,
        }

    def _rows_needed(self) -> int:
        """Calibration rows a task needs for k = ⌊α (n + 1)⌋ to reach 1."""
        return math.ceil(1 / self.reject_rate - 1e-9) - 1

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the statistics are fitted on, and the held-out calibration rows (float32
        precision, as they are kept): a seeded draw per task index, none when α = 0."""
        n = min(self.max_calibration, int(self.calibration_share * len(x)))
        if self.reject_rate == 0 or n == 0:
            return x, x[:0]
        order = torch.randperm(len(x), generator=Placement.generator(self.num_tasks), device=CPU)
        order = order.to(x.device)
        return x[order[n:]], x[order[:n]].float().double()

    def _calibrate(self) -> torch.Tensor:
        """(T,) every task's threshold from its calibration rows under the current statistics:
        the k-th smallest familiarity, k = ⌊α (n + 1)⌋. Where k = 0 a task keeps the threshold
        it had (a router saved before rows were kept), or -inf (accept all) when new."""
        count = self.num_tasks - len(self.thresholds)
        new = torch.full((count,), -torch.inf, dtype=torch.float64, device=self.device)
        thresholds = torch.cat([self.thresholds, new])
        if self.reject_rate == 0:
            return thresholds
        start = 0
        for task, size in enumerate(self.calibration_sizes):
            rows = self.calibration[start : start + size].double()
            start += size
            k = math.floor(self.reject_rate * (size + 1) + 1e-9)
            if k >= 1:
                own = self._familiarity(rows)[:, task]  # (n,)
                thresholds[task] = own.kthvalue(k).values
        return thresholds

    def _features(self, features: torch.Tensor, where: str) -> torch.Tensor:
        if self.num_tasks == 0:
            raise ContinualPeftError(f"{self.name}.{where}: the router has no tasks yet")
        return check_features(features, self.dim, f"{self.name}.{where}", self.device)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = self._features(features, "scores")
        return self._scores(x).to(features.device, torch.float32)

    def _rejected(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) bool: float64 features below every task's threshold."""
        if self.reject_rate == 0:
            return torch.zeros(len(x), dtype=torch.bool, device=self.device)
        return (self._familiarity(x) - self.thresholds).amax(dim=1) < 0

    def rank(self, features: torch.Tensor, k: int) -> Ranking:
        """The k best tasks per row, on the router's device; see `Ranking`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ContinualPeftError(f"{self.name}.route: k must be a positive integer, got {k!r}")
        x = self._features(features, "route")
        best, indices = self._scores(x).topk(min(k, self.num_tasks), dim=1)  # (B, k')
        pad = k - best.shape[1]
        best = F.pad(best, (0, pad), value=-torch.inf)  # (B, k)
        indices = F.pad(indices, (0, pad), value=-1)
        rejected = self._rejected(x)
        indices[rejected] = -1
        return Ranking(best, indices, rejected)

    def route(
        self, features: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ranking = self.rank(features, 1 if k is None else k)
        weights = torch.zeros(ranking.indices.shape, dtype=torch.float32, device=self.device)
        weights[:, 0] = (~ranking.rejected).float()  # hard routing: runners-up get weight 0
        return ranking.indices.to(features.device), weights.to(features.device)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            "thresholds": self.thresholds.clone(),
            "calibration": self.calibration.clone(),
            **self._tensors(),
        }
        meta = {
            "options": dict(self.options),
            "num_tasks": self.num_tasks,
            "dim": self.dim,
            "calibration_sizes": list(self.calibration_sizes),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Router:
        # a router saved before `layers` existed read the last layer
        router = build_router(cls.name, **{"layers": "last", **meta["options"]})
        assert isinstance(router, ScoringRouter)
        router.num_tasks = int(meta["num_tasks"])
        router.dim = None if meta["dim"] is None else int(meta["dim"])
        router._restore(tensors, meta)
        return router

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.thresholds = take(tensors, "thresholds", (self.num_tasks,))
        sizes = meta.get("calibration_sizes")
        if sizes is None:  # saved before calibration rows were kept: thresholds as saved
            sizes = [0] * self.num_tasks
        if len(sizes) != self.num_tasks or any(not isinstance(n, int) or n < 0 for n in sizes):
            raise ContinualPeftError(
                f"router state: calibration_sizes {sizes!r} do not fit {self.num_tasks} task(s)"
            )
        self.calibration_sizes = list(sizes)
        rows = (sum(sizes), self.dim or 0)
        kept = tensors.get("calibration", torch.zeros(rows, device=self.thresholds.device))
        self.calibration = take(tensors | {"calibration": kept}, "calibration", rows).float()
        self._load(tensors)


def scoring_router_names() -> list[str]:
    """Registered routers that score tasks themselves (topk can wrap any of them)."""
    return [name for name in ROUTERS.names() if issubclass(ROUTERS.get(name), ScoringRouter)]
