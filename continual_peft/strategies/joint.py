"""Joint training, the multi-task upper bound: one slot trained on the union of all tasks so far.

Every training example of every learned task is kept (encoded). When task i trains, the shared
slot is first reset to its initial values (`fresh_slot`, the default), and each training step
adds a share of the earlier tasks' examples to the current batch: the earlier examples are
shuffled once per epoch and split over the epoch's steps, so every epoch covers the union of
tasks 1..i exactly once, and the step's loss is the mean cross-entropy over the combined batch.
Row i of the accuracy matrix is then a model trained jointly on tasks 1..i (all tasks route to
the one slot), not a model that has seen them in turn.

Heads: each earlier example goes through its own task's head, which stays frozen after its task,
as with every strategy. A fresh slot is thus fitted to fixed earlier heads (linear read-outs that
it can adapt its features to), while the new task's head trains with it. Re-opening the earlier
heads is not possible through the hooks: the engine's optimizer holds only the slot and the new
head, and a checkpoint saves only the new task's head. So this is the joint bound of the slot
given the heads, measured against `per_task` in the tests.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.strategies.base import STRATEGIES, Strategy
from continual_peft.strategies.examples import (
    Examples,
    check_option,
    encoded_examples,
    examples_loss,
)
from continual_peft.strategies.seq import Sequential

if TYPE_CHECKING:
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task


@STRATEGIES.register("joint")
class Joint(Strategy):
    """One slot retrained on the union of every task so far (the multi-task upper bound).

    Args:
        fresh_slot: Reset the slot to its initial values before each task (a true joint model
            per row of the accuracy matrix); False keeps training the previous task's slot.
    """

    description = "upper bound: one slot retrained from its initial values on all tasks so far"
    no_budget = "retrains one shared slot on every task so far: the bank holds one slot"

    def __init__(self, fresh_slot: bool = True) -> None:
        check_option(
            "joint",
            "fresh_slot",
            fresh_slot,
            ok=isinstance(fresh_slot, bool),
            valid="true or false",
        )
        self.fresh_slot = fresh_slot
        self.kept = Examples()  # every training example of every learned task
        self.initial: list[torch.Tensor] = []  # the slot's trainable tensors when first opened
        self._rng = np.random.default_rng(0)
        self._chunks: list[np.ndarray] = []  # this epoch's earlier rows, one chunk per step
        self._current: list[int] = []  # the current task's batch size at each step of an epoch
        self._step = 0

    check = Sequential.check  # one shared slot: per-task modules cannot apply

    def allocate(self, learner: Learner, task: Task) -> int:
        if learner.bank.num_slots == 0:
            slot = learner.bank.add_slot(seed=learner.task_seed(task, "slot"))
            self.initial = [p.detach().clone() for p in learner.bank.trainable_parameters()]
            return slot
        if self.fresh_slot:
            with torch.no_grad():
                for param, start in zip(
                    learner.bank.trainable_parameters(), self.initial, strict=True
                ):
                    param.copy_(start)
        return 0

    def before_task(self, learner: Learner, task: Task) -> None:
        self._rng = np.random.default_rng(learner.task_seed(task, "joint-draw"))
        # the engine's epoch: ceil(N / batch_size) steps over array_split batches
        steps = max(1, math.ceil(len(task.train_inputs) / learner.config.train.batch_size))
        self._current = [len(c) for c in np.array_split(np.arange(len(task.train_inputs)), steps)]
        self._chunks, self._step = [], 0

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        if not len(self.kept):
            return loss
        position = self._step % len(self._current)
        if position == 0:
            order = self._rng.permutation(len(self.kept))
            self._chunks = np.array_split(order, len(self._current))
        self._step += 1
        rows = self._chunks[position].tolist()
        if not rows:
            return loss
        earlier = examples_loss(learner, self.kept.select(rows))
        current = self._current[position]
        # the mean over the combined batch: both parts weighted by their number of examples
        return (current * loss + len(rows) * earlier) / (current + len(rows))

    def after_task(self, learner: Learner, task: Task) -> None:
        new = encoded_examples(learner, task.name, task.train_inputs, task.train_labels)
        for item, label, name in zip(new.items, new.labels, new.tasks, strict=True):
            self.kept.append(item, label, name)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.kept.state("kept.")
        tensors |= {f"initial.{i}": t for i, t in enumerate(self.initial)}
        return tensors, {"kept": meta, "initial": len(self.initial)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.kept = Examples.from_state(tensors, meta["kept"], "kept.")
        self.initial = [tensors[f"initial.{i}"] for i in range(int(meta["initial"]))]
