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
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from continual_peft.backbones.features import check_layers
from continual_peft.backbones.placement import CPU
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

    Rejection: when task t is added, its threshold is the `reject_rate` quantile of its own
    training features' familiarity to t (by default the router's score for t). A row is rejected
    when it falls below the threshold of every task. Thresholds are fixed when their task
    arrives, on the rows the statistics were just fitted on. Scores that later tasks shift (a
    shared covariance, a refitted gate) move away from them, and new rows look less familiar than
    fitted ones, the more so the wider the features and the fewer the rows. So on new inputs of
    known tasks more than `reject_rate` are rejected: with MiniLM's "auto" features (1,152) at
    0.05, 12.4 % on the four shared tasks and 22.1 % on the dbpedia class split (prototype, on
    384 features and no shared statistics: 3.7 % and 3.2 %; benchmarks/RESULTS.md). Ask for
    0.01–0.02, and check the rate on held-out inputs of your own.

    Args:
        reject_rate: Share of in-distribution training inputs allowed to be rejected; 0 rejects
            nothing.
        layers: Which hidden layers the features come from: "last", "auto" or a list of depths
            (`backbones.features`). The engine computes them; features passed by hand must
            come from the same setting.
    """

    def __init__(self, reject_rate: float = 0.0, layers: str | list[int] = "last") -> None:
        if isinstance(reject_rate, bool) or not isinstance(reject_rate, int | float):
            raise ContinualPeftError(f"reject_rate must be a number, got {reject_rate!r}")
        if not 0.0 <= reject_rate < 1.0:
            raise ContinualPeftError(f"reject_rate must be in [0, 1), got {reject_rate}")
        self.reject_rate = float(reject_rate)
        self.layers = check_layers(layers, f"router {self.name!r}")
        self.options = {"reject_rate": self.reject_rate, "layers": self.layers}
        self.num_tasks = 0
        self.dim: int | None = None
        self.thresholds = torch.empty(0, dtype=torch.float64, device=self.device)  # (T,)

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
        self._fit(x)
        self.num_tasks += 1
        threshold = torch.tensor([-torch.inf], dtype=torch.float64, device=self.device)
        if self.reject_rate > 0:
            own = self._familiarity(x)[:, -1]  # (N,)
            threshold = torch.quantile(own, self.reject_rate).reshape(1)
        self.thresholds = torch.cat([self.thresholds, threshold])

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
        tensors = {"thresholds": self.thresholds.clone(), **self._tensors()}
        meta = {"options": dict(self.options), "num_tasks": self.num_tasks, "dim": self.dim}
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
        self._load(tensors)


def scoring_router_names() -> list[str]:
    """Registered routers that score tasks themselves (topk can wrap any of them)."""
    return [name for name in ROUTERS.names() if issubclass(ROUTERS.get(name), ScoringRouter)]
