"""Run configuration: small dataclasses, and the strategy spec files (`strategies/*.toml`).

A strategy spec:

    strategy = "per_task"        # a registered strategy (continual-peft list strategies)
    module = "lora"              # a registered module kind
    router = "oracle"            # only "oracle" so far: the task is given
    seed = 0
    [backbone]
    name = ""                    # local folder or model name; "" = bundled all-MiniLM-L6-v2
    max_length = 128
    [lora]                       # fields of LoRAConfig
    r = 8
    [train]                      # fields of TrainConfig
    epochs = 3
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continual_peft._spec import Section, read_toml
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.lora import LoRAConfig

ROUTERS = ["oracle"]


@dataclass
class TrainConfig:
    """How one task's module and head are trained."""

    epochs: int = 3  # passes over the task's training set
    batch_size: int = 16  # training batch size
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay (only the trainable slot and head see it)
    warmup: float = 0.1  # share of steps with linear warm-up, then linear decay to zero
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_batch_size: int = 64  # batch size for evaluation and prediction


@dataclass
class BackboneConfig:
    """Which frozen backbone."""

    name: str = ""  # local folder or model name; "" = the bundled all-MiniLM-L6-v2
    max_length: int = 128  # longer inputs are truncated (and counted in the report)
    device: str = ""  # "" = CUDA when present, else CPU


@dataclass
class LearnerConfig:
    """Everything that decides a run's numbers, besides the data."""

    strategy: str = "per_task"  # how slots are allocated and trained
    module: str = "lora"  # module kind
    router: str = "oracle"  # how inputs reach slots
    seed: int = 0  # seeds slot/head init, shuffling and dropout
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> LearnerConfig:
        """Build from a nested dict (a parsed spec), naming any bad key."""
        nested = {"backbone": BackboneConfig, "lora": LoRAConfig, "train": TrainConfig}
        top = Section(data, where, {f.name for f in dataclasses.fields(cls)})
        values: dict[str, Any] = {}
        for key in ("strategy", "module", "router"):
            values[key] = top.get(key, str, getattr(cls, key))
        values["seed"] = top.get("seed", int, 0)
        for key, kind in nested.items():
            values[key] = _fill(kind, top.get(key, dict, {}), f"{where}: [{key}]")
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        """Refuse values that cannot train, naming the key and the valid range."""
        checks = [
            ("train.epochs", self.train.epochs, self.train.epochs >= 1, ">= 1"),
            ("train.batch_size", self.train.batch_size, self.train.batch_size >= 1, ">= 1"),
            (
                "train.eval_batch_size",
                self.train.eval_batch_size,
                self.train.eval_batch_size >= 1,
                ">= 1",
            ),
            ("train.lr", self.train.lr, self.train.lr > 0, "> 0"),
            ("train.warmup", self.train.warmup, 0 <= self.train.warmup < 1, "in [0, 1)"),
            ("train.grad_clip", self.train.grad_clip, self.train.grad_clip >= 0, ">= 0"),
            ("lora.r", self.lora.r, self.lora.r >= 1, ">= 1"),
            ("lora.dropout", self.lora.dropout, 0 <= self.lora.dropout < 1, "in [0, 1)"),
            (
                "backbone.max_length",
                self.backbone.max_length,
                self.backbone.max_length >= 2,
                ">= 2",
            ),
        ]
        for key, value, ok, rule in checks:
            if not ok:
                raise ContinualPeftError(
                    f"{where}: {key} = {value!r} is invalid; it must be {rule}"
                )
        if self.router not in ROUTERS:
            raise ContinualPeftError(
                f"{where}: unknown router {self.router!r}; valid names: {ROUTERS}"
            )


def _fill(kind: type, data: dict[str, Any], where: str) -> Any:
    section = Section(data, where, {f.name for f in dataclasses.fields(kind)})
    default = kind()
    values = {}
    for f in dataclasses.fields(kind):
        expected = type(getattr(default, f.name))
        accepted = (int, float) if expected is float else expected
        values[f.name] = section.get(f.name, accepted, getattr(default, f.name))
    return kind(**values)


def load_strategy_spec(path: str | Path) -> LearnerConfig:
    """Read a strategy spec file into a LearnerConfig."""
    path = Path(path)
    return LearnerConfig.from_dict(read_toml(path), str(path))
