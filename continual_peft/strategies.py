"""Strategies: how a task gets its slot, and three hooks around its training.

A strategy chooses the slot for each task (`allocate`) and may act at three points, all no-ops by
default: `before_task`, `loss` (adjust each batch's loss) and `after_task`. None of them forks the
engine's loop. Each task always gets its own head, frozen after its task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from continual_peft._registry import Registry

if TYPE_CHECKING:
    from continual_peft.learner import ContinualLearner
    from continual_peft.tasks import Task

STRATEGIES: Registry = Registry("strategy")


class Strategy:
    """The base strategy: every hook does nothing."""

    description = ""

    def allocate(self, learner: ContinualLearner, task: Task) -> int:
        """The slot that `task` trains and is routed to."""
        raise NotImplementedError

    def before_task(self, learner: ContinualLearner, task: Task) -> None:
        """Called before the task's slot is chosen."""

    def loss(self, learner: ContinualLearner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise for one batch, given the task's own loss."""
        return loss

    def after_task(self, learner: ContinualLearner, task: Task) -> None:
        """Called after training, before evaluation."""


@STRATEGIES.register("per_task")
class PerTask(Strategy):
    """A fresh slot per task, frozen once the task is learned: no oracle forgetting by design."""

    description = "a fresh slot per task, frozen after it"

    def allocate(self, learner: ContinualLearner, task: Task) -> int:
        kind = learner.config.module_for(task.name)
        return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind=kind)

    def after_task(self, learner: ContinualLearner, task: Task) -> None:
        learner.bank.freeze_slot()


@STRATEGIES.register("seq")
class Sequential(Strategy):
    """One shared slot trained on every task in turn: the forgetting baseline."""

    description = "one shared slot trained on each task in turn (forgetting baseline)"

    def allocate(self, learner: ContinualLearner, task: Task) -> int:
        if learner.bank.num_slots == 0:
            return learner.bank.add_slot(seed=learner.task_seed(task, "slot"))
        return 0
