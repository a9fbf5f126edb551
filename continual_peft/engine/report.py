"""The report dict of a learner: its configuration, records, matrices and metrics, JSON-ready."""

from __future__ import annotations

from typing import TYPE_CHECKING

from continual_peft._version import __version__
from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.reports.run import SCHEMA_VERSION
from continual_peft.store.io import nan_to_none, timestamp

if TYPE_CHECKING:
    from continual_peft.engine.learner import ContinualLearner


def learner_report(learner: ContinualLearner) -> dict:
    """The report as a JSON-ready dict (schema version 1); unmeasured entries are None."""
    monitor, records = learner.monitor, learner.records
    matrices = {m: nan_to_none(monitor.matrix(m)) for m in monitor.modes}
    metrics = {m: monitor.metrics(m) for m in monitor.modes} if records else {}
    routed_ratio = None
    if learner.router is not None and records and metrics["oracle"]["acc"] > 0:
        routed_ratio = metrics["routed"]["acc"] / metrics["oracle"]["acc"]
    return {
        "schema_version": SCHEMA_VERSION,
        "status": learner.status,
        "updated": timestamp(),
        "tool": {"name": "continual-peft", "version": __version__},
        "stream": learner.stream,
        "strategy": learner.config.strategy,
        "config": {**learner.config.to_dict(), "backbone_fingerprint": learner.fingerprint()},
        "task_names": [r["name"] for r in records],
        "tasks": records,
        "accuracy_matrix": matrices,
        "initial_accuracy": monitor.initial[: len(records)],
        "metrics": metrics,
        "metric_definitions": METRIC_DEFINITIONS,
        "baseline": learner.baseline,
        "router": learner.config.router,
        "routing_accuracy": (
            nan_to_none(monitor.routing_matrix()) if learner.router is not None else None
        ),
        "routed_over_oracle": routed_ratio,
    }
