"""The heads interface: how each task's answer is read from the backbone.

Two kinds, one interface (`TaskHeads`), so the loop, the predictor and the strategies never ask
which backbone family they run on:

- `Heads` (`heads.linear`, encoder and image backbones): a linear layer per task from the pooled
  vector to the task's labels, trained with its task's slot and frozen with it.
- `LanguageModelHeads` (`heads.lm`, generative backbones): nothing to train; the frozen LM head
  scores each task's label strings or writes its answers.

Item-level methods (`row_loss`, `row_logits`, `row_predict`) take encoded inputs as
`prompt_items` returns them, one task name per row.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from continual_peft.backbones.text import Backbone, Encoded
from continual_peft.tasks.task import Task


class TaskHeads(Protocol):
    """What the engine and strategies use of a learner's heads."""

    heads: nn.ModuleDict  # a module per task (its state is what a checkpoint saves)
    backbone: Backbone

    def open(self, task: Task, seed: int) -> nn.Module: ...
    def restore(self, name: str, record: dict, tensors: dict[str, torch.Tensor]) -> None: ...
    def freeze(self, task: str) -> None: ...
    def metric(self, task: str) -> str: ...
    def prompt_items(self, task: str, inputs: list, where: str = "input") -> Encoded: ...
    def row_loss(self, items: list, tasks: list[str], labels: list[int]) -> torch.Tensor: ...
    def row_weights(self, tasks: list[str], labels: list[int]) -> list[int]: ...
    def row_logits(self, items: list, tasks: list[str]) -> torch.Tensor: ...
    def row_predict(self, items: list, tasks: list[str]) -> list[str]: ...
    def prompt_rows(self, inputs: list, tasks: list[str], items: list | None = None) -> list: ...
    def feature_items(self, inputs: list, where: str = "input") -> list | None: ...
    def describe(self, task: str, scores: dict[str, dict]) -> dict: ...
    def mode(self, task: str) -> str: ...
