"""What learning one task changes, kept as it was before, so a failed task can be undone.

`ContinualLearner.learn` takes an `Undo` before a task and, when the task fails before a
checkpoint holds it (an error, a diverged loss, Ctrl-C), restores it: slots, the shared slot's
values, heads, records, and the strategy's, router's and monitor's state come back exactly, so
the task can be learned again. A slot budget's consolidation (`engine.budget`) is undone too:
both merged slots' kinds and values, and every task's slot index.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.budget import Consolidation
from continual_peft.engine.heads import TaskHeads
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.state import LearnedTask
from continual_peft.routers import Router


@dataclass(kw_only=True)
class Undo:
    """What learning one task changes, as it was before."""

    learned: list[str]  # the tasks learned before
    task_slots: dict[str, int]  # each of them: its slot (a consolidation moves some)
    records: int  # how many records there were
    slots: int  # how many slots there were
    trainable: list[torch.Tensor]  # the shared trainable slot's values, if one is open
    derived: dict[int, dict[str, torch.Tensor]]  # slots the strategy rebuilds (merged): values
    strategy: Any  # deep copies: the strategy (buffers, Fisher, ...) and router
    router: Router | None
    monitor: ForgettingMonitor  # the learner's own, truncated back on restoring
    monitor_lengths: dict  # its lists' lengths (it only appends: a copy would cost T²)

    @classmethod
    def take(
        cls,
        *,
        bank: ModuleBank,
        learned: dict[str, LearnedTask],
        records: list[dict],
        strategy: Any,
        router: Router | None,
        monitor: ForgettingMonitor,
        derived: list[int] = (),
    ) -> Undo:
        """The state before a task: counts, the tasks' slots, the trainable slot's values, the
        values of the `derived` slots (which a strategy rewrites after a task), deep copies."""
        return cls(
            learned=list(learned),
            task_slots={name: state.slot for name, state in learned.items()},
            records=len(records),
            slots=bank.num_slots,
            trainable=[p.detach().clone() for p in bank.trainable_parameters()],
            derived={slot: copy.deepcopy(bank.slot_state(slot)) for slot in derived},
            strategy=copy.deepcopy(strategy),
            router=copy.deepcopy(router),
            monitor=monitor,
            monitor_lengths=monitor.lengths(),
        )

    def restore_parts(
        self,
        *,
        bank: ModuleBank,
        heads: TaskHeads,
        learned: dict[str, LearnedTask],
        records: list[dict],
        consolidation: Consolidation | None = None,
    ) -> None:
        """Undo the task in the learner's parts, in place: its learned entry, head, slot,
        record, the shared slot's values, the derived slots' (a merged slot) and the slots a
        budget's `consolidation` for it merged and reopened, the monitor's new entries. The
        learner takes back `strategy`, `router` and `monitor` itself."""
        for name in [n for n in learned if n not in self.learned]:
            del learned[name]
        for name in [n for n in heads.heads if n not in self.learned]:
            del heads.heads[name]
        for name, slot in self.task_slots.items():
            learned[name].slot = slot
        bank.truncate(self.slots)
        before = consolidation.before if consolidation else {}
        for slot in sorted(before, key=lambda s: s != bank.training_slot):  # a training one first
            kind, values = before[slot]
            bank.replace_slot(slot, values, kind)
        with torch.no_grad():
            for param, value in zip(bank.trainable_parameters(), self.trainable, strict=True):
                param.copy_(value)
        for slot, values in self.derived.items():
            bank.overwrite_slot(slot, values)
        del records[self.records :]
        self.monitor.truncate(self.monitor_lengths)
