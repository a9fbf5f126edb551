"""The forgetting monitor: the accuracy matrix R, grown one task at a time, and its metrics.

`R[i, j]` is the accuracy on task j after training task i. Row i is filled by evaluating every task
seen so far after task i; the entry just above the diagonal, `R[j-1, j]`, is task j's accuracy just
before its own training (with its fresh module and head). `b[j]` is task j's accuracy with its
untrained head on the bare backbone, i.e. before any training touched it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from continual_peft.metrics import compute_metrics


class Rejection(NamedTuple):
    """What rejection did to each learned task's test set, in learning order."""

    rejected: list[float]  # share of the task's test inputs rejected
    accepted: list[float]  # routed metric over the accepted rows (NaN when none was)


class ForgettingMonitor:
    """Accuracy matrices per routing mode ("oracle" today) and the baseline accuracies b."""

    def __init__(self, modes: tuple[str, ...] = ("oracle",)) -> None:
        self.modes = modes
        self.rows: dict[str, list[list[float]]] = {m: [] for m in modes}
        self.before: dict[str, list[float]] = {m: [] for m in modes}  # R[j-1, j] per task j
        self.initial: list[float] = []  # b[j]
        self.routing_rows: list[list[float]] = []  # after task i: share of task j routed to j
        self.rejected_rows: list[list[float]] = []  # after task i: share of task j rejected
        # after task i: task j's routed metric over its accepted rows only (NaN: none accepted)
        self.accepted_rows: list[list[float]] = []

    @property
    def num_tasks(self) -> int:
        return len(self.initial)

    def before_task(self, initial: float, before: dict[str, float]) -> None:
        """Record task j's accuracy before its training: b[j] and R[j-1, j] per mode."""
        self.initial.append(initial)
        for mode in self.modes:
            self.before[mode].append(before[mode])

    def after_task(
        self,
        accuracies: dict[str, list[float]],
        routing: list[float] | None = None,
        rejection: Rejection | None = None,
    ) -> None:
        """Record row i: accuracy on every task seen so far per mode, routing accuracy, and
        what rejection did (the share of each task's test inputs rejected, and the routed
        metric over the rows it accepted)."""
        for mode in self.modes:
            assert len(accuracies[mode]) == self.num_tasks
            self.rows[mode].append(list(accuracies[mode]))
        if routing is not None:
            self.routing_rows.append(list(routing))
        if rejection is not None:
            self.rejected_rows.append(list(rejection.rejected))
            self.accepted_rows.append(list(rejection.accepted))

    def routing_matrix(self) -> np.ndarray:
        """Routing accuracy: row i = after task i, column j = share of task j's test inputs
        whose top-1 routed task is j; NaN for tasks not seen yet."""
        return _square(self.routing_rows)

    def rejected_matrix(self) -> np.ndarray:
        """Row i = after task i, column j = share of task j's test inputs the router rejected
        (a known task's false rejects); NaN for tasks not seen yet."""
        return _square(self.rejected_rows)

    def accepted_matrix(self) -> np.ndarray:
        """Row i = after task i, column j = task j's routed metric over the test inputs the
        router accepted (rejected rows left out, not counted wrong); NaN where none was."""
        return _square(self.accepted_rows)

    def matrix(self, mode: str = "oracle") -> np.ndarray:
        """R for the tasks finished so far, NaN where not measured."""
        t = len(self.rows[mode])
        r = np.full((t, t), np.nan)
        for i, row in enumerate(self.rows[mode]):
            r[i, : len(row)] = row
        for j in range(1, t):
            r[j - 1, j] = self.before[mode][j]
        return r

    def metrics(self, mode: str = "oracle", estimated: list[int] = ()) -> dict:
        """The metrics of matrix `mode` (`metrics.compute_metrics`).

        Args:
            estimated: Rows (0-based) whose old tasks were measured on a sample of their test
                rows: their entries left of the diagonal count as not measured, since a peak
                taken over estimates overstates forgetting (and biases average incremental
                accuracy). The diagonal and the "before" entries are always measured in full.
        """
        t = len(self.rows[mode])
        matrix = self.matrix(mode)
        for i in estimated:
            if i < t:
                matrix[i, :i] = np.nan
        return compute_metrics(matrix, np.array(self.initial[:t]))

    @classmethod
    def from_report(cls, report: dict) -> ForgettingMonitor:
        """Rebuild the monitor from a saved report's matrices."""
        monitor = cls(tuple(report["accuracy_matrix"]))
        monitor.initial = list(report.get("initial_accuracy") or [])
        for mode, rows in report["accuracy_matrix"].items():
            monitor.rows[mode] = [row[: i + 1] for i, row in enumerate(rows)]
            before = [rows[j - 1][j] for j in range(1, len(rows))]
            monitor.before[mode] = [float("nan")] + [np.nan if v is None else v for v in before]
        routing = report.get("routing_accuracy") or []
        monitor.routing_rows = [row[: i + 1] for i, row in enumerate(routing)]
        for key, rows in (("rejected_share", "rejected_rows"), ("accepted_acc", "accepted_rows")):
            saved = [_floats(row[: i + 1]) for i, row in enumerate(report.get(key) or [])]
            setattr(monitor, rows, _aligned(saved, len(monitor.routing_rows)))
        return monitor

    @classmethod
    def from_state(cls, state: dict) -> ForgettingMonitor:
        """Rebuild the monitor from `state()` as read back from JSON (null = NaN)."""
        monitor = cls(tuple(state["rows"]))
        monitor.rows = {m: [_floats(row) for row in rows] for m, rows in state["rows"].items()}
        monitor.before = {m: _floats(values) for m, values in state["before"].items()}
        monitor.initial = _floats(state["initial"])
        monitor.routing_rows = [_floats(row) for row in state.get("routing_rows", [])]
        # a state saved before rejection was recorded has none
        for key in ("rejected_rows", "accepted_rows"):
            saved = [_floats(row) for row in state.get(key, [])]
            setattr(monitor, key, _aligned(saved, len(monitor.routing_rows)))
        return monitor

    def state(self) -> dict:
        """JSON-ready state, enough to rebuild the monitor."""
        return {
            "rows": self.rows,
            "before": self.before,
            "initial": self.initial,
            "routing_rows": self.routing_rows,
            "rejected_rows": self.rejected_rows,
            "accepted_rows": self.accepted_rows,
        }

    def lengths(self) -> dict:
        """How many entries each list of `state()` holds: what `truncate` goes back to. The
        monitor only ever appends, so this is all an undo needs (a copy would cost T²)."""
        return {
            key: {mode: len(v) for mode, v in value.items()}
            if isinstance(value, dict)
            else len(value)
            for key, value in self.state().items()
        }

    def truncate(self, lengths: dict) -> None:
        """Drop every entry appended since `lengths()` was taken, in place."""
        for key, value in self.state().items():
            if isinstance(value, dict):
                for mode, items in value.items():
                    del items[lengths[key].get(mode, 0) :]
            else:
                del value[lengths[key] :]


def _square(rows: list[list[float]]) -> np.ndarray:
    """Lower-triangular rows (row i has i + 1 entries) as a T x T matrix, NaN above."""
    t = len(rows)
    out = np.full((t, t), np.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _aligned(rows: list[list[float]], count: int) -> list[list[float]]:
    """`rows` behind NaN rows for the first tasks, which were learned before they were kept."""
    return [[float("nan")] * (i + 1) for i in range(count - len(rows))] + rows


def _floats(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]
