"""Inference across tasks: frozen features, and routed prediction over a whole set of inputs.

Frozen features are the backbone's mean-pooled states with every module switched off. They never
change as tasks are learned, so the engine computes them once per input and keeps them (the
router's only input). The routed forward then sends each row to its routed slot(s) and its
top-1 task's head in one pass per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from continual_peft.backbones.text import Backbone
from continual_peft.distributed import map_shards
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import TaskHeads
from continual_peft.engine.progress import tick


@torch.no_grad()
def frozen_features(
    backbone: Backbone, bank: ModuleBank, items: list, batch_size: int,
    layers: str | list[int] = "last",
) -> torch.Tensor:  # fmt: skip
    """(N, d) pooled features of the bare backbone, in input order, float32 on its device:
    the last layer's, or (N, k·d) those of a `layers` setting (`backbones.features`).

    Each row's features are computed as at batch size 1 up to float rounding (padding is
    masked), so a row's route does not depend on the rows batched with it. Under torchrun the
    batches are shared out over the ranks and every rank gets all rows."""
    placement = backbone.placement

    def embed(rows: np.ndarray) -> torch.Tensor:
        return backbone.embed(backbone.collate([items[i] for i in rows]), layers).float()

    with bank.base_only():
        found = sharded_batches(backbone, items, batch_size, embed)
    if not found:  # no input: as wide as the features would be
        return placement.zeros(0, backbone.feature_width(layers))
    out = placement.zeros(len(items), found[0][1].shape[1])
    for rows, values in found:
        out[placement.tensor(rows, dtype=torch.long)] = values.to(out.device)
    return out


def routing_table(
    routes: list[tuple[list[int], list[float]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, weights) lists, one per task, as (T, m) tensors padded with slot -1 at weight 0
    (m: the most slots any of them uses)."""
    width = max((len(slots) for slots, _ in routes), default=1)
    # on the CPU by design: the bank reads routing there (see `ModuleBank.route`)
    slots = torch.full((len(routes), width), -1, dtype=torch.long, device="cpu")
    weights = torch.zeros(len(routes), width, device="cpu")
    for row, (task_slots, task_weights) in enumerate(routes):
        slots[row, : len(task_slots)] = torch.tensor(task_slots, dtype=torch.long, device="cpu")
        weights[row, : len(task_weights)] = torch.tensor(task_weights, device="cpu")
    return slots, weights


def routed_predict(
    bank: ModuleBank,
    heads: TaskHeads,
    items: list,
    slots: torch.Tensor,
    weights: torch.Tensor,
    head_tasks: list[str | None],
    batch_size: int,
) -> list[str | None]:
    """Each row's answer through its routed slots and head; None where the row was rejected.

    Args:
        items: Encoded inputs (`TaskHeads.prompt_rows`), one per row (None for rejected rows).
        slots: (N, k) slot per row and mixing entry, -1 for none.
        weights: (N, k) mixing weights.
        head_tasks: The head each row uses (its top-1 task), None for a rejected row.
        batch_size: Rows per forward pass.
    """
    accepted = [i for i, task in enumerate(head_tasks) if task is not None]
    result: list[str | None] = [None] * len(items)
    if not accepted:
        return result
    # routing stays on the CPU, where the bank resolves it once per batch before the forward
    slots, weights = slots[accepted].cpu(), weights[accepted].cpu()
    tasks = [head_tasks[i] for i in accepted]

    def answer(rows_items: list, rows: np.ndarray) -> list[str]:
        """A batch's answers; rows answered differently (scored labels, written text) each
        in their own routed forward, since the bank routes a whole batch at once."""
        names, answers = [tasks[i] for i in rows], [""] * len(rows)
        modes = [heads.mode(name) for name in names]
        for mode in dict.fromkeys(modes):
            group = [j for j, m in enumerate(modes) if m == mode]
            picked = torch.as_tensor(rows[group], device="cpu")
            with bank.route(slots[picked], weights[picked]):
                found = heads.row_predict([rows_items[j] for j in group], [names[j] for j in group])
            for j, text in zip(group, found, strict=True):
                answers[j] = text
        return answers

    answers = predict_batches(heads.backbone, answer, [items[i] for i in accepted], batch_size)
    for i, text in zip(accepted, answers, strict=True):
        result[i] = text
    return result


def sharded_batches(
    backbone: Backbone, items: list, batch_size: int, work: Callable[[np.ndarray], Any]
) -> list[tuple[np.ndarray, Any]]:
    """(row positions, `work(row positions)`) for each batch of inputs sorted by length (so
    padding stays small), progress ticked per row. Under torchrun the batches are shared out
    over the ranks (`distributed.map_shards`) and every rank gets every result."""

    def run(rows: np.ndarray) -> Any:
        found = work(rows)
        tick(len(rows))
        return found

    order = np.argsort([backbone.item_length(item) for item in items], kind="stable")
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    found, others = map_shards(batches, run)
    tick(sum(len(rows) for rows in others))
    return list(zip(batches, found, strict=True))


@torch.no_grad()
def predict_batches(
    backbone: Backbone,
    answer: Callable[[list, np.ndarray], list],
    items: list,
    batch_size: int,
) -> list:
    """`answer(batch_items, row_positions)` over inputs in length-sorted batches; one answer
    per row, in the original order. Under torchrun the batches are shared out over the ranks
    and every rank gets every answer."""
    answers: list = [None] * len(items)
    batches = sharded_batches(
        backbone, items, batch_size, lambda rows: answer([items[i] for i in rows], rows)
    )
    for rows, values in batches:
        for row, value in zip(rows, values, strict=True):
            answers[row] = value
    return answers


@contextlib.contextmanager
def evaluating(backbone: Backbone) -> Iterator[None]:
    """Inference mode (no dropout) for measurements, whatever loop is training; the mode the
    backbone was in comes back afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        yield
    finally:
        backbone.train(was_training)
