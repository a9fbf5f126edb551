"""seq: one shared slot trained on every task in turn, the forgetting baseline."""

from __future__ import annotations

from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.base import STRATEGIES, Learner, Strategy
from continual_peft.tasks.task import Task


@STRATEGIES.register("seq")
class Sequential(Strategy):
    """One shared slot trained on every task in turn: the forgetting baseline."""

    description = "one shared slot trained on each task in turn (forgetting baseline)"
    no_budget = "trains one shared slot for every task: the bank never holds more than one"

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
