"""Reports of a run, rendered from the plain report dict the engine builds after every task.

One dict (schema version 1, see DESIGN.md) feeds every format: a rich console table, ``report.md``,
``accuracy_matrix.csv``, an ``accuracy_matrix.png`` heatmap and ``report.json`` itself. The keys of
``accuracy_matrix`` and ``metrics`` are routing modes ("oracle", later "routed", ...); every writer
loops over the modes present, with "oracle" and "routed" merely shown first.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from rich.console import Group
from rich.table import Table
from rich.text import Text

from continual_peft._io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_json
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.metrics import METRIC_DEFINITIONS

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "accuracy_matrix.csv", "report.md", "accuracy_matrix.png")
_MODE_ORDER = ("oracle", "routed")
_REQUIRED_KEYS = ("status", "task_names", "accuracy_matrix", "metrics")
# (key, display name, signed): transfer metrics are signed so a gain reads differently from a loss.
_METRIC_ROWS = (
    ("acc", "ACC", False),
    ("avg_incremental_acc", "Avg. incremental ACC", False),
    ("bwt", "BWT", True),
    ("fwt", "FWT", True),
    ("forgetting", "Forgetting", False),
)
_COMPARED = ("acc", "bwt", "forgetting")
_TASK_COLUMNS = (
    ("slot", "slot", "{}"),
    ("train_examples", "train ex.", "{:,}"),
    ("test_examples", "test ex.", "{:,}"),
    ("trainable_parameters", "trainable params", "{:,}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("eval_seconds", "eval s", "{:.1f}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("truncated_inputs", "truncated inputs", "{:,}"),
)


# ---------------------------------------------------------------- shared helpers


def _missing(value: Any) -> bool:
    """True for an unmeasured entry: JSON null, or NaN in a dict built in memory."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _pct(value: Any, signed: bool = False) -> str:
    """Format a fraction as a percentage with one decimal; blank when not measured."""
    if _missing(value):
        return ""
    percent = round(100 * value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0, so ties never print "-0.0"
    return f"{percent:+.1f}" if signed else f"{percent:.1f}"


def _modes(report: dict[str, Any]) -> list[str]:
    """Routing modes present in the report, preferred ones first, the rest in stored order."""
    present = list(report.get("accuracy_matrix") or {})
    preferred = [mode for mode in _MODE_ORDER if mode in present]
    return preferred + [mode for mode in present if mode not in preferred]


def _names(report: dict[str, Any], count: int) -> list[str]:
    """Task names for ``count`` rows or columns, with a placeholder past the known names."""
    known = list(report.get("task_names") or [])
    return [known[j] if j < len(known) else f"task {j + 1}" for j in range(count)]


def _matrix(report: dict[str, Any], mode: str) -> np.ndarray:
    """The mode's accuracy matrix as floats, NaN where not measured, padded to a rectangle."""
    rows = report["accuracy_matrix"][mode]
    width = max([len(row) for row in rows] + [len(rows)])
    data = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        data[i, : len(row)] = [np.nan if _missing(v) else float(v) for v in row]
    return data


def _fmt(value: Any, pattern: str) -> str:
    return "" if _missing(value) else pattern.format(value)


# ---------------------------------------------------------------- console


def _console_matrix(report: dict[str, Any], mode: str) -> Table:
    data = _matrix(report, mode)
    names = _names(report, max(data.shape))
    table = Table(title=f"Accuracy (%), routing: {mode}")
    table.add_column("after \\ on", style="bold")
    for name in names[: data.shape[1]]:
        table.add_column(name, justify="right")
    for i, row in enumerate(data):
        table.add_row(names[i], *(_pct(v) for v in row))
    return table


def _console_metrics(report: dict[str, Any]) -> Table:
    modes = [mode for mode in _modes(report) if mode in (report.get("metrics") or {})]
    table = Table(title="Metrics (%)")
    table.add_column("metric", style="bold")
    for mode in modes:
        table.add_column(mode, justify="right")
    for key, label, signed in _METRIC_ROWS:
        table.add_row(label, *(_pct(report["metrics"][mode].get(key), signed) for mode in modes))
    return table


def console_report(report: dict[str, Any]) -> Group:
    """Rich renderable of a report: R per routing mode, then the metrics.

    Args:
        report: A report dict (schema version 1).

    Returns:
        A group of tables, ready for ``rich.console.Console().print``.
    """
    header = Text(
        f"{report.get('stream', '?')} / {report.get('strategy', '?')}: "
        f"{len(report.get('task_names') or [])} task(s), {report.get('status', '?')}. "
        "R rows: after training task; columns: evaluated on task.",
        style="bold",
    )
    tables = [_console_matrix(report, mode) for mode in _modes(report)]
    if report.get("metrics"):
        tables.append(_console_metrics(report))
    return Group(header, *tables)


# ---------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table lines; the first ``left`` columns are left-aligned, numbers right-aligned."""
    rule = "|" + " --- |" * left + " ---: |" * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _md_tasks(report: dict[str, Any]) -> list[str]:
    header = ["#", "task", "labels", *(title for _, title, _ in _TASK_COLUMNS)]
    rows = []
    for number, task in enumerate(report.get("tasks") or [], start=1):
        cells = [_fmt(task.get(key), pattern) for key, _, pattern in _TASK_COLUMNS]
        rows.append([str(number), task.get("name", ""), str(len(task.get("labels") or [])), *cells])
    if not rows:
        return []
    return ["## Tasks", "", *_md_table(header, rows, left=2)]


def _md_matrix(report: dict[str, Any], mode: str) -> list[str]:
    data = _matrix(report, mode)
    names = _names(report, max(data.shape))
    rows = [[names[i], *(_pct(v) for v in row)] for i, row in enumerate(data)]
    intro = "Row: after training task; column: evaluated on task; blank: not measured."
    table = _md_table(["after \\ on", *names[: data.shape[1]]], rows)
    return [f"## Accuracy matrix R (%), routing: {mode}", "", intro, "", *table]


def _md_metrics(report: dict[str, Any]) -> list[str]:
    metrics = report.get("metrics") or {}
    modes = [mode for mode in _modes(report) if mode in metrics]
    if not modes:
        return []
    rows = [
        [label, *(_pct(metrics[mode].get(key), signed) or "n/a" for mode in modes)]
        for key, label, signed in _METRIC_ROWS
    ]
    for j, name in enumerate(report.get("task_names") or []):
        values = [(metrics[mode].get("avalanche_forgetting") or []) for mode in modes]
        cells = [_pct(v[j], True) if j < len(v) else "" for v in values]
        rows.append([f"Avalanche forgetting, {name}", *(cell or "n/a" for cell in cells)])
    lines = ["## Metrics (%)", "", *_md_table(["metric", *modes], rows)]
    initial = report.get("initial_accuracy")
    if initial:
        pairs = zip(_names(report, len(initial)), initial, strict=True)
        shown = ", ".join(f"{name} {_pct(value) or 'n/a'}" for name, value in pairs)
        lines += [f"Initial accuracy b[j] (%): {shown}.", ""]
    return lines


def _md_baseline(report: dict[str, Any]) -> list[str]:
    baseline = report.get("baseline")
    if not baseline:
        return []
    ours, theirs = report.get("strategy", "this run"), baseline.get("strategy", "baseline")
    base_metrics = baseline.get("metrics") or {}
    rows = []
    for mode in _modes(report):
        if mode not in base_metrics or mode not in (report.get("metrics") or {}):
            continue
        for key, label, signed in _METRIC_ROWS:
            if key not in _COMPARED:
                continue
            a, b = report["metrics"][mode].get(key), base_metrics[mode].get(key)
            diff = None if _missing(a) or _missing(b) else a - b
            cells = [_pct(a, signed), _pct(b, signed), _pct(diff, True)]
            rows.append([f"{label} ({mode})", *(cell or "n/a" for cell in cells)])
    header = ["metric", str(ours), str(theirs), "difference"]
    return [f"## Comparison with baseline `{theirs}` (%)", "", *_md_table(header, rows)]


def render_markdown(report: dict[str, Any]) -> str:
    """Render a report as Markdown, ending with the exact metric definitions.

    Args:
        report: A report dict (schema version 1).

    Returns:
        The contents of ``report.md``.
    """
    tool = report.get("tool") or {}
    lines = [
        f"# continual-peft report: {report.get('stream', '?')} / {report.get('strategy', '?')}",
        "",
        f"- status: **{report.get('status', '?')}** (updated {report.get('updated', '?')})",
        f"- tasks trained: {', '.join(report.get('task_names') or []) or 'none yet'}",
        f"- written by {tool.get('name', 'continual-peft')} {tool.get('version', '?')}",
        "",
    ]
    lines += _md_tasks(report)
    for mode in _modes(report):
        lines += _md_matrix(report, mode)
    lines += _md_metrics(report) + _md_baseline(report)
    definitions = report.get("metric_definitions") or METRIC_DEFINITIONS
    lines += ["## Metric definitions", ""]
    lines += [f"- **{key}**: {text}" for key, text in definitions.items()]
    config = json.dumps(report.get("config") or {}, indent=2, sort_keys=True)
    lines += ["", "## Config", "", "```json", config, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CSV


def write_accuracy_csv(report: dict[str, Any]) -> str:
    """Render every mode's accuracy matrix as CSV blocks separated by a blank line.

    Each block has the header ``mode,after_task,<task names...>`` and one row per trained task;
    unmeasured entries are empty cells. Values are fractions, not percentages.

    Args:
        report: A report dict (schema version 1).

    Returns:
        The contents of ``accuracy_matrix.csv``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for block, mode in enumerate(_modes(report)):
        if block:
            writer.writerow([])
        data = _matrix(report, mode)
        names = _names(report, max(data.shape))
        writer.writerow(["mode", "after_task", *names[: data.shape[1]]])
        for i, row in enumerate(data):
            writer.writerow([mode, names[i], *("" if _missing(v) else repr(float(v)) for v in row)])
    return buffer.getvalue()


# ---------------------------------------------------------------- heatmap


def _panels(report: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(title, R) per routing mode, then the baseline's, so the two strategies sit side by side."""
    strategy = report.get("strategy", "?")
    panels = [(f"{strategy}, routing: {mode}", _matrix(report, mode)) for mode in _modes(report)]
    baseline = report.get("baseline") or {}
    for mode in _modes(baseline):
        title = f"baseline {baseline.get('strategy', '?')}, routing: {mode}"
        panels.append((title, _matrix(baseline, mode)))
    return panels


def _draw_heatmap(ax: Axes, report: dict[str, Any], title: str, data: np.ndarray) -> AxesImage:
    names = _names(report, max(data.shape))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0)
    long_names = max((len(name) for name in names), default=0) > 4
    ax.set_xticks(range(data.shape[1]), labels=names[: data.shape[1]])
    if long_names:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_yticks(range(data.shape[0]), labels=names[: data.shape[0]])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    if max(data.shape) <= 20:  # beyond that the numbers no longer fit in their cells
        size = 9 if max(data.shape) <= 8 else 7 if max(data.shape) <= 15 else 6
        for (i, j), value in np.ndenumerate(data):
            if not math.isnan(value):
                color = "white" if value < 0.55 else "black"  # viridis is dark at the low end
                text = f"{100 * value:.1f}"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
    return image


def _heatmap_png(report: dict[str, Any]) -> bytes:
    """Render the heatmaps to PNG bytes; a bare Figure keeps pyplot's global state untouched."""
    panels = _panels(report)
    size = max([max(data.shape) for _, data in panels] + [1])
    side = max(3.6, 0.6 * size + 2.0)
    fig = Figure(figsize=(side * max(len(panels), 1) + 1.2, side + 0.6), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    images = [_draw_heatmap(ax, report, *panel) for ax, panel in zip(axes, panels, strict=False)]
    if images:
        fig.colorbar(images[-1], ax=list(axes), label="accuracy", shrink=0.8)
    else:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no task evaluated yet", ha="center", va="center")
    stream, strategy = report.get("stream", "?"), report.get("strategy", "?")
    fig.suptitle(f"Accuracy matrix R (%): {stream} / {strategy}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def plot_accuracy_matrix(report: dict[str, Any], path: str | Path) -> None:
    """Write a heatmap PNG of R, one panel per routing mode, cells annotated in percent.

    The color scale is fixed to [0, 1] so heatmaps of different runs compare at a glance;
    unmeasured entries stay white. Rendering uses a bare ``Figure`` with the Agg canvas instead of
    pyplot, so it works headless and never switches the caller's matplotlib backend.

    Args:
        report: A report dict (schema version 1).
        path: Target PNG file, written atomically.
    """
    atomic_write_bytes(path, _heatmap_png(report))


# ---------------------------------------------------------------- files


def write_reports(report: dict[str, Any], run_dir: str | Path) -> None:
    """Write ``report.json``, ``accuracy_matrix.csv``, ``report.md`` and ``accuracy_matrix.png``.

    Each file is replaced atomically, so a reader (or a resumed run) never sees a partial file.
    The JSON goes first: it is the record every other format can be re-rendered from.

    Args:
        report: A report dict (schema version 1).
        run_dir: The run directory; created if missing.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "accuracy_matrix.csv", write_accuracy_csv(report))
    atomic_write_text(out / "report.md", render_markdown(report))
    plot_accuracy_matrix(report, out / "accuracy_matrix.png")


def load_report(run_dir_or_file: str | Path) -> dict[str, Any]:
    """Read and validate a ``report.json``.

    Args:
        run_dir_or_file: A run directory holding ``report.json``, or the file itself.

    Returns:
        The report dict.

    Raises:
        ContinualPeftError: If no report exists there or its schema version is not supported.
        CorruptFileError: If the file is truncated, not JSON, or lacks required keys.
    """
    source = Path(run_dir_or_file)
    if source.is_dir():
        source = source / "report.json"
    if not source.is_file():
        raise ContinualPeftError(
            f"no report at {source}; pass a run directory that holds report.json, or the file."
        )
    report = load_json(source)
    if not isinstance(report, dict) or "schema_version" not in report:
        raise CorruptFileError(source, "not a continual-peft report: no schema_version")
    version = report["schema_version"]
    if version != SCHEMA_VERSION:
        writer = (report.get("tool") or {}).get("version", "unknown")
        raise ContinualPeftError(
            f"{source} has schema_version {version!r} (written by continual-peft {writer}); "
            f"this version reads schema_version {SCHEMA_VERSION}. Use the continual-peft "
            "version that wrote it."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in report]
    if missing:
        raise CorruptFileError(source, f"missing keys {missing}")
    return report
