"""The report dict of a learner: its configuration, records, matrices and metrics, JSON-ready."""

from __future__ import annotations

from typing import Any

import numpy as np

from continual_peft._version import __version__
from continual_peft.config import LearnerConfig
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.schedule import schedule_note
from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.reports.run import SCHEMA_VERSION
from continual_peft.store.io import nan_to_none, timestamp


def learner_report(
    monitor: ForgettingMonitor,
    records: list[dict[str, Any]],
    config: LearnerConfig,
    *,
    status: str,
    stream: str | None,
    fingerprint: dict[str, Any],
    baseline: dict[str, Any] | None,
    routed: bool,
    backbone: dict[str, Any] | None = None,
    dev: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    rejection: dict[str, Any] | None = None,
) -> dict:
    """The report as a JSON-ready dict (schema version 1); unmeasured entries are None, and
    under a re-evaluation schedule other than the default its "reevaluation" says it in words.

    Args:
        monitor: The run's forgetting monitor (its matrices and metrics).
        records: One record per learned task, in order.
        config: The run's configuration.
        status: "running", "complete" or "interrupted".
        stream: The stream's name, if the tasks came from one.
        fingerprint: The backbone's fingerprint.
        baseline: The baseline run's comparison block, if any.
        routed: Whether a router picks the slots (task-agnostic inference).
        backbone: What the backbone is (`Backbone.describe`: family, model type, parameter
            count, dtype); the report's "backbone" holds it after the fingerprint's name.
        dev: Scores on the tasks' dev splits after the last task (`engine.evaluation.score_dev`),
            or None when the tasks have none (or the run is not finished).
        data: How the stream's data was read (`Stream.protocol`: budget, excluded
            tasks, dev share, unknown labels), when the run came from a stream.
        rejection: The router's promise (`Router.rejection`: reject_rate, calibration rows per
            task), None without one; the report's "rejection" block adds what it did after the
            last task (`rejection_summary`).
    """
    matrices = {m: nan_to_none(monitor.matrix(m)) for m in monitor.modes}
    # rows whose old tasks were measured on a sample: estimates, left out of the metrics
    estimated = [i for i, r in enumerate(records) if (r.get("reevaluation") or {}).get("sampled")]
    metrics = {m: monitor.metrics(m, estimated) for m in monitor.modes} if records else {}
    routed_ratio = None
    oracle_acc = (metrics.get("oracle") or {}).get("acc")
    routed_acc = (metrics.get("routed") or {}).get("acc")
    if routed and records and oracle_acc and routed_acc is not None:  # both measured, oracle > 0
        routed_ratio = routed_acc / oracle_acc
    schedule = schedule_note(config.evaluation)  # None: every entry measured, nothing to say
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "updated": timestamp(),
        "tool": {"name": "continual-peft", "version": __version__},
        "stream": stream,
        "strategy": config.strategy,
        "backbone": {"name": fingerprint.get("name"), **(backbone or {})},
        "config": {**config.to_dict(), "backbone_fingerprint": fingerprint},
        "task_names": [r["name"] for r in records],
        "tasks": records,
        "accuracy_matrix": matrices,
        **({"reevaluation": schedule} if schedule else {}),
        "initial_accuracy": monitor.initial[: len(records)],
        "metrics": metrics,
        "metric_definitions": METRIC_DEFINITIONS,
        "baseline": baseline,
        "router": config.router,
        "routing_accuracy": (nan_to_none(monitor.routing_matrix()) if routed else None),
        "routed_over_oracle": routed_ratio,
        "rejected_share": nan_to_none(monitor.rejected_matrix()) if routed else None,
        "accepted_acc": nan_to_none(monitor.accepted_matrix()) if routed else None,
        "rejection": rejection_summary(monitor, metrics, rejection) if routed else None,
        "dev": dev,
        "data": data,
    }


def rejection_summary(
    monitor: ForgettingMonitor, metrics: dict[str, Any], promise: dict[str, Any] | None
) -> dict[str, Any]:
    """The report's "rejection" block: the router's promise, and after the last task the mean
    share of known tasks' test inputs rejected (`false_reject`), routed ACC with rejected rows
    counted wrong (`routed_acc`) and over the accepted rows only (`routed_acc_accepted`), and
    the same per task (`by_task`); fractions, None where not measured."""
    rejected, accepted = monitor.rejected_matrix(), monitor.accepted_matrix()
    last = len(rejected) - 1
    measured = last >= 0 and not np.isnan(rejected[last]).all()

    def mean(row: np.ndarray) -> float | None:
        kept = row[~np.isnan(row)]
        return float(kept.mean()) if kept.size else None

    summary = {
        **(promise or {"reject_rate": 0.0}),
        "false_reject": mean(rejected[last]) if measured else None,
        "routed_acc": (metrics.get("routed") or {}).get("acc"),
        "routed_acc_accepted": mean(accepted[last]) if measured else None,
    }
    if measured:
        summary["by_task"] = {
            "rejected": nan_to_none(rejected[last]),
            "routed_acc_accepted": nan_to_none(accepted[last]),
        }
    return summary
