"""What the learner keeps per task (a learned task, a task being learned), and how its backbone
and router are built from a configuration."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import dtype_name
from continual_peft.backbones.quantization import Quantization
from continual_peft.backbones.text import DEFAULT_BACKBONE, Backbone
from continual_peft.config import QUANT_KEYS, BackboneConfig, LearnerConfig
from continual_peft.engine.heads import TaskHeads
from continual_peft.errors import ContinualPeftError
from continual_peft.routers import Router, build_router
from continual_peft.store.checkpoint import TaskEntry
from continual_peft.store.digests import task_digest
from continual_peft.tasks.task import Task


@dataclass(kw_only=True)
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


def learned_from(
    entry: TaskEntry, index: int, record: dict, task: Task | None, heads: TaskHeads
) -> LearnedTask:
    """A checkpoint's task entry as a learned task: with its data when `task` is given, else
    its name and labels only (it predicts; a new task, which re-evaluates it, is refused).

    Raises:
        ContinualPeftError: `task` has other data than the run learned.
    """
    if task is not None and task_digest(task) != entry.data_sha256:
        raise ContinualPeftError(
            f"the task {entry.name!r} given has other data than the one the run learned "
            "(its data hash differs); pass the same task."
        )
    if task is None:
        bare = Task.without_data(entry.name, list(record["labels"]))
        state = LearnedTask(task=bare, index=index, slot=entry.slot, test_items=[], has_data=False)
    else:
        items = heads.prompt_items(entry.name, task.test_inputs).items
        state = LearnedTask(task=task, index=index, slot=entry.slot, test_items=items)
        state.raw_items = heads.feature_items(task.test_inputs)
    state.data_sha256 = entry.data_sha256
    return state


@dataclass(kw_only=True)
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


def build_backbone(settings: BackboneConfig, name: str | None = None) -> Backbone:
    """The backbone `settings` describe (or the model `name`, a folder or name, in its place):
    the one place a backbone is built from a configuration."""
    return Backbone.from_pretrained(
        name or settings.name or None,
        settings.max_length,
        settings.device or None,
        settings.dtype,
        Quantization.of(settings),
    )


def resolve_backbone(
    backbone: Backbone | str | None, config: LearnerConfig
) -> tuple[Backbone, LearnerConfig]:
    """The learner's backbone (`backbone` if built, else loaded from it or from
    `config.backbone`) and the configuration as a run records it, a new value: the backbone's
    name ("" = the bundled default; a local folder by its absolute path), the max_length it
    really cuts at, the dtype it really computes in ("auto" means bfloat16 on one machine,
    float32 on another: a resumed or reloaded run keeps it) and how its weights are quantized
    (a folder saved quantized loads as it was saved)."""
    if not isinstance(backbone, Backbone):
        backbone = build_backbone(config.backbone, backbone)
    else:
        _check_given_quantization(backbone, config)
    settings = dataclasses.replace(
        config.backbone,
        name="" if backbone.name == DEFAULT_BACKBONE else backbone.name,
        max_length=backbone.max_length,
        dtype=dtype_name(backbone.dtype),
        **quantization_settings(backbone.quantization),
    )
    return backbone, dataclasses.replace(copy.deepcopy(config), backbone=settings)


def _check_given_quantization(backbone: Backbone, config: LearnerConfig) -> None:
    """Refuse a built backbone whose quantization differs from the one the config asks for
    (the config would be silently ignored); a config that asks for none takes the backbone's."""
    asked = Quantization.of(config.backbone)
    if asked is not None and asked != backbone.quantization:
        given = backbone.quantization_name
        raise ContinualPeftError(
            f"the configuration asks for a backbone quantized {asked.describe()} (quantize = "
            f"{asked.name!r}), but the backbone given is quantized "
            f"{given if backbone.quantization else 'none (full precision)'}; a "
            "built backbone is used as it is: load it with those settings "
            "(Backbone.from_pretrained(..., quantization=...)), or pass its folder instead"
        )


def quantization_settings(quantization: Quantization | None) -> dict[str, Any]:
    """The `BackboneConfig` fields that record `quantization` (the defaults for none)."""
    default = BackboneConfig()
    if quantization is None:
        return {key: getattr(default, key) for key in ("quantize", *QUANT_KEYS)}
    four = quantization.bits == 4
    return {
        "quantize": quantization.name,
        "quant_type": quantization.quant_type if four else default.quant_type,
        "double_quant": quantization.double_quant if four else default.double_quant,
        "int8_threshold": default.int8_threshold if four else quantization.int8_threshold,
        "quant_skip": list(quantization.skip),
    }


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
    router.block_width = backbone.hidden_size  # its features are blocks of the hidden width
    return router
