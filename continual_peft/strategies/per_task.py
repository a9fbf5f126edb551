"""per_task: a fresh slot per task, frozen after it (no oracle forgetting)."""

from __future__ import annotations

from continual_peft.strategies.base import STRATEGIES, Learner, Strategy
from continual_peft.tasks.task import Task


@STRATEGIES.register("per_task")
class PerTask(Strategy):
    """A fresh slot per task, frozen once the task is learned: no oracle forgetting by design."""

    description = "a fresh slot per task, frozen after it"
    no_budget = ""  # takes `max_slots`: beyond it two slots merge (`engine.budget`)

    def allocate(self, learner: Learner, task: Task) -> int:
        kind = learner.config.module_for(task.name)
        return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind=kind)

    def after_task(self, learner: Learner, task: Task) -> None:
        learner.bank.freeze_slot()
