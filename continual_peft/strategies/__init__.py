"""Strategies: how a task gets its slot, and three hooks around its training.

A strategy chooses the slot for each task (`allocate`) and may act at three points, all no-ops by
default: `before_task`, `loss` (adjust each batch's loss) and `after_task` (which may return facts
for the task's record). None of them forks the engine's loop. Each task always gets its own head,
frozen after its task.

`routing` says which slots a task's rows go through, with which weights, in training and at
inference alike: by default its own slot at weight 1; O-LoRA sums every slot. `check` refuses a
configuration the strategy cannot work with, when the config is validated.

A strategy's options (`[strategy_options]` in a strategy spec, e.g. a replay buffer's size) are
its constructor's keyword arguments; `build_strategy` refuses unknown ones by name. State that
must outlive the process (a replay buffer, EWC's Fisher) goes through `state` / `load_state` and
is saved with every checkpoint as `tasks/<task>/strategy.safetensors` + `strategy.json`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TYPE_CHECKING, Any, Protocol

import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.registry import Registry

if TYPE_CHECKING:
    from continual_peft.backbones.text import Backbone
    from continual_peft.config import LearnerConfig
    from continual_peft.engine.bank import ModuleBank
    from continual_peft.engine.heads import Heads
    from continual_peft.tasks.task import Task

STRATEGIES: Registry = Registry("strategy")


class Learner(Protocol):
    """What a strategy's hooks may use of the learner they serve (the engine's
    `Learner` is one); strategies type against this, not against the engine."""

    bank: ModuleBank
    backbone: Backbone
    config: LearnerConfig
    heads: Heads
    learned: dict[str, Any]  # task name -> its learned state (`.task`, `.index`, `.slot`)

    def task_seed(self, task: Task, purpose: str) -> int: ...

    def features(self, inputs: list) -> torch.Tensor: ...


class Strategy:
    """The base strategy: every hook does nothing."""

    description = ""

    def allocate(self, learner: Learner, task: Task) -> int:
        """The slot that `task` trains and is routed to."""
        raise NotImplementedError

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        """The slots every row of `task` goes through and their weights, for training and
        inference alike (the bank sums the slots' deltas); the task's own slot by default."""
        return [learner.learned[task].slot], [1.0]

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        """Refuse a configuration this strategy cannot work with; anything goes by default."""

    def before_task(self, learner: Learner, task: Task) -> None:
        """Called before the task's slot is chosen."""

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise for one batch, given the task's own loss."""
        return loss

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any] | None:
        """Called after training, before evaluation; JSON-ready facts it returns go into the
        task's record (and report.json) under `strategy`."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-ready data to save with each checkpoint; nothing by default."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state` returned (when a run is loaded to continue or predict)."""


def strategy_options(name: str) -> dict[str, Any]:
    """The options of the strategy registered as `name`, with their defaults."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(STRATEGIES.get(name).__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.name != "self" and p.kind in kinds}


def build_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """The strategy registered as `name`, built with `options`; unknown options are refused."""
    options = dict(options or {})
    accepted = strategy_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ContinualPeftError(
            f"strategy {name!r} has no option(s) {unknown}; its options: "
            f"{', '.join(accepted) or 'none'} ([strategy_options] in a strategy spec)"
        )
    try:
        return STRATEGIES.get(name)(**options)
    except (TypeError, ValueError) as err:
        raise ContinualPeftError(f"strategy {name!r}: bad options {options}: {err}") from None


@STRATEGIES.register("per_task")
class PerTask(Strategy):
    """A fresh slot per task, frozen once the task is learned: no oracle forgetting by design."""

    description = "a fresh slot per task, frozen after it"

    def allocate(self, learner: Learner, task: Task) -> int:
        kind = learner.config.module_for(task.name)
        return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind=kind)

    def after_task(self, learner: Learner, task: Task) -> None:
        learner.bank.freeze_slot()


@STRATEGIES.register("seq")
class Sequential(Strategy):
    """One shared slot trained on every task in turn: the forgetting baseline."""

    description = "one shared slot trained on each task in turn (forgetting baseline)"

    def allocate(self, learner: Learner, task: Task) -> int:
        if learner.bank.num_slots == 0:
            return learner.bank.add_slot(seed=learner.task_seed(task, "slot"))
        return 0

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        if config.task_modules:
            raise ContinualPeftError(
                f"{where}: strategy {config.strategy!r} trains ONE shared slot for every task, "
                f"so per-task modules ([tasks.<name>] module = ...) cannot apply; got them for "
                f"{sorted(config.task_modules)}: remove them, or use strategy per_task"
            )


def _register_all() -> None:
    """Import every strategy module of this package, so each registers itself."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
