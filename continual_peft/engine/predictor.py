"""Prediction with the learner's trained parts: oracle (each row's task given) or routed (a
router picks each row's task), every row of a batch through its own slots in one forward."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from continual_peft.backbones.text import Backbone
from continual_peft.config import TrainConfig
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import TaskHeads
from continual_peft.engine.inference import (
    frozen_features,
    predict_batches,
    routed_predict,
    routing_table,
)
from continual_peft.engine.progress import meter
from continual_peft.engine.state import LearnedTask
from continual_peft.errors import ContinualPeftError
from continual_peft.metrics import exact_match, rouge_l
from continual_peft.routers import Router

Routing = Callable[[str], tuple[list[int], list[float]]]  # task -> its slots and weights


class Predictor:
    """The frozen backbone, the bank and the heads, run for evaluation and prediction.

    Args:
        backbone, bank, heads: The learner's parts.
        learned: The learner's learned tasks (the same dict: it sees new tasks).
        routing: A task's slots and weights (the strategy's `routing`).
        train: The learner's training settings; rows per forward pass are its
            `eval_batch_size`, read at every use (so changing it there takes effect).
    """

    def __init__(
        self, backbone: Backbone, bank: ModuleBank, heads: TaskHeads,
        learned: dict[str, LearnedTask], routing: Routing, train: TrainConfig,
    ) -> None:  # fmt: skip
        self.backbone, self.bank, self.heads = backbone, bank, heads
        self.learned, self.routing, self.train = learned, routing, train
        # per task, the last oracle evaluation's other scores (ROUGE-L, answers that are no label)
        self.text_scores: dict[str, dict[str, float]] = {}

    @property
    def batch_size(self) -> int:
        """Rows per forward pass: the training settings' `eval_batch_size`."""
        return self.train.eval_batch_size

    def features(self, items: list, layers: str | list[int] = "last") -> torch.Tensor:
        """(N, d) frozen features of encoded items, from the hidden layers of a `layers`
        setting (a router's `layers`): what routers see."""
        return frozen_features(self.backbone, self.bank, items, self.batch_size, layers)

    def test_features(self, state: LearnedTask, layers: str | list[int]) -> torch.Tensor:
        """A task's test inputs' frozen features for a `layers` setting, computed once."""
        key = repr(layers)
        if key not in state.test_features:
            state.test_features[key] = self.features(state.feature_items, layers)
        return state.test_features[key]

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
        """The task's metric (`heads.metric`: accuracy, or exact match for generation) on its
        test set, through its routing and head (no module if `base_only`)."""
        name = state.task.name
        routing = self.bank.base_only() if base_only else self.bank.use_slots(*self.routing(name))

        def answer(items: list, rows: np.ndarray) -> list[str]:
            return self.heads.row_predict(items, [name] * len(items))

        with routing:
            answers = predict_batches(self.backbone, answer, state.test_items, self.batch_size)
        value, others = task_scores(self.heads.metric(name), answers, state.task)
        if not base_only:
            self.text_scores[name] = others
        return value

    def routed(
        self, router: Router, inputs: list, items: list, features: torch.Tensor
    ) -> tuple[list[str | None], torch.Tensor, torch.Tensor]:
        """Routed answers: label strings or texts (None if rejected), and the router's (B, k)
        task indices and weights. `items` are the inputs as encoded for `features`."""
        indices, weights = (t.cpu() for t in router.route(features))  # one copy per set
        order = list(self.learned.values())
        # each of a row's k tasks brings its own routing (m slots): k·m entries per row
        table_slots, table_weights = routing_table([self.routing(s.task.name) for s in order])
        safe, chosen = indices.clamp(min=0), (indices >= 0)[:, :, None]
        slots = torch.where(chosen, table_slots[safe], -1).flatten(1)  # (B, k·m)
        mixed = (weights[:, :, None] * table_weights[safe]).flatten(1)  # (B, k·m)
        heads = [order[t].task.name if t >= 0 else None for t in indices[:, 0].tolist()]
        rows = self._prompted(inputs, items, heads)
        answers = routed_predict(self.bank, self.heads, rows, slots, mixed, heads, self.batch_size)
        return answers, indices, weights

    def _prompted(self, inputs: list, items: list, heads: list[str | None]) -> list:
        """Each accepted row as its head's task reads it (None for rejected rows)."""
        accepted = [i for i, t in enumerate(heads) if t is not None]
        out: list = [None] * len(inputs)
        if accepted:
            rows = self.heads.prompt_rows(
                [inputs[i] for i in accepted], [heads[i] for i in accepted],
                [items[i] for i in accepted],
            )  # fmt: skip
            for i, row in zip(accepted, rows, strict=True):
                out[i] = row
        return out

    def routed_scores(self, router: Router, state: LearnedTask) -> tuple[float, float]:
        """(routed metric, routing accuracy) on a task's test set; an answer counts when it
        matches (the same label string; for generation, exact match)."""
        features = self.test_features(state, router.layers)
        answers, indices, _ = self.routed(
            router, state.task.test_inputs, state.feature_items, features
        )
        value, _ = task_scores(self.heads.metric(state.task.name), answers, state.task)
        return value, float((indices[:, 0] == state.index).double().mean())

    def logits(self, inputs: list, tasks: list[str]) -> torch.Tensor:
        """(B, C_max) logits (label scores on a generative backbone) of rows of given tasks in
        ONE forward, -inf past each row's labels."""
        slots, weights = self.rows_routing(list(tasks))
        rows = self.heads.prompt_rows(list(inputs), list(tasks))
        with torch.no_grad(), self.bank.route(slots, weights):
            return self.heads.row_logits(rows, list(tasks)).float()

    def predict(self, inputs: list, tasks: list[str]) -> list[str]:
        """Answers (label strings, or texts for generation) of rows whose tasks are given, in
        batched routed forwards."""
        if len(tasks) != len(inputs):
            raise ContinualPeftError(f"got {len(inputs)} inputs but {len(tasks)} task names")
        slots, weights = self.rows_routing(tasks)
        rows = self.heads.prompt_rows(list(inputs), list(tasks))
        with meter(f"predicting {len(rows)} input(s)", len(rows)):
            return routed_predict(
                self.bank, self.heads, rows, slots, weights, tasks, self.batch_size
            )

    def details(self, router: Router, inputs: list) -> list[dict]:
        """Router-chosen predictions, one dict per row (see `ContinualLearner.predict_details`)."""
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", 2 * len(items)):
            features = self.features(items, router.layers)
            labels, indices, weights = self.routed(router, list(inputs), items, features)
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
        key, states = repr(router.layers), self.learned.values()
        uncached = sum(len(s.test_items) for s in states if key not in s.test_features)
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
        router.add_task(self.features(router_items, router.layers))  # statistics only
        router.agree()  # under torchrun: the same statistics on every rank
        routed, routing = self.routed_accuracy(router)
        return {"oracle": oracle, "routed": routed}, routing

    def routed_accuracy(self, router: Router) -> tuple[list[float], list[float]]:
        """Per learned task, in learning order: routed accuracy and routing accuracy on its
        test set under `router` (which must know every learned task)."""
        results = [self.routed_scores(router, state) for state in self.learned.values()]
        return [r[0] for r in results], [r[1] for r in results]


def task_scores(metric: str, answers: list[str | None], task) -> tuple[float, dict[str, float]]:
    """The task's metric over its test set, and its other scores.

    "accuracy": share of answers equal to the true label string (`not_a_label`: how many
    answers are none of the task's labels, e.g. generated texts). "exact_match": share equal
    after `metrics.normalize_answer`, with `rouge_l` (`metrics.rouge_l`). A rejected row
    (None) is wrong.
    """
    truth = [task.labels[y] for y in task.test_labels]
    if metric == "exact_match":
        texts = ["" if a is None else a for a in answers]
        em = exact_match(texts, truth)
        return em, {"exact_match": em, "rouge_l": rouge_l(texts, truth)}
    labels = set(task.labels)
    value = float(np.mean([a == b for a, b in zip(answers, truth, strict=True)]))
    return value, {"not_a_label": sum(a is not None and a not in labels for a in answers)}
