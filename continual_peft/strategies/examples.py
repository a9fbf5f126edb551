"""Stored training examples of past tasks, for the strategies that revisit them (replay, joint).

An `Examples` store keeps encoded inputs (`Backbone.encode(...).items`: token-id lists for text,
float pixel tensors for images), label indices and task names. `examples_loss` runs stored rows
through the backbone as it is currently routed, each row through its own task's head. A store
round-trips through safetensors without pickle: token ids as a padded int tensor plus lengths,
images as one stacked float tensor, task names as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.distributed import shard_mean
from continual_peft.errors import ContinualPeftError

if TYPE_CHECKING:
    from continual_peft.strategies.base import Learner


@dataclass
class Examples:
    """Encoded examples of one or more tasks, in parallel lists."""

    items: list = field(default_factory=list)  # token-id lists or (C, H, W) float tensors
    labels: list[int] = field(default_factory=list)  # label index within the row's own task
    tasks: list[str] = field(default_factory=list)  # the task (= head) of each row

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: Any, label: int, task: str) -> None:
        self.items.append(item)
        self.labels.append(label)
        self.tasks.append(task)

    def replace(self, index: int, item: Any, label: int, task: str) -> None:
        self.items[index], self.labels[index], self.tasks[index] = item, label, task

    def select(self, rows: list[int]) -> Examples:
        """The rows at positions `rows`, in that order."""
        return Examples(
            [self.items[i] for i in rows],
            [self.labels[i] for i in rows],
            [self.tasks[i] for i in rows],
        )

    def count(self, task: str) -> int:
        return self.tasks.count(task)

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (keys start with `prefix`) and JSON-ready metadata for a checkpoint."""
        if not self.items:
            return {}, {"size": 0, "task_names": [], "kind": "empty"}
        names = list(dict.fromkeys(self.tasks))
        cpu = {"dtype": torch.int64, "device": "cpu"}  # for the file: stored inputs stay on the CPU
        tensors = {
            f"{prefix}labels": torch.tensor(self.labels, **cpu),
            f"{prefix}task_index": torch.tensor([names.index(t) for t in self.tasks], **cpu),
        }
        if isinstance(self.items[0], torch.Tensor):
            kind = "pixels"
            tensors[f"{prefix}pixels"] = torch.stack([x.detach().float().cpu() for x in self.items])
        else:
            kind = "token_ids"
            lengths = torch.tensor([len(ids) for ids in self.items], **cpu)
            ids = torch.zeros(len(self.items), int(lengths.max()), **cpu)  # (N, L)
            for row, item in enumerate(self.items):
                ids[row, : len(item)] = torch.tensor(item, **cpu)
            tensors[f"{prefix}ids"], tensors[f"{prefix}lengths"] = ids, lengths
        return tensors, {"size": len(self.items), "task_names": names, "kind": kind}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> Examples:
        """Rebuild a store from what `state` returned."""
        if meta["size"] == 0:
            return cls()
        if meta["kind"] == "pixels":
            items = list(tensors[f"{prefix}pixels"].float().cpu())  # inputs wait on the CPU
        elif meta["kind"] == "token_ids":
            ids, lengths = tensors[f"{prefix}ids"], tensors[f"{prefix}lengths"].tolist()
            items = [ids[row, :n].tolist() for row, n in enumerate(lengths)]
        else:
            raise ContinualPeftError(f"saved examples of unknown kind {meta['kind']!r}")
        names = meta["task_names"]
        tasks = [names[i] for i in tensors[f"{prefix}task_index"].tolist()]
        examples = cls(items, tensors[f"{prefix}labels"].tolist(), tasks)
        if len(examples) != meta["size"] or len(tasks) != len(items):
            raise ContinualPeftError(
                f"saved examples are damaged: {len(items)} inputs, {len(tasks)} task names, "
                f"{meta['size']} expected"
            )
        return examples


def examples_loss(learner: Learner, examples: Examples) -> torch.Tensor:
    """Mean cross-entropy of `examples`, each row through its own task's head (on a
    generative backbone: of each row's target tokens, `TaskHeads.row_loss`).

    The backbone runs as the bank is routed now (during training: the trainable slot), so the
    loss's gradient reaches that slot; earlier tasks' heads are frozen and only pass it on.
    Under torchrun each rank computes its shard of the rows (`distributed.shard_mean`), as
    for the task's own batch.
    """
    heads = learner.heads
    weights = np.asarray(heads.row_weights(examples.tasks, examples.labels), dtype=float)

    def mean_loss(rows: np.ndarray) -> torch.Tensor:
        part = examples.select(rows.tolist())
        return heads.row_loss(part.items, part.tasks, part.labels)

    return shard_mean(np.arange(len(examples)), weights, mean_loss, learner.backbone.device)


def encoded_examples(learner: Learner, task_name: str, inputs: list, labels: list[int]):
    """A task's training inputs, encoded as its head reads them (token ids in the task's
    template, on a generative backbone), as a store."""
    items = learner.heads.prompt_items(task_name, list(inputs)).items
    return Examples(items, list(labels), [task_name] * len(items))


def check_option(strategy: str, option: str, value: Any, *, ok: bool, valid: str) -> None:
    """Refuse a bad strategy option by name, with its valid range."""
    if not ok:
        raise ContinualPeftError(
            f"strategy {strategy!r}: option {option} = {value!r} is invalid; it must be {valid} "
            "([strategy_options] in a strategy spec)"
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
