"""linear_probe: each task trains its head alone on the frozen backbone, the floor to beat.

A linear probe measures what the frozen features give by themselves: no module and no slot is
ever opened (`allocate` returns `NO_SLOT`), so every task's rows go through the bare backbone,
and training fits the task's linear head only (on the pooled states, by the engine's own loop:
AdamW, its schedule and clipping). A method that adapts the backbone is worth its parameters
only where it beats this. Heads are frozen after their task, so the oracle matrix has no
forgetting by construction; with a router, the router picks a task and that task's head answers.

It needs a backbone with a head to train: an encoder or an image encoder. A generative backbone
answers every task with its frozen LM head, so a linear probe has nothing to train there and is
refused once the backbone is loaded, before any run folder is made (its zero-shot floor is every
report's initial accuracy, the bare backbone's b[j]). Module settings would change nothing, so any
that differ from the defaults (a module kind, per-task modules, a kind's options) are refused
rather than silently ignored; a slot budget (`max_slots`) is refused too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from continual_peft.backbones.lm import LanguageModelBackbone
from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import MODULE_KINDS
from continual_peft.strategies.base import NO_SLOT, STRATEGIES, Strategy

if TYPE_CHECKING:
    from continual_peft.backbones.text import Backbone
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task


@STRATEGIES.register("linear_probe")
class LinearProbe(Strategy):
    """Each task's head trained alone on the frozen backbone's features: no module, no slot."""

    description = "the floor: each task trains only its linear head on the frozen backbone"
    no_budget = "opens no slot at all: there is nothing to budget"
    trains_modules = False

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        unused = []
        if config.module != LearnerConfig.module:
            unused.append(f'module = "{config.module}"')
        if config.task_modules:
            unused.append(
                f"per-task modules ([tasks.<name>] module) for {sorted(config.task_modules)}"
            )
        changed = [
            kind
            for kind in MODULE_KINDS.names()
            if config.kind_config(kind) != MODULE_KINDS.options_type(kind)()
        ]
        if changed:
            unused.append(f"options of module kind(s) {changed}")
        if unused:
            raise ContinualPeftError(
                f"{where}: strategy 'linear_probe' trains each task's head alone on the frozen "
                f"backbone, with no module, so {'; '.join(unused)} would change nothing: leave "
                "the module settings at their defaults, or use strategy per_task "
                "to train a module"
            )

    def check_backbone(self, backbone: Backbone) -> None:
        if isinstance(backbone, LanguageModelBackbone):
            raise ContinualPeftError(
                f"strategy 'linear_probe' trains each task's linear head alone, but backbone "
                f"{backbone.name!r} is a generative language model (family "
                f"{backbone.kind!r}): its frozen LM head scores every task's labels, so "
                "there is nothing to train. For the floor on this backbone, read the bare "
                "backbone's zero-shot accuracy (initial_accuracy, b[j], in any run's report), "
                "or train a module per task with strategy per_task"
            )

    def allocate(self, learner: Learner, task: Task) -> int:
        return NO_SLOT
