"""Heads of encoder and image backbones: one linear classifier per task, trained with its
task's slot and frozen with it. A routed batch applies each row's own head; heads are tiny, so
rows are grouped by head rather than stacked."""

from __future__ import annotations

import torch
from torch import nn

from continual_peft.backbones.placement import CPU, MASTER_DTYPE
from continual_peft.backbones.text import Backbone, Encoded
from continual_peft.tasks.task import Task


class Heads(nn.Module):
    """One linear classifier per task.

    Args:
        backbone: The backbone whose pooled vectors the heads read; heads live on its device
            and keep float32 weights.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.hidden_size = backbone.hidden_size
        self.placement = backbone.placement
        self._backbone = [backbone]  # not a submodule: the learner owns it
        self.heads = nn.ModuleDict()
        self.labels: dict[str, list[str]] = {}

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    def add(self, task: str, num_labels: int, seed: int) -> nn.Linear:
        """A fresh trainable head for `task`, initialised from `seed` on the CPU, then placed."""
        head = nn.Linear(self.hidden_size, num_labels, device=CPU, dtype=MASTER_DTYPE)
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.02, generator=self.placement.generator(seed))
            head.bias.zero_()
        self.heads[task] = self.placement.module(head)
        return self.heads[task]

    def open(self, task: Task, seed: int) -> nn.Linear:
        """A fresh trainable head for `task` (one output per label)."""
        self.labels[task.name] = list(task.labels)
        return self.add(task.name, len(task.labels), seed)

    def restore(self, name: str, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        """A learned task's frozen head from its record and saved tensors."""
        self.labels[name] = list(record["labels"])
        self.add(name, len(record["labels"]), seed=0).load_state_dict(tensors)
        self.freeze(name)

    def freeze(self, task: str) -> None:
        self.heads[task].requires_grad_(False)

    def metric(self, task: str) -> str:
        return "accuracy"

    def mode(self, task: str) -> str:
        """How a task's rows are answered: "score" (here, always: a linear head)."""
        return "score"

    def prompt_items(self, task: str, inputs: list, where: str = "input") -> Encoded:
        """The inputs as the backbone reads them (encoders use no template)."""
        return self.backbone.encode(inputs, where)

    def logits(self, pooled: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """Each row through its own task's head.

        Args:
            pooled: (B, d) pooled states.
            tasks: The head to use for each row.

        Returns:
            (B, C_max) logits, padded with -inf past each row's own label count.
        """
        width = max(self.heads[t].out_features for t in set(tasks))
        out = pooled.new_full((len(tasks), width), float("-inf"))
        for task in dict.fromkeys(tasks):
            rows = self.placement.tensor([i for i, t in enumerate(tasks) if t == task])
            head = self.heads[task]
            out[rows, : head.out_features] = head(pooled[rows])
        return out

    def row_logits(self, items: list, tasks: list[str]) -> torch.Tensor:
        """(B, C_max) logits of encoded items through the backbone as routed, float32."""
        return self.logits(self.backbone.embed(self.backbone.collate(items)), tasks).float()

    def row_loss(self, items: list, tasks: list[str], labels: list[int]) -> torch.Tensor:
        """Mean cross-entropy of the rows' labels (indices into their tasks' labels)."""
        target = self.placement.tensor(labels, dtype=torch.long)
        return nn.functional.cross_entropy(self.row_logits(items, tasks), target)

    def row_weights(self, tasks: list[str], labels: list[int]) -> list[int]:
        """Each row's weight in `row_loss`'s mean: 1 (a mean over rows)."""
        return [1] * len(tasks)

    def row_predict(self, items: list, tasks: list[str]) -> list[str]:
        """Each row's predicted label string."""
        best = self.row_logits(items, tasks).argmax(dim=-1).tolist()
        return [self.labels[t][i] for t, i in zip(tasks, best, strict=True)]

    def prompt_rows(self, inputs: list, tasks: list[str], items: list | None = None) -> list:
        """Encoded rows for `inputs` answered by `tasks`: `items` when given (encoders read
        every task's rows alike), else the inputs encoded."""
        return items if items is not None else self.backbone.encode(list(inputs)).items

    def feature_items(self, inputs: list, where: str = "input") -> list | None:
        """The inputs as routers read them, where that differs from `prompt_items`: never
        here (None)."""
        return None

    def describe(self, task: str, scores: dict[str, dict]) -> dict:
        """What a task's record adds about its head: nothing for a linear head."""
        return {}
