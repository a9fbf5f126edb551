"""Prediction with the learner's trained parts: oracle (each row's task given) or routed (a
router picks each row's task), every row of a batch through its own slots in one forward."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from continual_peft.backbones.text import Backbone
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import Heads
from continual_peft.engine.inference import (
    frozen_features,
    predict_rows,
    routed_predict,
    routing_table,
)
from continual_peft.engine.progress import meter
from continual_peft.engine.state import LearnedTask
from continual_peft.errors import ContinualPeftError
from continual_peft.routers import Router

Routing = Callable[[str], tuple[list[int], list[float]]]  # task -> its slots and weights


class Predictor:
    """The frozen backbone, the bank and the heads, run for evaluation and prediction.

    Args:
        backbone, bank, heads: The learner's parts.
        learned: The learner's learned tasks (the same dict: it sees new tasks).
        routing: A task's slots and weights (the strategy's `routing`).
        batch_size: Rows per forward pass.
    """

    def __init__(
        self, backbone: Backbone, bank: ModuleBank, heads: Heads,
        learned: dict[str, LearnedTask], routing: Routing, batch_size: int,
    ) -> None:  # fmt: skip
        self.backbone, self.bank, self.heads = backbone, bank, heads
        self.learned, self.routing, self.batch_size = learned, routing, batch_size

    def features(self, items: list) -> torch.Tensor:
        """(N, d) frozen features of encoded items: what routers see."""
        return frozen_features(self.backbone, self.bank, items, self.batch_size)

    def learned_task(self, task: str) -> LearnedTask:
        if task not in self.learned:
            raise ContinualPeftError(f"unknown task {task!r}; learned tasks: {list(self.learned)}")
        return self.learned[task]

    def rows_routing(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, m) slots and weights for rows whose tasks are given (oracle routing)."""
        names = [self.learned_task(t).task.name for t in dict.fromkeys(tasks)]  # unknown: refused
        slots, weights = routing_table([self.routing(task) for task in names])
        rows = torch.tensor([names.index(t) for t in tasks], dtype=torch.long, device="cpu")
        return slots[rows], weights[rows]

    def accuracy(self, state: LearnedTask, base_only: bool = False) -> float:
        """Oracle accuracy on a task's test set (its routing and head; no module if `base_only`)."""
        head = self.heads.heads[state.task.name]
        routing = (
            self.bank.base_only()
            if base_only
            else self.bank.use_slots(*self.routing(state.task.name))
        )
        with routing:
            preds = predict_rows(
                self.backbone, lambda batch, rows: head(self.backbone.embed(batch)),
                state.test_items, self.batch_size,
            )  # fmt: skip
        return float(np.mean(preds == np.array(state.task.test_labels)))

    def routed(
        self, router: Router, items: list, features: torch.Tensor
    ) -> tuple[list[str | None], torch.Tensor, torch.Tensor]:
        """Routed predictions: label strings (None if rejected), and the router's (B, k)
        task indices and weights."""
        indices, weights = (t.cpu() for t in router.route(features))  # one copy per set
        order = list(self.learned.values())
        # each of a row's k tasks brings its own routing (m slots): k·m entries per row
        table_slots, table_weights = routing_table([self.routing(s.task.name) for s in order])
        safe, chosen = indices.clamp(min=0), (indices >= 0)[:, :, None]
        slots = torch.where(chosen, table_slots[safe], -1).flatten(1)  # (B, k·m)
        mixed = (weights[:, :, None] * table_weights[safe]).flatten(1)  # (B, k·m)
        top = indices[:, 0].tolist()
        heads = [order[t].task.name if t >= 0 else None for t in top]
        predictions = routed_predict(
            self.backbone, self.bank, self.heads, items, slots, mixed, heads, self.batch_size
        )
        labels = [
            None if p is None else order[t].task.labels[p]
            for t, p in zip(top, predictions, strict=True)
        ]
        return labels, indices, weights

    def routed_scores(self, router: Router, state: LearnedTask) -> tuple[float, float]:
        """(routed accuracy, routing accuracy) on a task's test set; correct = same label string."""
        if state.test_features is None:
            state.test_features = self.features(state.test_items)
        labels, indices, _ = self.routed(router, state.test_items, state.test_features)
        truth = [state.task.labels[y] for y in state.task.test_labels]
        accuracy = float(np.mean([a == b for a, b in zip(labels, truth, strict=True)]))
        return accuracy, float((indices[:, 0] == state.index).double().mean())

    def logits(self, inputs: list, tasks: list[str]) -> torch.Tensor:
        """(B, C_max) logits of rows of given tasks in ONE forward, -inf past each row's labels."""
        slots, weights = self.rows_routing(list(tasks))
        batch = self.backbone.collate(self.backbone.encode(list(inputs)).items)
        with torch.no_grad(), self.bank.route(slots, weights):
            return self.heads.logits(self.backbone.embed(batch), list(tasks)).float()

    def predict(self, inputs: list, tasks: list[str]) -> list[str]:
        """Label strings of rows whose tasks are given, in batched routed forwards."""
        if len(tasks) != len(inputs):
            raise ContinualPeftError(f"got {len(inputs)} inputs but {len(tasks)} task names")
        slots, weights = self.rows_routing(tasks)
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", len(items)):
            predictions = routed_predict(
                self.backbone, self.bank, self.heads, items, slots, weights, tasks,
                self.batch_size,
            )  # fmt: skip
        labels = [self.learned_task(t).task.labels for t in tasks]
        return [names[p] for names, p in zip(labels, predictions, strict=True)]

    def details(self, router: Router, inputs: list) -> list[dict]:
        """Router-chosen predictions, one dict per row (see `ContinualLearner.predict_details`)."""
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", 2 * len(items)):
            features = self.features(items)
            labels, indices, weights = self.routed(router, items, features)
        scores = router.scores(features).cpu()
        names = list(self.learned)
        rows = []
        for i, label in enumerate(labels):
            top = [
                (names[t], round(float(w), 6))
                for t, w in zip(indices[i].tolist(), weights[i].tolist(), strict=True)
                if t >= 0
            ]
            rows.append({
                "task": top[0][0] if top else None, "label": label, "rejected": label is None,
                "score": float(scores[i].max()), "topk": [{"task": t, "weight": w} for t, w in top],
            })  # fmt: skip
        return rows

    def evaluation_rows(self, router: Router | None, router_items: list) -> int:
        """Rows `evaluate` runs through the backbone (what its progress counts)."""
        tests = [len(state.test_items) for state in self.learned.values()]
        if router is None:
            return sum(tests)
        uncached = sum(len(s.test_items) for s in self.learned.values() if s.test_features is None)
        return 2 * sum(tests) + len(router_items) + uncached

    def evaluate(
        self, router: Router | None, router_items: list
    ) -> tuple[dict[str, list[float]], list[float] | None]:
        """A new row of every matrix, after the router (if any) learns the newest task from
        `router_items`: oracle accuracy per task, and with a router routed and routing accuracy.

        Returns:
            {"oracle": [...], "routed": [...]} and the routing accuracies (None without router).
        """
        states = list(self.learned.values())
        oracle = [self.accuracy(s) for s in states]
        if router is None:
            return {"oracle": oracle}, None
        router.add_task(self.features(router_items))  # statistics only; the features go
        routed, routing = self.routed_accuracy(router)
        return {"oracle": oracle, "routed": routed}, routing

    def routed_accuracy(self, router: Router) -> tuple[list[float], list[float]]:
        """Per learned task, in learning order: routed accuracy and routing accuracy on its
        test set under `router` (which must know every learned task)."""
        results = [self.routed_scores(router, state) for state in self.learned.values()]
        return [r[0] for r in results], [r[1] for r in results]
