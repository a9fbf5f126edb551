"""What the learner keeps per task: a learned task, a task being learned, and the backbone
settings a run records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from continual_peft.backbones.placement import dtype_name
from continual_peft.backbones.text import DEFAULT_BACKBONE, Backbone
from continual_peft.config import LearnerConfig
from continual_peft.routers import Router, build_router
from continual_peft.tasks.task import Task


@dataclass
class LearnedTask:
    """A learned task as the learner keeps it: its data, place in the order, slot, and encoded
    test inputs (with their frozen features once computed)."""

    task: Task
    index: int  # position in learning order: the router's name for the task
    slot: int
    test_items: list  # as the task's head reads them (in its template, on an LM)
    # frozen features per `layers` setting (its repr), computed once (routed runs)
    test_features: dict[str, torch.Tensor] = field(default_factory=dict)
    has_data: bool = True  # False when loaded without the task's data: it cannot be evaluated
    data_sha256: str | None = None  # its data's hash, once computed (or as a checkpoint says)
    raw_items: list | None = None  # as routers read them, where that differs from test_items

    @property
    def feature_items(self) -> list:
        """The test inputs as routers read them (bare, without the task's template)."""
        return self.test_items if self.raw_items is None else self.raw_items


@dataclass
class TaskSession:
    """A task between `begin_task` and `end_task`: what its training may change."""

    task: Task
    slot: int
    head: nn.Module  # a linear head; an empty module on an LM (nothing to train)
    params: list[nn.Parameter]  # the trainable slot's and the head's
    train_items: list  # encoded training inputs, as the head reads them
    truncated: int  # inputs cut to max_length, train and test
    adjust_loss: Callable[[torch.Tensor], torch.Tensor]  # the strategy's `loss` hook
    raw_items: list | None = None  # training inputs as routers read them, if not train_items


def record_backbone(config: LearnerConfig, backbone: Backbone) -> None:
    """Set `config.backbone` to what `backbone` really is, as config.json records it: its name
    ("" = the bundled default; a local folder by its absolute path), the max_length it really
    cuts at, and the dtype it really computes in ("auto" means bfloat16 on one machine, float32
    on another: a resumed or reloaded run keeps it)."""
    config.backbone.name = "" if backbone.name == DEFAULT_BACKBONE else backbone.name
    config.backbone.max_length = backbone.max_length
    config.backbone.dtype = dtype_name(backbone.dtype)


def backbone_for(backbone: Backbone | str | None, config: LearnerConfig) -> Backbone:
    """The learner's backbone: `backbone` if built, else loaded from it (a folder or name) or
    from `config.backbone`; `config.backbone` is then set to what it really is."""
    if not isinstance(backbone, Backbone):
        settings = config.backbone
        backbone = Backbone.from_pretrained(
            backbone or settings.name or None, settings.max_length, settings.device or None,
            settings.dtype,
        )  # fmt: skip
    record_backbone(config, backbone)
    return backbone


def make_router(config: LearnerConfig, backbone: Backbone) -> Router | None:
    """The learner's router on the backbone's device, None for oracle routing (the task is
    given: no router state at all).

    Raises:
        ContinualPeftError: router options the router refuses, or `layers` with a depth the
            backbone does not have: before any training.
    """
    if config.router == "oracle":
        return None
    router = build_router(config.router, **config.router_options).to(backbone.device)
    backbone.feature_width(router.layers)
    return router
