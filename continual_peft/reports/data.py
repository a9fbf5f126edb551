"""Reading the matrices of a report dict: shared by the text reports and the plots."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MODE_ORDER = ("oracle", "routed", "route_or_merge")


def is_missing(value: Any) -> bool:
    """True for an unmeasured entry: JSON null, or NaN in a dict built in memory."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def pct(value: Any, signed: bool = False) -> str:
    """Format a fraction as a percentage with one decimal; blank when not measured."""
    if is_missing(value):
        return ""
    percent = round(100 * value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0, so ties never print "-0.0"
    return f"{percent:+.1f}" if signed else f"{percent:.1f}"


def report_modes(report: dict[str, Any]) -> list[str]:
    """Routing modes present in the report, preferred ones first, the rest in stored order."""
    present = list(report.get("accuracy_matrix") or {})
    preferred = [mode for mode in MODE_ORDER if mode in present]
    return preferred + [mode for mode in present if mode not in preferred]


def task_names(report: dict[str, Any], count: int) -> list[str]:
    """Task names for ``count`` rows or columns, with a placeholder past the known names."""
    known = list(report.get("task_names") or [])
    return [known[j] if j < len(known) else f"task {j + 1}" for j in range(count)]


def matrix_of(report: dict[str, Any], mode: str) -> np.ndarray:
    """The mode's accuracy matrix as floats, NaN where not measured, padded to a rectangle."""
    return as_array(report["accuracy_matrix"][mode])


def as_array(rows: list[list[Any]]) -> np.ndarray:
    """Nested lists (None = not measured) as a float matrix with NaN, padded to a rectangle."""
    width = max([len(row) for row in rows] + [len(rows)])
    data = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        data[i, : len(row)] = [np.nan if is_missing(v) else float(v) for v in row]
    return data


def named_matrices(report: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(title, matrix) for R under each routing mode, then the routing accuracy if present."""
    named = [
        (f"Accuracy matrix R (%), routing: {mode}", matrix_of(report, mode))
        for mode in report_modes(report)
    ]
    if report.get("routing_accuracy"):
        title = "Routing accuracy (%): share of task j's test inputs routed to task j"
        named.append((title, as_array(report["routing_accuracy"])))
    if rejects(report) and report.get("rejected_share"):
        title = "Rejected (%): share of task j's test inputs the router turned away"
        named.append((title, as_array(report["rejected_share"])))
    return named


def rejects(report: dict[str, Any]) -> bool:
    """Whether the report's router was set to reject unfamiliar inputs (reject_rate > 0)."""
    rejection = report.get("rejection")
    return isinstance(rejection, dict) and bool(rejection.get("reject_rate"))


def rejection_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    """After the last task, per task: routing accuracy, the share of its test inputs rejected,
    routed ACC with rejected rows counted wrong and over the accepted rows, and its calibration
    rows, then the mean; (caption, header, rows in percent), None unless the router rejects."""
    if not rejects(report):
        return None
    rejection = report["rejection"]
    by_task = rejection.get("by_task") or {}
    routing = as_array(report.get("routing_accuracy") or [[]])
    routed = report.get("accuracy_matrix", {}).get("routed") or [[]]
    names = list(report.get("task_names") or [])
    sizes = list(rejection.get("calibration_examples") or [])
    header = [
        "task",
        "routing acc",
        "rejected",
        "routed ACC",
        "routed ACC, accepted rows",
        "calibration rows",
    ]
    rows = []
    for j, name in enumerate(names):
        cells = [
            routing[-1][j] if j < routing.shape[1] else None,
            _at(by_task.get("rejected"), j),
            _at(routed[-1], j),
            _at(by_task.get("routed_acc_accepted"), j),
        ]
        size = _at(sizes, j)
        rows.append([name, *(pct(v) for v in cells), "" if size is None else str(size)])
    means = [
        rejection.get("false_reject"),
        rejection.get("routed_acc"),
        rejection.get("routed_acc_accepted"),
    ]
    mean_routing = None if routing.size == 0 else float(np.nanmean(routing[-1]))
    rows.append(["mean", pct(mean_routing), *(pct(v) for v in means), ""])
    caption = (
        f"reject_rate {rejection['reject_rate']:g} ({rejection.get('familiarity', 'score')}): "
        "each task's threshold is calibrated on held-out rows, recomputed after every task; "
        "'rejected' should stay near it. Routed ACC counts a rejected row wrong."
    )
    uncalibrated = [
        name for name, ok in zip(names, rejection.get("calibrated") or [], strict=False) if not ok
    ]
    if uncalibrated:
        caption = (
            f"REJECTION IS OFF at reject_rate {rejection['reject_rate']:g}: task(s) "
            f"{', '.join(uncalibrated)} had too few calibration rows to hold the rate, so they "
            "accept every row and the router rejects nothing. Give them more training inputs, "
            "or raise reject_rate."
        )
    return caption, header, rows


def _at(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


def md_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table lines; the first ``left`` columns are left-aligned, numbers right-aligned."""
    rule = "|" + " --- |" * left + " ---: |" * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def backbone_summary(report: dict[str, Any]) -> str | None:
    """The backbone in one line: "all-MiniLM-L6-v2 (encoder, bert, 22.7 M parameters,
    float32, weights 86.9 MB)", with its quantization when it has one ("4bit (nf4, double
    quantization)"; the size is the frozen weights' in memory, as loaded). A report written
    before reports described their backbone is named from its config's fingerprint (name and
    dtype only); None when neither names it."""
    info = report.get("backbone") if isinstance(report.get("backbone"), dict) else {}
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    fingerprint = config.get("backbone_fingerprint")
    fingerprint = fingerprint if isinstance(fingerprint, dict) else {}
    name = info.get("name") or fingerprint.get("name")
    if not name:
        return None
    parameters, size = info.get("parameters"), info.get("weights_bytes")
    quantization = info.get("quantization")
    facts = [
        info.get("family"),
        info.get("model_type"),
        f"{short_count(parameters)} parameters" if isinstance(parameters, int) else None,
        info.get("dtype") or fingerprint.get("dtype"),
        f"quantized {quantization}" if quantization and quantization != "none" else None,
        f"weights {size / 1e6:.1f} MB in memory" if isinstance(size, int) else None,
    ]
    shown = ", ".join(str(fact) for fact in facts if fact)
    return f"{name} ({shown})" if shown else str(name)


def short_count(n: int) -> str:
    """A count for people: "22.7 M", "1.1 B", "95.2 k"; below a thousand, as it is."""
    for size, unit in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def metric_stats(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """{key: {mean, std (sample, ddof=1; None for n < 2), n}} over the runs that measured key."""
    stats = {}
    for key in keys:
        values = np.array([r[key] for r in runs if not is_missing(r.get(key))], dtype=float)
        stats[key] = {
            "mean": float(values.mean()) if values.size else None,
            "std": float(values.std(ddof=1)) if values.size > 1 else None,
            "n": int(values.size),
        }
    return stats
