"""Rendering an order x seed grid's aggregate: console table, Markdown, CSV and a PNG plot.

Every writer reads only the aggregate dict (the contents of aggregate.json), so the files can be
re-rendered from it. Values are fractions in the JSON and CSV, percentages elsewhere.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from rich.console import Group
from rich.table import Table
from rich.text import Text

from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.reports.data import is_missing, md_table, pct
from continual_peft.reports.plots import figure_png
from continual_peft.store.io import atomic_write_bytes, atomic_write_json, atomic_write_text

AGGREGATE_FILES = ("aggregate.json", "aggregate.md", "aggregate.csv", "aggregate.png")


class _Metric(NamedTuple):
    """A metric of the aggregate's tables and plots."""

    key: str  # its key in a run record and in the summary
    label: str  # display name
    signed: bool  # shown with its sign (transfer metrics, as in report.md)
    definition: str  # its key in `METRIC_DEFINITIONS`


_METRICS = (
    _Metric(key="acc", label="ACC", signed=False, definition="acc"),
    _Metric(key="bwt", label="BWT", signed=True, definition="bwt"),
    _Metric(key="forgetting", label="Forgetting", signed=False, definition="forgetting"),
    _Metric(key="routed_acc", label="routed ACC", signed=False, definition="acc"),
    _Metric(key="routing_acc", label="routing", signed=False, definition="routing_accuracy"),
    _Metric(
        key="routed_over_oracle",
        label="routed/oracle",
        signed=False,
        definition="routing_accuracy",
    ),
    _Metric(key="dev_acc", label="dev ACC", signed=False, definition="dev"),
    _Metric(key="baseline_acc", label="baseline ACC", signed=False, definition="acc"),
    _Metric(key="baseline_bwt", label="baseline BWT", signed=True, definition="bwt"),
    _Metric(
        key="baseline_forgetting",
        label="baseline Forgetting",
        signed=False,
        definition="forgetting",
    ),
)


def _shown(aggregate: dict[str, Any]) -> list[_Metric]:
    """The metrics measured in at least one run (routed ACC only with a router, ...)."""
    overall = (aggregate.get("summary") or {}).get("overall") or {}
    return [metric for metric in _METRICS if (overall.get(metric.key) or {}).get("n")]


def mean_std(stats: dict[str, Any] | None, signed: bool = False) -> str:
    """ "81.2 ± 1.4" in percent; the mean alone for n = 1; blank when never measured."""
    stats = stats or {}
    if is_missing(stats.get("mean")):
        return ""
    text = pct(stats["mean"], signed)
    return text if is_missing(stats.get("std")) else f"{text} ± {100 * stats['std']:.1f}"


def _summary_rows(aggregate: dict[str, Any]) -> list[list[str]]:
    """One row per order, then "all": order, tasks, runs, then mean ± std per shown metric."""
    summary = aggregate.get("summary") or {}
    orders = aggregate.get("orders") or {}
    runs = aggregate.get("runs") or []
    groups = [
        (name, " → ".join(orders.get(name, [])), stats)
        for name, stats in (summary.get("by_order") or {}).items()
    ]
    groups.append(("all", "", summary.get("overall") or {}))
    rows = []
    for name, tasks, stats in groups:
        count = len(runs) if name == "all" else sum(r["order"] == name for r in runs)
        cells = [mean_std(stats.get(m.key), m.signed) for m in _shown(aggregate)]
        rows.append([name, tasks, str(count), *cells])
    return rows


def _title(aggregate: dict[str, Any]) -> str:
    orders, seeds = aggregate.get("orders") or {}, aggregate.get("seeds") or []
    return (
        f"{aggregate.get('stream', '?')} / {aggregate.get('strategy', '?')} "
        f"(router {aggregate.get('router', '?')}): {len(orders)} order(s) × {len(seeds)} seed(s), "
        f"{len(aggregate.get('runs') or [])} run(s) {aggregate.get('status', '?')}"
    )


# ---------------------------------------------------------------- console


def console_aggregate(aggregate: dict[str, Any]) -> Group:
    """Rich renderable: mean ± sample std (%) per order and over all runs."""
    table = Table(title="Mean ± std (%) over seeds; std = sample std (ddof=1)")
    rows = _summary_rows(aggregate)
    widest = max((len(row[0]) for row in rows), default=5)
    table.add_column("order", style="bold", min_width=widest, no_wrap=True)  # never cut
    for header in ("tasks", "runs"):
        table.add_column(header)
    for metric in _shown(aggregate):
        table.add_column(metric.label, justify="right")
    for row in rows:
        table.add_row(*row)
    return Group(Text(_title(aggregate), style="bold"), table)


# ---------------------------------------------------------------- markdown


def render_aggregate_markdown(aggregate: dict[str, Any]) -> str:
    """The contents of aggregate.md: the summary table, every run, and the definitions."""
    shown = _shown(aggregate)
    labels = [metric.label for metric in shown]
    lines = [
        f"# continual-peft aggregate: {_title(aggregate)}",
        "",
        f"- baseline: {aggregate.get('baseline') or 'none'}; seeds: {aggregate.get('seeds')}",
        f"- {aggregate.get('seed_note', '')}",
        f"- std: {(aggregate.get('summary') or {}).get('std', '')}; n = runs per row",
        "",
        "## Mean ± std (%)",
        "",
        *md_table(["order", "tasks", "runs", *labels], _summary_rows(aggregate), left=2),
    ]
    rows = [
        [run["order"], str(run["seed"]), f"`{run['run_dir']}`"]
        + [pct(run.get(m.key), m.signed) or "n/a" for m in shown]
        for run in aggregate.get("runs") or []
    ]
    lines += ["## Runs (%)", "", *md_table(["order", "seed", "run directory", *labels], rows, 3)]
    failed = aggregate.get("failed")
    if failed:
        lines += [
            f"**Failed:** order {failed['order']}, seed {failed['seed']}: {failed['error']}",
            "",
        ]
    lines += ["## Metric definitions", ""]
    used = dict.fromkeys(metric.definition for metric in shown)
    lines += [f"- **{key}**: {METRIC_DEFINITIONS[key]}" for key in used]
    if any(metric.key == "routed_acc" for metric in shown):
        lines.append(f"- **routed ACC**: ACC under the router. {METRIC_DEFINITIONS['routing']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CSV


def write_aggregate_csv(aggregate: dict[str, Any]) -> str:
    """Two blocks, a blank line apart: one row per run, then mean/std/n per order and "all".

    Values are fractions; empty cells were not measured (or std with n < 2).
    """
    runs = aggregate.get("runs") or []
    keys = [m.key for m in _METRICS if any(m.key in r for r in runs)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["order", "seed", "tasks", "run_dir", *keys])
    for run in runs:
        values = ["" if is_missing(run.get(k)) else repr(float(run[k])) for k in keys]
        writer.writerow(
            [run["order"], run["seed"], " ".join(run["tasks"]), run["run_dir"], *values]
        )
    writer.writerow([])
    writer.writerow(["order", "metric", "mean", "std", "n"])
    summary = aggregate.get("summary") or {}
    groups = {**(summary.get("by_order") or {}), "all": summary.get("overall") or {}}
    for name, stats in groups.items():
        for key in keys:
            entry = stats.get(key) or {}
            cells = ["" if is_missing(entry.get(f)) else repr(entry[f]) for f in ("mean", "std")]
            writer.writerow([name, key, *cells, entry.get("n", 0)])
    return buffer.getvalue()


# ---------------------------------------------------------------- plot


def _percent(value: Any, missing: float) -> float:
    return missing if is_missing(value) else 100 * value


def _aggregate_png(aggregate: dict[str, Any]) -> bytes:
    """Per metric: each run as a dot per order, and mean ± sample std as a bar with error bars."""
    shown = _shown(aggregate) or list(_METRICS[:1])
    summary = aggregate.get("summary") or {}
    groups = [*(summary.get("by_order") or {}).items(), ("all", summary.get("overall") or {})]
    names = [name for name, _ in groups]
    runs = aggregate.get("runs") or []
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    width = max(3.2, 0.7 * len(names) + 1.6)
    fig = Figure(figsize=(width * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(shown) :]:
        ax.axis("off")
    for ax, metric in zip(axes, shown, strict=False):
        key = metric.key
        # percent, as the axis says; a mean of exactly 0 (per_task's BWT) is a bar, not a gap
        means = [_percent((s.get(key) or {}).get("mean"), np.nan) for _, s in groups]
        stds = [_percent((s.get(key) or {}).get("std"), 0.0) for _, s in groups]
        colors = ["tab:blue"] * (len(groups) - 1) + ["tab:gray"]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors, alpha=0.45)
        for x, name in enumerate(names):
            chosen = [r.get(key) for r in runs if name in ("all", r["order"])]
            values = [100 * v for v in chosen if not is_missing(v)]
            ax.plot([x + 0.2] * len(values), values, "o", color="black", markersize=3)
        ax.set_xticks(range(len(names)), labels=names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(f"{metric.label} (%)")
        ax.set_ylabel("%")
    fig.suptitle(f"{_title(aggregate)}\nbars: mean ± sample std; dots: single runs")
    return figure_png(fig)


def write_aggregate(aggregate: dict[str, Any], out_dir: str | Path) -> None:
    """Write aggregate.json (first: every other file re-renders from it), .md, .csv and .png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "aggregate.json", aggregate)
    atomic_write_text(out / "aggregate.md", render_aggregate_markdown(aggregate))
    atomic_write_text(out / "aggregate.csv", write_aggregate_csv(aggregate))
    atomic_write_bytes(out / "aggregate.png", _aggregate_png(aggregate))
