"""Per-task heads: the interface (`interface`), linear heads of encoder and image backbones
(`linear`), the frozen LM head of generative backbones (`lm`), and the factory that picks one."""

from __future__ import annotations

from continual_peft.backbones.lm import LanguageModelBackbone
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.engine.heads.interface import TaskHeads
from continual_peft.engine.heads.linear import Heads
from continual_peft.engine.heads.lm import GENERATION, LanguageModelHeads
from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.task import Task

__all__ = ["Heads", "LanguageModelHeads", "TaskHeads", "check_kind", "check_new_task", "make_heads"]


def make_heads(backbone: Backbone, config: LearnerConfig) -> TaskHeads:
    """Linear heads on an encoder or image backbone; the LM head on a generative one."""
    if isinstance(backbone, LanguageModelBackbone):
        return LanguageModelHeads(backbone, config.generation)
    return Heads(backbone)


def check_new_task(task: Task, learned: dict, heads: TaskHeads) -> None:
    """Refuse a task the learner cannot begin: a name already learned, earlier tasks loaded
    without their data (a new task re-evaluates them), a generation task on an encoder."""
    if task.name in learned:
        raise ContinualPeftError(
            f"task {task.name!r} was already learned; task names must be unique."
        )
    missing = [name for name, state in learned.items() if not state.has_data]
    if missing:
        raise ContinualPeftError(
            f"this learner was loaded without the data of task(s) {missing}, which a new "
            "task must re-evaluate: pass them as ContinualLearner.load(..., tasks=[...])."
        )
    check_kind(task, heads)


def check_kind(task: Task, heads: TaskHeads) -> None:
    """Refuse a generation task on an encoder backbone (which cannot write text)."""
    if getattr(task, "kind", "classification") == GENERATION and isinstance(heads, Heads):
        raise ContinualPeftError(
            f"task {task.name!r} is a generation task, but this backbone "
            f"({heads.backbone.name}) is an encoder, which classifies and cannot write text; "
            "use a decoder-only or encoder-decoder model folder as the backbone (e.g. "
            "--backbone path/to/Qwen2.5-0.5B or a Flan-T5 folder)"
        )
