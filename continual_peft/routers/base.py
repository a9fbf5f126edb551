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
from continual_peft.routers.neighbours import NeighbourBank

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
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ContinualPeftError(
            f"{where}: features must be a float tensor of shape (N, d), d >= 1, got {shape}"
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


def take(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], infinite: bool = False
) -> torch.Tensor:
    """A state tensor checked for presence, shape, a floating dtype and no NaN (nor ±inf unless
    `infinite`), as float64."""
    if key not in tensors:
        raise ContinualPeftError(f"router state lacks tensor {key!r}; found {sorted(tensors)}")
    value = tensors[key]
    if tuple(value.shape) != shape:
        raise ContinualPeftError(
            f"router state tensor {key!r} has shape {tuple(value.shape)}, expected {shape}"
        )
    if not value.is_floating_point():
        raise ContinualPeftError(f"router state tensor {key!r} is {value.dtype}, not floating")
    bad = value.isnan() if infinite else ~value.isfinite()
    if bad.any():
        raise ContinualPeftError(f"router state tensor {key!r} holds NaN or infinite values")
    return value.to(torch.float64)


def conformal_rank(alpha: float, n: int) -> int:
    """k = ⌊α (n + 1)⌋: which smallest of n calibration familiarities is the split-conformal
    threshold at rate α (0: none can be)."""
    return math.floor(alpha * (n + 1) + 1e-9)


def rows_needed(alpha: float) -> int:
    """Calibration rows a task needs for `conformal_rank` to reach 1: ⌈1/α⌉ − 1."""
    return math.ceil(1 / alpha - 1e-9) - 1


def held_out_split(x: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows kept for fitting, held-out rows): a seeded draw (`Placement.generator(seed)`) of at
    most n of x's rows (dimension 0) held out. Copies of one row (a record given twice) go to
    one side together, and a held-out row is returned once: a held-out row whose copy was
    fitted would look as familiar as a fitted row, and thresholds set on such rows reject more
    new inputs than α."""
    distinct, copy_of = torch.unique(x, dim=0, return_inverse=True)  # (D, ...), (N,)
    order = torch.randperm(len(distinct), generator=Placement.generator(seed), device=CPU)
    order = order.to(x.device)
    copies = torch.bincount(copy_of, minlength=len(distinct))[order]
    held = order[: int((copies.cumsum(0) <= n).sum())]  # whole groups, n rows at most
    is_held = torch.zeros(len(distinct), dtype=torch.bool, device=x.device)
    is_held[held] = True
    return x[~is_held[copy_of]], distinct[held]


# at most this many sweeps over the tasks when solving the thresholds together (`_calibrate`)
CALIBRATION_SWEEPS = 50


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
    # the width of one layer's block of those features (the backbone's hidden size); the
    # engine sets it, and "knn" familiarity normalises each block on its own
    block_width: int | None = None

    def to(self, device: str | torch.device) -> Router:
        """Move the statistics to `device` (and compute there from now on); returns self."""
        target = torch.device(device)
        tensors, meta = self.state()
        moved = {key: value.to(target) for key, value in tensors.items()}  # fails: unchanged
        self.device = target
        self._restore(moved, meta)
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

    def task_rows(self) -> dict[str, list[int]]:
        """The tensors of `state()` that are stacked per task on dimension 0 and whose rows
        never change once their task is added: name -> rows per task, in task order.

        A checkpoint stores each task's rows once, in that task's own folder, and only the
        rest of the state (which later tasks change, such as a shared covariance) is
        rewritten after every task (`routers.persist.split_rows`). None by default."""
        return {}

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
    smallest familiarity of its n calibration rows to t, k = ⌊α (n + 1)⌋, and a row is rejected
    when its familiarity to every task is below that task's τ. No statistic ever sees a
    calibration row, so the calibration rows and the task's new inputs are exchangeable: a new
    input of task t falls below τ_t with probability k / (n + 1), in (α − 1 / (n + 1), α],
    averaged over the held-out draw (for one draw the rate follows Beta(k, n + 1 − k), whose
    standard deviation is about √(α / n): 0.44 points at α = 0.02 and n = 1,000). That assumes
    the task's new inputs are drawn as its training inputs were.

    Two things would break the promise, and both are handled with the kept rows. Later tasks
    change shared statistics (a shared covariance), so every threshold is recomputed after
    every task. And a row of task t that another task accepts is kept, so where tasks overlap
    (same-domain tasks) thresholds set on each task alone reject fewer than α; they are solved
    together instead (`_calibrate`).

    What a row's familiarity to a task is (`familiarity`): "knn" (every scoring router's
    default), minus the distance to the k-th nearest of the task's kept fitted rows on
    per-layer-normalised features (Sun et al. 2022; `routers.neighbours`), which told unknown
    tasks from known ones best on the shared streams (benchmarks/RESULTS.md); or a score of the
    router's own (`own_familiarities`: prototype's cosine, the Gaussians' Mahalanobis
    distances).

    What is kept, only when α > 0: n ≤ `max_calibration` float32 calibration rows per task
    (n·d·4 bytes), and for "knn" at most `knn_rows` float16 fitted rows per task (·d·2 bytes):
    4.6 MB and 2.3 MB per task at the defaults on MiniLM's 1,152 "auto" features. A task with
    fewer than ⌈1/α⌉ − 1 calibration rows cannot calibrate α: it warns and accepts every row
    (so nothing is rejected) rather than reject more than promised.

    Args:
        reject_rate: α, the share of a known task's new inputs that may be rejected; 0 rejects
            nothing.
        layers: Which hidden layers the features come from: "last", "auto" or a list of depths
            (`backbones.features`). The engine computes them; features passed by hand must
            come from the same setting.
        familiarity: What rejection thresholds: "knn" or one of `own_familiarities`.
        calibration_share: Share of each task's rows held out for calibration (when α > 0).
        max_calibration: At most this many calibration rows per task.
        knn_k: For "knn": the k-th nearest kept row counts.
        knn_rows: For "knn": fitted rows kept per task at most.

    Raises:
        ContinualPeftError: a rate outside [0, 1), a share outside (0, 1), an unknown
            familiarity, a count below 1.
    """

    # familiarities of the router's own (besides "knn"); the first is what a router saved
    # before `familiarity` existed thresholded
    own_familiarities: ClassVar[tuple[str, ...]] = ("score",)

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
        if reject_rate > 0 and max_calibration < (need := rows_needed(reject_rate)):
            raise ContinualPeftError(
                f"reject_rate {reject_rate:g} needs at least {need} calibration rows per task "
                f"(⌈1/reject_rate⌉ − 1), but max_calibration is {max_calibration}: raise "
                f"max_calibration to {need}, or reject_rate to at least "
                f"{1 / (max_calibration + 1):.3g}"
            )
        valid = ("knn", *self.own_familiarities)
        if familiarity not in valid:
            raise ContinualPeftError(
                f"unknown familiarity {familiarity!r}; valid choices for {self.name}: "
                f"{', '.join(valid)}"
            )
        self.reject_rate = float(reject_rate)
        self.familiarity = familiarity
        self.calibration_share = float(calibration_share)
        self.max_calibration = max_calibration
        self.neighbours = NeighbourBank(knn_k, knn_rows, self.device)
        self.layers = check_layers(layers, f"router {self.name!r}")
        self.options = {
            "reject_rate": self.reject_rate,
            "layers": self.layers,
            "familiarity": familiarity,
            "calibration_share": self.calibration_share,
            "max_calibration": self.max_calibration,
            "knn_k": knn_k,
            "knn_rows": knn_rows,
        }
        self.num_tasks = 0
        self.dim: int | None = None
        self.thresholds = torch.empty(0, dtype=torch.float64, device=self.device)  # (T,)
        # every task's held-out rows, stacked in task order, and how many each task has
        self.calibration = torch.empty(0, 0, dtype=torch.float32, device=self.device)  # (ΣN, d)
        self.calibration_sizes: list[int] = []
        # per task: its calibration rows' (n, T) familiarity, kept while it cannot change
        self._held: list[torch.Tensor] = []

    @property
    def block_width(self) -> int | None:
        """Width of one layer's block in the features (the backbone's hidden size, set by the
        engine), for "knn"'s per-block normalisation; None: the row is one block."""
        return self.neighbours.block_width

    @block_width.setter
    def block_width(self, width: int | None) -> None:
        self.neighbours.block_width = width

    @abc.abstractmethod
    def _fit(self, x: torch.Tensor) -> None:
        """Absorb task `num_tasks`'s (N, d) float64 features into the statistics."""

    @abc.abstractmethod
    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) float64 scores of (B, d) float64 features."""

    @abc.abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The subclass's statistics."""

    def _task_rows(self) -> dict[str, list[int]]:
        """Which of `_tensors()` are stacked per task (see `Router.task_rows`)."""
        return {}

    def task_rows(self) -> dict[str, list[int]]:
        rows = {"calibration": list(self.calibration_sizes)}
        if self.neighbours.sizes:  # fitted rows kept for "knn" familiarity
            rows["neighbours"] = list(self.neighbours.sizes)
        return rows | self._task_rows()

    @abc.abstractmethod
    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `_tensors()`'s output; `num_tasks` and `dim` are already set."""

    def _own_familiarity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) the router's own familiarity (`own_familiarities`); its scores by default."""
        return self._scores(x)

    @property
    def _task_local(self) -> bool:
        """Whether a row's familiarity to a task depends on that task's rows alone (so later
        tasks never change it)."""
        return self.familiarity == "knn"

    def _familiarity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) how familiar each row looks to each task, for rejection."""
        if self.familiarity == "knn":
            return self.neighbours.familiarity(x)
        return self._own_familiarity(x)

    def add_task(self, features: torch.Tensor) -> None:
        x = check_features(features, self.dim, f"{self.name}.add_task", self.device)
        if len(x) == 0:
            raise ContinualPeftError(f"{self.name}.add_task: a task needs at least one feature row")
        self.dim = x.shape[1]
        fit, held_out = self._split(x)
        self._fit(fit)
        if self.reject_rate > 0 and self.familiarity == "knn":
            self.neighbours.add(fit)
        self.num_tasks += 1
        if self.calibration.numel() == 0:
            self.calibration = torch.empty(0, self.dim, dtype=torch.float32, device=self.device)
        self.calibration = torch.cat([self.calibration, held_out.float()])
        self.calibration_sizes.append(len(held_out))
        self.thresholds = self._calibrate()
        if self.reject_rate > 0 and self._rank(len(held_out)) == 0:
            need = rows_needed(self.reject_rate)
            warnings.warn(
                f"{self.name}: task {self.num_tasks - 1} has {len(held_out)} calibration row(s), "
                f"too few to calibrate reject_rate {self.reject_rate} (it needs {need}: "
                f"{math.ceil(need / self.calibration_share)} router inputs at "
                f"calibration_share {self.calibration_share}); it accepts every row, so this "
                "router rejects nothing. Give the task more router inputs, or raise "
                "reject_rate or calibration_share.",
                stacklevel=2,
            )

    def rejection(self) -> dict[str, Any]:
        """{"reject_rate": α, "familiarity": what is thresholded, "calibration_examples": per
        task, "kept_bytes": what the kept rows take (calibration and neighbour rows),
        "calibrated": per task, whether its threshold holds α (False: too few rows, it
        accepts every row)}."""
        calibrated = [self.reject_rate > 0 and self._rank(n) > 0 for n in self.calibration_sizes]
        kept = self.calibration.numel() * self.calibration.element_size()
        return {
            "reject_rate": self.reject_rate,
            "familiarity": self.familiarity,
            "calibration_examples": list(self.calibration_sizes),
            "kept_bytes": kept + self.neighbours.nbytes(),
            "calibrated": calibrated,
        }

    def _rank(self, n: int) -> int:
        return conformal_rank(self.reject_rate, n)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the statistics are fitted on, and the held-out calibration rows (float32
        precision, as they are kept): `held_out_split` seeded by the task index, none when
        α = 0."""
        n = min(self.max_calibration, int(self.calibration_share * len(x)))
        if self.reject_rate == 0 or n == 0:
            return x, x[:0]
        fit, held = held_out_split(x, n, self.num_tasks)
        return fit, held.float().double()

    def _held_familiarity(self) -> list[torch.Tensor]:
        """Per task, its calibration rows' (n, T) familiarity under the current statistics;
        with a task-local familiarity only the new task's row and column are computed."""
        if not self._task_local:
            self._held = []
        starts = [sum(self.calibration_sizes[:t]) for t in range(self.num_tasks)]
        rows = [
            self.calibration[start : start + size].double()
            for start, size in zip(starts, self.calibration_sizes, strict=True)
        ]
        known = len(self._held)
        new = range(known, self.num_tasks)
        for task, held in enumerate(self._held):  # older tasks' rows: only the new columns
            if self.familiarity == "knn":
                extra = self.neighbours.familiarity(rows[task], new)
            else:
                extra = self._familiarity(rows[task])[:, known:]
            self._held[task] = torch.cat([held, extra], dim=1)
        self._held += [self._familiarity(rows[task]) for task in new]
        return self._held

    def _calibrate(self) -> torch.Tensor:
        """(T,) every task's threshold from the kept rows under the current statistics.

        A row is rejected when it is below every task's threshold, so a task's rows that
        another task accepts are kept; each threshold set on its own task's rows alone would
        then reject fewer than α wherever tasks overlap. So they are solved together: task
        t's threshold is the k-th smallest, k = ⌊α (n + 1)⌋, of its held-out rows'
        familiarity to t among the rows every other task rejects (+inf when fewer than k are:
        t then rejects whatever the others reject), in sweeps over the tasks until no
        threshold moves (at most `CALIBRATION_SWEEPS`). Where k = 0 a task keeps the
        threshold it had (a router saved before rows were kept), or -inf (accept all) when new.
        """
        count = self.num_tasks - len(self.thresholds)
        new = torch.full((count,), -torch.inf, dtype=torch.float64, device=self.device)
        thresholds = torch.cat([self.thresholds, new])
        if self.reject_rate == 0:
            return thresholds
        held = [
            (task, self._rank(len(familiarity)), familiarity)
            for task, familiarity in enumerate(self._held_familiarity())
            if self._rank(len(familiarity)) >= 1
        ]
        for _ in range(CALIBRATION_SWEEPS):
            before = thresholds.clone()
            for task, k, familiarity in held:
                below = familiarity < thresholds  # (n, T)
                below[:, task] = True
                rejected_by_others = below.all(dim=1)
                own = familiarity[:, task].masked_fill(~rejected_by_others, torch.inf)
                thresholds[task] = own.kthvalue(k).values
            if torch.equal(before, thresholds):
                break
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
        return (self._familiarity(x) < self.thresholds).all(dim=1)

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
            **self.neighbours.tensors(),
            **self._tensors(),
        }
        meta = {
            "options": dict(self.options),
            "num_tasks": self.num_tasks,
            "dim": self.dim,
            "calibration_sizes": list(self.calibration_sizes),
            "neighbour_sizes": list(self.neighbours.sizes),
            "block_width": self.block_width,
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Router:
        # a router saved before `layers` existed read the last layer; one saved before
        # `familiarity` existed thresholded its own score
        legacy = {"layers": "last", "familiarity": cls.own_familiarities[0]}
        router = build_router(cls.name, **{**legacy, **meta["options"]})
        assert isinstance(router, ScoringRouter)
        router.num_tasks = int(meta["num_tasks"])
        router.dim = None if meta["dim"] is None else int(meta["dim"])
        router._restore(tensors, meta)
        return router

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        # a threshold may be -inf (its task accepts every row) or +inf (it rejects whatever
        # the other tasks reject)
        self.thresholds = take(tensors, "thresholds", (self.num_tasks,), infinite=True)
        width = meta.get("block_width")
        if width is not None and (
            isinstance(width, bool) or not isinstance(width, int) or width < 1
        ):
            raise ContinualPeftError(f"block_width must be a positive integer, got {width!r}")
        if width is not None and self.dim and self.dim % width:
            raise ContinualPeftError(f"block_width {width} does not divide the width {self.dim}")
        self.block_width = width
        self.calibration_sizes = _sizes(meta, "calibration_sizes", self.num_tasks)
        rows = (sum(self.calibration_sizes), self.dim or 0)
        kept = tensors.get("calibration", torch.zeros(rows, device=self.thresholds.device))
        self.calibration = take(tensors | {"calibration": kept}, "calibration", rows).float()
        sizes = _sizes(meta, "neighbour_sizes", self.num_tasks, allow_empty=True)
        self.neighbours.load(tensors, sizes, self.dim or 0)
        self._held = []
        self._load(tensors)
        open_tasks = [t for t, limit in enumerate(self.thresholds.tolist()) if limit == -math.inf]
        if self.reject_rate > 0 and open_tasks:
            warnings.warn(
                f"{self.name}: task(s) {open_tasks} (by index) had too few calibration rows to "
                f"hold reject_rate {self.reject_rate}: they accept every row, so this router "
                "rejects nothing",
                stacklevel=2,
            )


def _sizes(meta: dict[str, Any], key: str, tasks: int, allow_empty: bool = False) -> list[int]:
    """Rows kept per task under `key` in a router's saved meta; zeros for a router saved before
    they were kept (none for neighbours, which only "knn" with α > 0 keeps)."""
    sizes = meta.get(key)
    if sizes is None:
        return [] if allow_empty else [0] * tasks
    counts_fit = len(sizes) == tasks or (allow_empty and not sizes)
    if not counts_fit or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise ContinualPeftError(f"router state: {key} {sizes!r} do not fit {tasks} task(s)")
    return list(sizes)


def scoring_router_names() -> list[str]:
    """Registered routers that score tasks themselves (topk can wrap any of them)."""
    return [name for name in ROUTERS.names() if issubclass(ROUTERS.get(name), ScoringRouter)]
