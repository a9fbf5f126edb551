"""Reports of a run, rendered from the plain report dict the engine builds after every task.

One dict (schema version 1, see DESIGN.md) feeds every format: a rich console table, ``report.md``,
``accuracy_matrix.csv``, an ``accuracy_matrix.png`` heatmap, a ``loss_curves.png`` plot and
``report.json`` itself. The keys of ``accuracy_matrix`` and ``metrics`` are routing modes ("oracle",
later "routed", ...); every writer loops over the modes present, with "oracle" and "routed" merely
shown first. Units: fractions (0-1) in the JSON and CSV, percent on every surface read by people.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.reports.data import (
    backbone_summary,
    md_table,
    named_matrices,
    rejection_table,
)
from continual_peft.reports.data import (
    is_missing as _missing,
)
from continual_peft.reports.data import (
    matrix_of as _matrix,
)
from continual_peft.reports.data import (
    pct as _pct,
)
from continual_peft.reports.data import (
    report_modes as _modes,
)
from continual_peft.reports.data import (
    task_names as _names,
)
from continual_peft.reports.plots import loss_curves, plot_accuracy_matrix, plot_loss_curves
from continual_peft.store.io import (
    atomic_write_json,
    atomic_write_text,
    load_versioned_json,
)

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "accuracy_matrix.csv", "report.md", "accuracy_matrix.png")
LOSS_CURVES_FILE = "loss_curves.png"  # only once a finished task has recorded a loss curve
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
    ("metric", "metric (R)", "{}"),  # accuracy, or exact_match for a generation task
    ("slot", "slot", "{}"),
    ("train_examples", "train ex.", "{:,}"),
    ("test_examples", "test ex.", "{:,}"),
    ("trainable_parameters", "trainable params", "{:,}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("eval_seconds", "eval s", "{:.1f}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("truncated_inputs", "truncated inputs", "{:,}"),
)


def _fmt(value: Any, pattern: str) -> str:
    return "" if _missing(value) else pattern.format(value)


# ---------------------------------------------------------------- console


def _console_matrix(report: dict[str, Any], title: str, data: np.ndarray) -> Table:
    names = _names(report, max(data.shape))
    table = Table(title=title, min_width=len(title) + 4)  # a title never wraps
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


def console_headline(report: dict[str, Any]) -> Table | None:
    """Rich table of the headline: ACC, BWT and Forgetting against the baseline, in percent.

    Args:
        report: A report dict (schema version 1).

    Returns:
        The table, or None when the report has no baseline (or no metric both runs measured).
    """
    header, rows = _baseline_rows(report)
    if not rows:
        return None
    ours, theirs = _compared_names(report)
    title = f"Headline (%): {ours} vs baseline {theirs}"
    caption = f"difference = {ours} − {theirs}, in percentage points"
    return _console_table(title, header, rows, caption, min_width=len(caption) + 4)


def _console_table(
    title: str, header: list[str], rows: list[list[str]], caption: str, min_width: int = 0
) -> Table:
    """A rich table: the first column bold, the others right-aligned."""
    table = Table(title=title, caption=caption, min_width=min_width)
    table.add_column(header[0], style="bold")
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def console_report(report: dict[str, Any]) -> Group:
    """Rich renderable of a report: R per routing mode, the metrics, then the headline comparison
    with the baseline when there is one.

    Args:
        report: A report dict (schema version 1).

    Returns:
        A group of tables, ready for ``rich.console.Console().print``.
    """
    header = Text(
        f"{report.get('stream', '?')} / {report.get('strategy', '?')}: "
        f"{len(report.get('task_names') or [])} task(s), {report.get('status', '?')}. "
        "R rows: after training task; columns: evaluated on task." + _metric_note(report),
        style="bold",
    )
    backbone = backbone_summary(report)
    tables = [Text(f"backbone: {backbone}")] if backbone else []
    if report.get("reevaluation"):
        tables.append(Text(f"re-evaluation: {report['reevaluation']}"))
    tasks = report.get("tasks") or []
    if tasks and tasks[-1].get("consolidation"):  # the slot budget made room for the newest
        tables.append(Text(consolidation_line(tasks[-1]), style="bold"))
    tables += [_console_matrix(report, *named) for named in named_matrices(report)]
    if report.get("metrics"):
        tables.append(_console_metrics(report))
    if report.get("routed_over_oracle") is not None:
        tables.append(Text(f"routed ACC / oracle ACC: {report['routed_over_oracle']:.3f}"))
    rejection = _console_rejection(report)
    if rejection is not None:
        tables.append(rejection)
    headline = console_headline(report)
    if headline is not None:
        tables.append(headline)
    return Group(header, *tables)


def consolidation_line(task: dict[str, Any]) -> str:
    """What the slot budget merged to make room for a task (its record's `consolidation`)."""
    facts = task["consolidation"]
    kept, freed = facts["slots"]
    line = (
        f"slot budget: before {task.get('name')}, slots {kept} and {freed} merged into slot "
        f"{kept} (cosine similarity {facts['similarity']:.3f}); it now serves "
        f"{', '.join(facts['tasks'])}"
    )
    if facts.get("kept_energy") is not None:
        line += f"; the rank-r merge keeps {100 * facts['kept_energy']:.1f} % of their mean update"
    return line + ". What it cost shows in the next row of the matrices."


def _console_rejection(report: dict[str, Any]) -> Table | None:
    """The per-task routing and rejection table (`rejection_table`), None without rejection."""
    rejection = rejection_table(report)
    if rejection is None:
        return None
    caption, columns, rows = rejection
    return _console_table("Routing and rejection after the last task (%)", columns, rows, caption)


def _metric_note(report: dict[str, Any]) -> str:
    """Which metric each column holds, where some task's is not accuracy."""
    metrics = [(t.get("name"), t.get("metric", "accuracy")) for t in report.get("tasks") or []]
    if all(metric == "accuracy" for _, metric in metrics):
        return ""
    return " Metric per column: " + ", ".join(f"{n}: {m.replace('_', ' ')}" for n, m in metrics)


# ---------------------------------------------------------------- markdown


def _md_tasks(report: dict[str, Any]) -> list[str]:
    header = ["#", "task", "labels", *(title for _, title, _ in _TASK_COLUMNS)]
    rows = []
    for number, task in enumerate(report.get("tasks") or [], start=1):
        cells = [_fmt(task.get(key), pattern) for key, _, pattern in _TASK_COLUMNS]
        rows.append([str(number), task.get("name", ""), str(len(task.get("labels") or [])), *cells])
    if not rows:
        return []
    return ["## Tasks", "", *md_table(header, rows, left=2), *_md_data_notes(report)]


def _md_data_notes(report: dict[str, Any]) -> list[str]:
    """The tasks' dev splits (where each came from) and the records left out for want of a
    known label, per split; nothing when there are none."""
    notes = []
    for task in report.get("tasks") or []:
        if task.get("dev_examples"):
            where = (task.get("sources") or {}).get("dev", "given")
            notes.append(f"- {task['name']}: dev split of {task['dev_examples']} ({where})")
        for split, left in (task.get("skipped_records") or {}).items():
            counts = ", ".join(f"`{label}` x{n}" for label, n in left.items())
            notes.append(
                f"- {task['name']}: {sum(left.values())} {split} record(s) left out, their "
                f"label not one of the task's: {counts}"
            )
    dev = report.get("dev") or {}
    if dev.get("acc") is not None:
        notes.append(
            f"- dev ACC after the last task (mean over {len(dev.get('tasks') or [])} tasks, "
            f"oracle): **{100 * dev['acc']:.1f} %**"
        )
    return [*notes, ""] if notes else []


# report.md shows whole matrices up to this many tasks, and beyond it their last row only
MD_MATRIX_TASKS = 20


def _md_matrix(report: dict[str, Any], title: str, data: np.ndarray) -> list[str]:
    names = _names(report, max(data.shape))
    rows = [[names[i], *(_pct(v) for v in row)] for i, row in enumerate(data)]
    intro = "Row: after training task; column: evaluated on task; blank: not measured."
    if len(rows) > MD_MATRIX_TASKS:  # T² cells nobody reads in Markdown: the CSV has them all
        rows = rows[-1:]
        intro = (
            f"The last row only (after task {len(data)}: accuracy on every task); every row is "
            "in accuracy_matrix.csv and report.json. Blank: not measured."
        )
    table = md_table(["after \\ on", *names[: data.shape[1]]], rows)
    return [f"## {title}", "", intro, "", *table]


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
    lines = ["## Metrics (%)", "", *md_table(["metric", *modes], rows)]
    initial = report.get("initial_accuracy")
    if initial:
        pairs = zip(_names(report, len(initial)), initial, strict=True)
        shown = ", ".join(f"{name} {_pct(value) or 'n/a'}" for name, value in pairs)
        lines += [f"Initial accuracy b[j] (%): {shown}.", ""]
    return lines


def _compared_names(report: dict[str, Any]) -> tuple[str, str]:
    baseline = report.get("baseline") or {}
    return str(report.get("strategy", "this run")), str(baseline.get("strategy", "baseline"))


def _baseline_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (percent) of ACC, BWT and Forgetting against the baseline, per mode both
    runs measured; the difference is ours minus the baseline's, in percentage points."""
    ours, theirs = _compared_names(report)
    header = ["metric", ours, theirs, "difference"]
    base_metrics = (report.get("baseline") or {}).get("metrics") or {}
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
    return header, rows


def _md_baseline(report: dict[str, Any]) -> list[str]:
    if not report.get("baseline"):
        return []
    ours, theirs = _compared_names(report)
    header, rows = _baseline_rows(report)
    note = f"Difference: {ours} minus {theirs}, in percentage points."
    return [f"## Comparison with baseline `{theirs}` (%)", "", note, "", *md_table(header, rows)]


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
        f"- backbone: {backbone_summary(report) or 'not recorded'}",
        f"- written by {tool.get('name', 'continual-peft')} {tool.get('version', '?')}",
    ]
    if report.get("reevaluation"):  # a schedule that leaves entries unmeasured or sampled
        lines.append(f"- re-evaluation: {report['reevaluation']}")
    lines += [""]
    lines += _md_tasks(report)
    merged = [consolidation_line(t) for t in report.get("tasks") or [] if t.get("consolidation")]
    if merged:
        budget = (report.get("config") or {}).get("max_slots")
        lines += [f"## Slot budget: at most {budget} slots", ""]
        lines += [f"- {line}" for line in merged] + [""]
    for named in named_matrices(report):
        lines += _md_matrix(report, *named)
    lines += _md_metrics(report) + _md_baseline(report)
    if loss_curves(report):
        lines += [f"Training loss per task: `{LOSS_CURVES_FILE}`.", ""]
    if report.get("routed_over_oracle") is not None:
        lines += [f"Routed ACC / oracle ACC: **{report['routed_over_oracle']:.3f}**", ""]
    rejection = rejection_table(report)
    if rejection is not None:
        caption, header, rows = rejection
        lines += ["## Routing and rejection after the last task (%)", "", caption, ""]
        lines += md_table(header, rows)
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


# ---------------------------------------------------------------- files


def write_reports(report: dict[str, Any], run_dir: str | Path, plots: bool = True) -> None:
    """Write ``report.json``, ``accuracy_matrix.csv``, ``report.md``, and with `plots`
    ``accuracy_matrix.png`` and, once a finished task has recorded its training loss,
    ``loss_curves.png``.

    Each file is replaced atomically, so a reader (or a resumed run) never sees a partial file.
    The JSON goes first: it is the record every other format can be re-rendered from.

    Args:
        report: A report dict (schema version 1).
        run_dir: The run directory; created if missing.
        plots: Redraw the PNG plots too (about a second and a half of matplotlib; see
            `plots_due`).
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the matrices hold T² numbers: indented for a short stream, one line beyond
    long = len(report.get("tasks") or []) > PLOT_EVERY_TASK_UP_TO
    atomic_write_json(out / "report.json", report, compact=long)
    atomic_write_text(out / "accuracy_matrix.csv", write_accuracy_csv(report))
    atomic_write_text(out / "report.md", render_markdown(report))
    if plots:
        plot_accuracy_matrix(report, out / "accuracy_matrix.png")
        plot_loss_curves(report, out / LOSS_CURVES_FILE)


PLOT_EVERY_TASK_UP_TO = 20  # then every `PLOT_EVERY`-th task, and when the run ends
PLOT_EVERY = 10


def plots_due(tasks_done: int) -> bool:
    """Whether the report after `tasks_done` tasks redraws its PNG plots: after each of the
    first 20 tasks, then after every 10th (and always when the run ends), so that on a stream
    of hundreds of small tasks drawing does not cost more than learning."""
    return tasks_done <= PLOT_EVERY_TASK_UP_TO or tasks_done % PLOT_EVERY == 0


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
    report = load_versioned_json(
        run_dir_or_file,
        "report",
        SCHEMA_VERSION,
        "pass a run directory that holds report.json, or the file.",
        tagged=False,
    )
    source = Path(run_dir_or_file)
    source = source / "report.json" if source.is_dir() else source
    missing = [key for key in _REQUIRED_KEYS if key not in report]
    if missing:
        raise CorruptFileError(source, f"missing keys {missing}")
    return report


def reports_intact(run_dir: str | Path) -> bool:
    """Whether a run directory's report.md is there and its report.json reads back (the PNGs
    are pictures of these)."""
    run = Path(run_dir)
    if not (run / "report.md").is_file():
        return False
    try:
        load_report(run)
    except ContinualPeftError:
        return False
    return True
