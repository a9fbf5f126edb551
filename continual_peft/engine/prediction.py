"""Prediction with the learner's trained parts: frozen features, the routed forward over a whole
set of inputs, and the `Predictor` that runs them for evaluation (oracle: each row's task given;
routed: a router picks each row's task).

Frozen features are the backbone's mean-pooled states with every module switched off. They never
change as tasks are learned, so the engine computes them once per input and keeps them (the
router's only input). The routed forward then sends each row to its routed slot(s) and its
top-1 task's head in one pass per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from continual_peft.backbones.text import Backbone
from continual_peft.config import TrainConfig
from continual_peft.distributed import map_shards
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads.interface import TaskHeads
from continual_peft.engine.monitor import Rejection
from continual_peft.engine.progress import meter, tick
from continual_peft.engine.state import LearnedTask
from continual_peft.errors import ContinualPeftError
from continual_peft.metrics import exact_match, rouge_l
from continual_peft.routers import Router
from continual_peft.strategies.base import Fallback

FALLBACK_MODE = "route_or_merge"  # the report's routed column with the fallback applied


@torch.no_grad()
def frozen_features(
    backbone: Backbone,
    bank: ModuleBank,
    items: list,
    batch_size: int,
    layers: str | list[int] = "last",
) -> torch.Tensor:
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
    _, first = found[0]  # (row positions, their features)
    out = placement.zeros(len(items), first.shape[1])
    for rows, values in found:
        out[placement.tensor(rows, dtype=torch.long)] = values.to(out.device)
    return out


def routing_table(
    routes: list[tuple[list[int], list[float]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, weights) lists, one per task, as (T, m) tensors padded with slot -1 at weight 0
    (m: the most slots any of them uses, at least 1; a task with no slot is all -1)."""
    width = max([1, *(len(slots) for slots, _ in routes)])
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
    *,
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


Routing = Callable[[str], tuple[list[int], list[float]]]  # task -> its slots and weights
# rows per router call: a router's float64 temporaries ((rows, d) whitened features, (rows, T)
# scores) stay this size however many rows a re-evaluation of hundreds of tasks routes
ROUTE_CHUNK = 1024


def in_chunks(
    call: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], features: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`call` over (N, d) features in chunks of `ROUTE_CHUNK` rows, its outputs (each (N, ...))
    joined on the CPU. Routers decide each row alone, so this equals one call on all rows."""
    parts = [
        call(features[start : start + ROUTE_CHUNK])
        for start in range(0, len(features), ROUTE_CHUNK)
    ]
    if not parts:
        parts = [call(features)]
    return tuple(torch.cat([part[i].cpu() for part in parts]) for i in range(len(parts[0])))


Picks = list[tuple[LearnedTask, list[int]]]  # measured tasks, each with its test rows


class RoutedScore(NamedTuple):
    """A task's test set under a router."""

    metric: float  # the task's metric on the routed answers (accuracy, or exact match)
    routing: float  # share of rows whose top-1 task is the task itself
    rejected: float  # share of rows the router rejected (counted wrong in `metric`)
    accepted: float  # the metric over the accepted rows only; NaN when none was
    fallback: float = float("nan")  # the metric with route-or-merge's fallback (NaN: none)


class Predictor:
    """The frozen backbone, the bank and the heads, run for evaluation and prediction.

    Args:
        backbone, bank, heads: The learner's parts.
        learned: The learner's learned tasks (the same dict: it sees new tasks).
        routing: A task's slots and weights (the strategy's `routing`).
        fallback: Where rejected or unsure routed rows go (the strategy's `fallback`; None:
            nowhere, a rejected row gets no answer).
        train: The learner's training settings; rows per forward pass are its
            `eval_batch_size`, read at every use (so changing it there takes effect).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        bank: ModuleBank,
        heads: TaskHeads,
        learned: dict[str, LearnedTask],
        routing: Routing,
        train: TrainConfig,
        fallback: Callable[[], Fallback | None] = lambda: None,
    ) -> None:
        self.backbone, self.bank, self.heads = backbone, bank, heads
        self.learned, self.routing, self.train = learned, routing, train
        self.fallback = fallback
        # per task, the last oracle evaluation's other scores (ROUGE-L, answers that are no label)
        self.text_scores: dict[str, dict[str, float]] = {}

    @property
    def batch_size(self) -> int:
        """Rows per forward pass: the training settings' `eval_batch_size`."""
        return self.train.eval_batch_size

    def features(self, items: list, layers: str | list[int] = "last") -> torch.Tensor:
        """(N, d) frozen features of encoded items, from the hidden layers of a `layers`
        setting (a router's `layers`): what routers see."""
        return frozen_features(
            self.backbone, self.bank, items, batch_size=self.batch_size, layers=layers
        )

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
        position = {name: i for i, name in enumerate(names)}
        rows = torch.tensor([position[t] for t in tasks], dtype=torch.long, device="cpu")
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
        indices, weights = in_chunks(router.route, features)
        order = list(self.learned.values())
        # each of a row's k tasks brings its own routing (m slots): k·m entries per row
        table_slots, table_weights = routing_table([self.routing(s.task.name) for s in order])
        safe, chosen = indices.clamp(min=0), (indices >= 0)[:, :, None]
        slots = torch.where(chosen, table_slots[safe], -1).flatten(1)  # (B, k·m)
        mixed = (weights[:, :, None] * table_weights[safe]).flatten(1)  # (B, k·m)
        heads = [order[t].task.name if t >= 0 else None for t in indices[:, 0].tolist()]
        rows = self._prompted(inputs, items, heads)
        answers = routed_predict(
            self.bank,
            self.heads,
            rows,
            slots=slots,
            weights=mixed,
            head_tasks=heads,
            batch_size=self.batch_size,
        )
        return answers, indices, weights

    def fall_back(
        self,
        router: Router,
        inputs: list,
        items: list,
        features: torch.Tensor,
        answers: list[str | None],
        fallback: Fallback,
    ) -> tuple[list[str | None], list[str | None]]:
        """Route-or-merge: `routed`'s answers with every row the router rejected (None) or
        whose top-two task scores differ by less than `fallback.margin` answered again through
        `fallback.slots` and its best-scoring task's head; also, per row, the task whose head
        answered a row that fell back (None for the others)."""
        (scores,) = in_chunks(lambda x: (router.scores(x).double(),), features)  # (B, T)
        best = scores.topk(min(2, scores.shape[1]), dim=1)
        gap = best.values[:, 0] - best.values[:, -1] if scores.shape[1] > 1 else None
        unsure = [
            i
            for i, answer in enumerate(answers)
            if answer is None or (gap is not None and float(gap[i]) < fallback.margin)
        ]
        fell: list[str | None] = [None] * len(answers)
        if not unsure:
            return list(answers), fell
        names = [state.task.name for state in self.learned.values()]
        heads = [names[int(best.indices[i, 0])] for i in unsure]
        rows = self._prompted([inputs[i] for i in unsure], [items[i] for i in unsure], heads)
        count = len(unsure)
        slots = torch.tensor([fallback.slots] * count, dtype=torch.long, device="cpu")
        weights = torch.tensor([fallback.weights] * count, dtype=torch.float32, device="cpu")
        found = routed_predict(
            self.bank,
            self.heads,
            rows,
            slots=slots,
            weights=weights,
            head_tasks=heads,
            batch_size=self.batch_size,
        )
        merged = list(answers)
        for i, answer, head in zip(unsure, found, heads, strict=True):
            merged[i], fell[i] = answer, head
        return merged, fell

    def _prompted(self, inputs: list, items: list, heads: list[str | None]) -> list:
        """Each accepted row as its head's task reads it (None for rejected rows)."""
        accepted = [i for i, t in enumerate(heads) if t is not None]
        out: list = [None] * len(inputs)
        if accepted:
            rows = self.heads.prompt_rows(
                [inputs[i] for i in accepted],
                [heads[i] for i in accepted],
                [items[i] for i in accepted],
            )
            for i, row in zip(accepted, rows, strict=True):
                out[i] = row
        return out

    def routed_scores(self, router: Router, state: LearnedTask) -> RoutedScore:
        """Routed metric and routing accuracy on a task's test set; an answer counts when it
        matches (the same label string; for generation, exact match)."""
        return self.routed_results(router, [(state, list(range(len(state.test_items))))])[0]

    def routed_results(self, router: Router, picks: Picks) -> list[RoutedScore]:
        """`RoutedScore` of each picked task on its picked test rows: every row of every task
        routed by ONE `router.route` call and answered in one routed forward (and one fallback
        pass); each row is routed and answered as it would be alone."""
        if not picks:
            return []
        parts = []
        for state, rows in picks:
            features = self.test_features(state, router.layers)  # (N_task, d), kept per task
            if len(rows) != len(features):
                features = features[torch.as_tensor(rows, dtype=torch.long, device=features.device)]
            parts.append(features)
        features = torch.cat(parts)  # (N, d): the picked rows of every task, in pick order
        inputs = [state.task.test_inputs[i] for state, rows in picks for i in rows]
        items = [state.feature_items[i] for state, rows in picks for i in rows]
        answers, indices, _ = self.routed(router, inputs, items, features)
        fallback, merged = self.fallback(), None
        if fallback is not None:
            merged, _ = self.fall_back(router, inputs, items, features, answers, fallback)
        results = []
        for (state, rows), part in zip(picks, _parts(picks), strict=True):
            results.append(
                self._routed_score(
                    state,
                    rows,
                    answers[part],
                    indices[part],
                    merged=None if merged is None else merged[part],
                )
            )
        return results

    def _routed_score(
        self,
        state: LearnedTask,
        rows: list[int],
        answers: list[str | None],
        indices: torch.Tensor,
        merged: list[str | None] | None,
    ) -> RoutedScore:
        """A task's `RoutedScore` from the routed answers of its test rows `rows`, the router's
        (n, k) task indices and, with a fallback, the answers after it."""
        metric = self.heads.metric(state.task.name)
        value, _ = task_scores(metric, answers, state.task, rows)
        fell_back = float("nan")
        if merged is not None:
            fell_back = task_scores(metric, merged, state.task, rows)[0]
        routing = float((indices[:, 0] == state.index).double().mean())
        kept = [i for i, answer in enumerate(answers) if answer is not None]
        accepted = float("nan")
        if kept:
            kept_answers, kept_rows = [answers[i] for i in kept], [rows[i] for i in kept]
            accepted = task_scores(metric, kept_answers, state.task, kept_rows)[0]
        rejected = 1.0 - len(kept) / len(answers) if answers else 0.0
        return RoutedScore(
            metric=value,
            routing=routing,
            rejected=rejected,
            accepted=accepted,
            fallback=fell_back,
        )

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
                self.bank,
                self.heads,
                rows,
                slots=slots,
                weights=weights,
                head_tasks=tasks,
                batch_size=self.batch_size,
            )

    def details(self, router: Router, inputs: list) -> list[dict]:
        """Router-chosen predictions, one dict per row (see `ContinualLearner.predict_details`)."""
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", 2 * len(items)):
            features = self.features(items, router.layers)
            labels, indices, weights = self.routed(router, list(inputs), items, features)
            fallback, fell = self.fallback(), [None] * len(labels)
            if fallback is not None:
                labels, fell = self.fall_back(
                    router, list(inputs), items, features, labels, fallback
                )
        (scores,) = in_chunks(lambda x: (router.scores(x),), features)
        names = list(self.learned)
        rows = []
        for i, label in enumerate(labels):
            top = [
                (names[t], round(float(w), 6))
                for t, w in zip(indices[i].tolist(), weights[i].tolist(), strict=True)
                if t >= 0
            ]
            row = {
                "task": top[0][0] if top else None,
                "label": label,
                "rejected": bool(indices[i, 0] < 0),
                "score": float(scores[i].max()),
                "topk": [{"task": t, "weight": w} for t, w in top],
            }
            if fallback is not None:  # route-or-merge: answered through the merged slot
                row["fallback"] = fell[i] is not None
                if fell[i] is not None:
                    row["task"] = fell[i]  # the task whose head (labels) answered
            rows.append(row)
        return rows

    def measured(self, rows: dict[str, list[int] | None] | None = None) -> Picks:
        """The learned tasks a re-evaluation measures, in learning order, each with its test
        rows: those `rows` names (task -> its rows, None: all of them; a task it leaves out is
        not measured), or with `rows` None every task on all its rows."""
        assert rows is None or set(rows) <= set(self.learned), "rows of tasks not learned"
        picks = []
        for name, state in self.learned.items():
            if rows is not None and name not in rows:
                continue
            chosen = None if rows is None else rows[name]
            picks.append((state, list(range(len(state.test_items))) if chosen is None else chosen))
        return picks

    def oracle_scores(self, picks: Picks) -> list[float]:
        """Each picked task's metric on its picked test rows through its own routing and head:
        the rows of every task in one routed pass (`routed_predict`, per-row slots), each
        answered as `accuracy` answers it. Keeps each task's other scores (`text_scores`)."""
        names = [state.task.name for state, rows in picks for _ in rows]
        items = [state.test_items[i] for state, rows in picks for i in rows]
        answers: list[str | None] = []
        if items:
            slots, weights = self.rows_routing(names)
            answers = routed_predict(
                self.bank,
                self.heads,
                items,
                slots=slots,
                weights=weights,
                head_tasks=list(names),
                batch_size=self.batch_size,
            )
        values = []
        for (state, rows), part in zip(picks, _parts(picks), strict=True):
            name = state.task.name
            value, others = task_scores(self.heads.metric(name), answers[part], state.task, rows)
            self.text_scores[name] = others
            values.append(value)
        return values

    def evaluation_rows(
        self,
        router: Router | None,
        router_items: list,
        rows: dict[str, list[int] | None] | None = None,
    ) -> int:
        """Rows `evaluate` runs through the backbone (what its progress counts)."""
        picks = self.measured(rows)
        tests = sum(len(picked) for _, picked in picks)
        if router is None:
            return tests
        key = repr(router.layers)
        uncached = sum(len(s.feature_items) for s, _ in picks if key not in s.test_features)
        return 2 * tests + len(router_items) + uncached

    def evaluate(
        self,
        router: Router | None,
        router_items: list,
        rows: dict[str, list[int] | None] | None = None,
    ) -> tuple[dict[str, list[float]], list[float] | None, Rejection | None]:
        """A new row of every matrix, after the router (if any) learns the newest task from
        `router_items`: oracle accuracy per task, and with a router routed and routing accuracy
        and what rejection did. Every measured row of every task goes through one oracle pass,
        one routing and one routed pass (`oracle_scores`, `routed_results`).

        Args:
            rows: The tasks measured, each with its test rows (`measured`; an
                `engine.schedule.reevaluation_rows` plan); None: every task on all its rows.

        Returns:
            {"oracle": [...], "routed": [...]}, the routing accuracies and the `Rejection`
            (both None without a router); NaN for a task not measured.
        """
        picks = self.measured(rows)
        measured = [state.task.name for state, _ in picks]
        nan = float("nan")

        def spread(values: list) -> dict:
            return dict(zip(measured, values, strict=True))

        found = spread(self.oracle_scores(picks))
        oracle = [found.get(name, nan) for name in self.learned]
        if router is None:
            return {"oracle": oracle}, None, None
        router.add_task(self.features(router_items, router.layers))  # statistics only
        router.agree()  # under torchrun: the same statistics on every rank
        scored = spread(self.routed_results(router, picks))
        unmeasured = RoutedScore(metric=nan, routing=nan, rejected=nan, accepted=nan)
        results = [scored.get(name, unmeasured) for name in self.learned]
        rejection = Rejection([r.rejected for r in results], [r.accepted for r in results])
        routed, routing = [r.metric for r in results], [r.routing for r in results]
        modes = {"oracle": oracle, "routed": routed}
        if self.fallback() is not None:
            modes[FALLBACK_MODE] = [r.fallback for r in results]
        return modes, routing, rejection

    def routed_accuracy(self, router: Router) -> tuple[list[float], list[float]]:
        """Per learned task, in learning order: routed accuracy and routing accuracy on its
        test set under `router` (which must know every learned task)."""
        results = self.routed_results(router, self.measured())
        return [r.metric for r in results], [r.routing for r in results]


def _parts(picks: Picks) -> list[slice]:
    """Each picked task's slice of its rows concatenated in pick order."""
    parts, start = [], 0
    for _, rows in picks:
        parts.append(slice(start, start + len(rows)))
        start += len(rows)
    return parts


def task_scores(
    metric: str, answers: list[str | None], task, rows: list[int] | None = None
) -> tuple[float, dict[str, float]]:
    """The task's metric over its test set (or over its test rows `rows`, in that order), and
    its other scores.

    "accuracy": share of answers equal to the true label string (`not_a_label`: how many
    answers are none of the task's labels, e.g. generated texts). "exact_match": share equal
    after `metrics.normalize_answer`, with `rouge_l` (`metrics.rouge_l`). A rejected row
    (None) is wrong.
    """
    truth = [task.labels[y] for y in task.test_labels]
    if rows is not None:
        truth = [truth[i] for i in rows]
    if metric == "exact_match":
        texts = ["" if a is None else a for a in answers]
        em = exact_match(texts, truth)
        return em, {"exact_match": em, "rouge_l": rouge_l(texts, truth)}
    labels = set(task.labels)
    value = float(np.mean([a == b for a, b in zip(answers, truth, strict=True)]))
    return value, {"not_a_label": sum(a is not None and a not in labels for a in answers)}
