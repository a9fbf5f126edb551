"""What learning one task changes, kept as it was before, so a failed task can be undone.

`ContinualLearner.learn` takes an `Undo` record before a task and restores it when the task fails
before its checkpoint is written: slots, the shared slot's values, heads, router, strategy state
and matrices come back exactly, so the task can be learned again.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from continual_peft.backbones.text import Backbone
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import Heads
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.state import LearnedTask
from continual_peft.routers import Router


class Undoable(Protocol):
    """What a task changes in the learner (`ContinualLearner` is one)."""

    backbone: Backbone
    bank: ModuleBank
    heads: Heads
    learned: dict[str, LearnedTask]
    records: list[dict]
    strategy: Any
    router: Router | None
    monitor: ForgettingMonitor
    saved_files: dict[str, str]


@dataclass
class Undo:
    """What learning one task changes, as it was before (see `undone_on_failure`)."""

    learned: list[str]
    records: int
    slots: int
    trainable: list[torch.Tensor]  # the shared trainable slot's values, if one is open
    strategy: object  # deep copies: strategy state (buffers, Fisher, ...), router, monitor
    router: Router | None
    monitor: ForgettingMonitor
    saved_files: dict[str, str]

    @classmethod
    def take(cls, learner: Undoable) -> Undo:
        return cls(
            learned=list(learner.learned), records=len(learner.records),
            slots=learner.bank.num_slots,
            trainable=[p.detach().clone() for p in learner.bank.trainable_parameters()],
            strategy=copy.deepcopy(learner.strategy), router=copy.deepcopy(learner.router),
            monitor=copy.deepcopy(learner.monitor), saved_files=learner.saved_files,
        )  # fmt: skip

    def restore(self, learner: Undoable) -> None:
        for name in [n for n in learner.learned if n not in self.learned]:
            del learner.learned[name]
        for name in [n for n in learner.heads.heads if n not in self.learned]:
            del learner.heads.heads[name]
        learner.bank.truncate(self.slots)
        with torch.no_grad():
            for param, value in zip(
                learner.bank.trainable_parameters(), self.trainable, strict=True
            ):
                param.copy_(value)
        del learner.records[self.records :]
        learner.strategy, learner.router, learner.monitor = self.strategy, self.router, self.monitor
        learner.backbone.eval()


@contextlib.contextmanager
def undone_on_failure(learner: Undoable) -> Iterator[None]:
    """A task that fails before its checkpoint is written (an error, a diverged loss, Ctrl-C)
    leaves the learner exactly as it was before the task: slots, the shared slot's values,
    heads, router, strategy state and matrices, so it can be learned again."""
    before = Undo.take(learner)
    try:
        yield
    except BaseException:
        if learner.saved_files is before.saved_files:  # no new checkpoint names the task
            before.restore(learner)
        raise
