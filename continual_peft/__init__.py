"""continual-peft: learn a stream of tasks on a frozen transformer without forgetting.

Each task gets its own parameter-efficient module slot and head; a forgetting monitor re-evaluates
every task after each one and writes a report.
"""

from continual_peft._version import __version__ as __version__
from continual_peft.backbones.causal import CausalBackbone
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.seq2seq import Seq2SeqBackbone
from continual_peft.backbones.text import Backbone
from continual_peft.config import BackboneConfig, LearnerConfig, TrainConfig
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.learner import ContinualLearner
from continual_peft.engine.loading import load_learner
from continual_peft.errors import ContinualPeftError, CorruptFileError, RunFileError
from continual_peft.experiments.grid import run_grid
from continual_peft.experiments.runner import run_stream
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules import MODULE_KINDS
from continual_peft.modules.lora import LoRAConfig
from continual_peft.strategies import STRATEGIES, Strategy, load_strategy_spec
from continual_peft.tasks.class_split import class_split
from continual_peft.tasks.streams import Stream, load_stream
from continual_peft.tasks.task import Task, load_task

__all__ = [
    "MODULE_KINDS",
    "STRATEGIES",
    "Backbone",
    "BackboneConfig",
    "ContinualLearner",
    "ContinualPeftError",
    "CorruptFileError",
    "CausalBackbone",
    "ImageBackbone",
    "Seq2SeqBackbone",
    "LearnerConfig",
    "LoRAConfig",
    "ModuleBank",
    "RunFileError",
    "Strategy",
    "Stream",
    "Task",
    "TrainConfig",
    "class_split",
    "export_task",
    "load_learner",
    "load_strategy_spec",
    "load_stream",
    "load_task",
    "run_grid",
    "run_stream",
]
