"""Rendering a comparison's leaderboard: console table, Markdown, CSV and the PNG plots.

Every writer reads only the leaderboard dict (the contents of leaderboard.json), so the files can
be re-rendered from it. Accuracies are fractions in the JSON and CSV, percentages elsewhere.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from continual_peft.reports.data import as_array, is_missing, md_table, metric_stats
from continual_peft.reports.grid import mean_std
from continual_peft.reports.plots import figure_png
from continual_peft.store.io import atomic_write_bytes, atomic_write_json, atomic_write_text

LEADERBOARD_FILES = (
    "leaderboard.json",
    "leaderboard.md",
    "leaderboard.csv",
    "acc_vs_params.png",
    "task_curves.png",
)  # plus sweep.png with a sweep
# (key, column title, signed): accuracies as percentages, transfer signed as in report.md
PERCENT_COLUMNS = (
    ("dev_acc", "dev ACC", False),
    ("acc", "ACC", False),
    ("bwt", "BWT", True),
    ("forgetting", "Forgetting", False),
    ("routed_acc", "routed ACC", False),
    ("route_or_merge_acc", "route-or-merge ACC", False),
    ("routing_acc", "routing", False),
    ("routed_over_oracle", "routed/oracle", False),
)
# columns left out when no entry measured them: (key, title)
_OPTIONAL = (
    ("dev_acc", "dev ACC"),
    ("routed_acc", "routed ACC"),
    ("route_or_merge_acc", "route-or-merge ACC"),
    ("routing_acc", "routing"),
    ("routed_over_oracle", "routed/oracle"),
)
_COUNTS = (
    ("trainable_parameters", "trainable params", "{:,.0f}"),
    ("stored_parameters", "stored params", "{:,.0f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("eval_seconds", "eval s", "{:.1f}"),
)


def _count(stats: dict[str, Any] | None, pattern: str) -> str:
    stats = stats or {}
    if is_missing(stats.get("mean")):
        return ""
    text = pattern.format(stats["mean"])
    std = stats.get("std")
    return text if is_missing(std) or std == 0 else f"{text} ± {pattern.format(std)}"


def _sweep_value(entry: dict[str, Any]) -> str:
    return str(entry["sweep"]["value"]) if entry.get("sweep") else ""


def _percent(board: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The percent columns some entry measured (dev ACC, routing: not every board has them)."""
    entries = board.get("entries") or []
    unmeasured = {
        key for key, _ in _OPTIONAL if not any((e.get(key) or {}).get("n") for e in entries)
    }
    return [column for column in PERCENT_COLUMNS if column[0] not in unmeasured]


def _swept_column(board: dict[str, Any]) -> bool:
    """Whether the table shows the swept value in a column of its own (a sweep of `module`
    shows it in the module column already)."""
    return bool(board.get("sweep")) and board["sweep"]["key"] != "module"


def _header(board: dict[str, Any]) -> list[str]:
    sweep = [board["sweep"]["key"]] if _swept_column(board) else []
    shown = [title for _, title, _ in _percent(board)]
    return ["#", "entry", "strategy", "module", *sweep, *shown, *(t for _, t, _ in _COUNTS)]


def _ranking(board: dict[str, Any]) -> str:
    return "best dev ACC first" if board.get("ranked_by") == "dev_acc" else "best ACC first"


def _chosen_lines(board: dict[str, Any]) -> list[str]:
    """One line per swept entry: the setting chosen on dev, its dev ACC and its test ACC."""
    return [
        f"chosen on dev for {c['base']}: {c['key']} = {c['value']} (dev ACC "
        f"{100 * c['dev_acc']:.1f}, test ACC {100 * c['acc']:.1f})"
        for c in board.get("chosen") or []
    ]


def _rows(board: dict[str, Any]) -> list[list[str]]:
    """One row per entry, in rank order; a failed entry shows its status instead of numbers."""
    rows = []
    for entry in board.get("entries") or []:
        sweep = [_sweep_value(entry)] if _swept_column(board) else []
        cells = [mean_std(entry.get(key), signed) for key, _, signed in _percent(board)]
        cells += [_count(entry.get(key), pattern) for key, _, pattern in _COUNTS]
        if entry["status"] != "finished":
            cells = [entry["status"]] + [""] * (len(cells) - 1)
        name = [str(entry["rank"]), entry["label"], entry["strategy"], entry["module"]]
        rows.append([*name, *sweep, *cells])
    return rows


def _title(board: dict[str, Any]) -> str:
    budget = board.get("budget") or {}
    runs = len(board.get("orders") or {}) * len(board.get("seeds") or [])
    return (
        f"{board.get('stream', '?')}: {len(board.get('entries') or [])} entries, "
        f"{runs} run(s) each ({len(board.get('orders') or {})} order(s) × "
        f"{len(board.get('seeds') or [])} seed(s)), {budget.get('train.epochs', '?')} epoch(s), "
        f"{board.get('status', '?')}"
    )


# console headers: short, complete words
_SHORT = {"trainable params": "params", "route-or-merge ACC": "RoM"}


def _console_table(board: dict[str, Any], layout: str) -> Table:
    """The table in one of three layouts, widest first: "boxed" (rich's default box), "compact"
    (no box, one space between columns) and "stacked" (compact, each ± std on a second line).
    Narrower than the Markdown table: no stored parameters or routed/oracle ratio, no strategy
    column when every label is its strategy."""
    entries = board.get("entries") or []
    header, rows = _header(board), _rows(board)
    # in leaderboard.md, .csv and .json: a terminal is narrow (routed/oracle: the two ACCs')
    hidden = {"stored params", "routed/oracle"}
    if all(e["label"] == e["strategy"] for e in entries):
        hidden.add("strategy")
    keep = [i for i, title in enumerate(header) if title not in hidden]
    shown = [[row[i] for i in keep] for row in rows]
    if layout == "stacked":
        shown = [[cell.replace(" ± ", "\n± ") for cell in row] for row in shown]
    title = f"Leaderboard (%), {_ranking(board)}; mean ± sample std over runs"
    compact = {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": (0, 0)}
    table = Table(title=title, **(compact if layout != "boxed" else {}))
    for column, i in enumerate(keep):
        name = _SHORT.get(header[i], header[i])
        text = i in (1, 2, 3) and header[i] in ("entry", "strategy", "module")
        # stacked: a number column is as wide as its longest line or header word, so only the text
        # columns give way on a narrow terminal, and they fold (overflow="fold": never "…")
        lines = [line for row in shown for line in row[column].split("\n")] + name.split()
        width = None if text or layout != "stacked" else max(len(line) for line in lines)
        table.add_column(name, justify="left" if text else "right", overflow="fold", width=width)
    for row in shown:
        table.add_row(*row)
    return table


class _FittedTable:
    """The leaderboard table in the widest layout that fits the console (see `_console_table`)."""

    def __init__(self, board: dict[str, Any]) -> None:
        self.board = board

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for layout in ("boxed", "compact"):
            table = _console_table(self.board, layout)
            unbounded = options.update_width(10_000)  # Measurement.get clamps to the width given
            if Measurement.get(console, unbounded, table).maximum <= options.max_width:
                yield table
                return
        yield _console_table(self.board, "stacked")


def console_leaderboard(board: dict[str, Any]) -> Group:
    """Rich renderable: the leaderboard table (percent; mean ± sample std over runs).

    It takes the console's width: short headers, and a narrower layout where the boxed one does
    not fit, so that no header or number is ever cut to "…".
    """
    failed = [e for e in board.get("entries") or [] if e.get("error")]
    notes = [Text(f"{e['label']} failed: {e['error']}", style="red") for e in failed]
    chosen = [Text(line, style="bold") for line in _chosen_lines(board)]
    return Group(Text(_title(board), style="bold"), _FittedTable(board), *chosen, *notes)


def _data_line(board: dict[str, Any]) -> list[str]:
    """How the stream's data was read (budget, excluded tasks, dev share), when recorded."""
    data = board.get("data") or {}
    if not data:
        return []
    parts = [f"budget {data.get('budget')}"]
    parts += [f"excluded {data['excluded']}"] if data.get("excluded") else []
    parts += [f"dev share {data['dev_share']}"] if data.get("dev_share") else []
    parts += [f"unknown labels: {data.get('unknown_labels')}"]
    return [f"- data: {', '.join(parts)}"]


def _md_per_order(board: dict[str, Any]) -> list[str]:
    """With several orders: each entry's ACC (and routed ACC) per order, mean ± sample std over
    that order's runs (seeds); nothing for a single order."""
    orders = list(board.get("orders") or {})
    if len(orders) < 2:
        return []
    rows = []
    for entry in board.get("entries") or []:
        runs = entry.get("runs") or []
        cells = []
        for order in orders:
            mine = [run for run in runs if run.get("order") == order]
            stats = metric_stats(mine, ["acc", "routed_acc"])
            routed = mean_std(stats["routed_acc"])
            cells.append(mean_std(stats["acc"]) + (f" ({routed})" if routed else ""))
        rows.append([entry["label"], *cells])
    intro = "ACC (routed ACC) per order, mean ± sample std over its seeds."
    return ["## Per order (%)", "", intro, "", *md_table(["entry", *orders], rows, left=1)]


def render_leaderboard_markdown(board: dict[str, Any]) -> str:
    """The contents of leaderboard.md: the table, the shared budget, failures and definitions."""
    budget = ", ".join(f"{k} = {v!r}" for k, v in (board.get("budget") or {}).items())
    lines = [
        f"# continual-peft leaderboard: {_title(board)}",
        "",
        f"- tasks: {', '.join(board.get('tasks') or [])}; seeds: {board.get('seeds')}; "
        f"orders: {', '.join(board.get('orders') or {})}",
        f"- the same for every entry: {budget}",
        *_data_line(board),
        *(f"- **{line}**" for line in _chosen_lines(board)),
        "",
        f"## Leaderboard (%), {_ranking(board)}",
        "",
        *md_table(_header(board), _rows(board), left=4),
        *_md_per_order(board),
        "## Entries",
        "",
    ]
    for entry in board.get("entries") or []:
        spec = f"`{entry['spec']}`" if entry.get("spec") else "default config"
        lines.append(
            f"- **{entry['label']}**: strategy {entry['strategy']}, {spec}, module "
            f"{entry['module']}, router {entry['router']}, lr {entry['lr']}; "
            f"runs in `{entry['run_dir']}/`"
            + (f"; **failed**: {entry['error']}" if entry.get("error") else "")
        )
    lines += ["", "## Definitions", ""]
    lines += [f"- **{key}**: {text}" for key, text in (board.get("definitions") or {}).items()]
    return "\n".join(lines) + "\n"


def write_leaderboard_csv(board: dict[str, Any]) -> str:
    """One row per entry: mean and std (fractions, seconds, counts); empty = not measured."""
    keys = [key for key, _, _ in _percent(board)] + [key for key, _, _ in _COUNTS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = ["rank", "label", "strategy", "spec", "module", "router", "sweep_key", "sweep_value"]
    writer.writerow([*head, "status", "runs", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))])
    for entry in board.get("entries") or []:
        sweep = entry.get("sweep") or {}
        cells = []
        for key in keys:
            stats = entry.get(key) or {}
            cells += ["" if is_missing(stats.get(f)) else repr(stats[f]) for f in ("mean", "std")]
        writer.writerow(
            [
                entry["rank"],
                entry["label"],
                entry["strategy"],
                entry.get("spec") or "",
                entry["module"],
                entry["router"],
                sweep.get("key", ""),
                sweep.get("value", ""),
                entry["status"],
                len(entry.get("runs") or []),
                *cells,
            ]
        )
    return buffer.getvalue()


# ---------------------------------------------------------------- plots


def _measured(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries with both an ACC and a parameter count."""
    return [
        e
        for e in board.get("entries") or []
        if not is_missing((e.get("acc") or {}).get("mean"))
        and not is_missing((e.get("trainable_parameters") or {}).get("mean"))
    ]


class AccPoint(NamedTuple):
    """Where an entry sits on the ACC-vs-parameters plots."""

    parameters: float  # mean trainable parameters over the stream
    acc: float  # mean ACC, %
    std: float  # sample std of ACC over runs, % (0 for a single run)


def _acc_point(entry: dict[str, Any]) -> AccPoint:
    std = entry["acc"].get("std")
    return AccPoint(
        parameters=entry["trainable_parameters"]["mean"],
        acc=100 * entry["acc"]["mean"],
        std=100 * (std or 0.0),
    )


def _scatter(ax: Axes, entries: list[dict[str, Any]], label_of, color: str | None = None) -> None:
    """ACC against trainable parameters (log x): labelled points with ± std error bars; entries
    on the same point share one label, so names never print over each other."""
    labels: dict[tuple[float, float], list[str]] = {}
    for entry in entries:
        x, y, err = _acc_point(entry)
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=4, color=color)
        labels.setdefault((x, round(y, 6)), []).append(label_of(entry))
    for (x, y), names in labels.items():
        text = ", ".join(names)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters over the stream (log)")
    ax.set_ylabel("ACC (%)")
    ax.grid(True, which="both", alpha=0.3)


def acc_vs_params_png(board: dict[str, Any]) -> bytes:
    """One labelled point per entry: ACC (error bars: sample std over runs) against parameters."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    _scatter(fig.subplots(), _measured(board), lambda e: e["label"])
    fig.suptitle(f"ACC vs trainable parameters: {board.get('stream', '?')}")
    return figure_png(fig)


def in_sweep_order(values) -> list[str]:
    """Distinct swept values, numerically sorted when they are numbers (the leaderboard itself is
    sorted by ACC, which would draw the curve out of order)."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def sweep_png(board: dict[str, Any]) -> bytes:
    """ACC against parameters (points labelled by value), and against the swept value."""
    key = (board.get("sweep") or {}).get("key", "?")
    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    entries = _measured(board)
    bases = list(dict.fromkeys(e["base"] for e in board.get("entries") or []))
    values = in_sweep_order(_sweep_value(e) for e in board.get("entries") or [])
    for number, base in enumerate(bases):
        color = f"C{number % 10}"
        mine = [e for e in entries if e["base"] == base]
        mine.sort(key=lambda e: values.index(_sweep_value(e)))
        points = [_acc_point(e) for e in mine]
        _scatter(left, mine, lambda e: f"{key}={_sweep_value(e)}", color)
        accs = [p.acc for p in points]
        left.plot([p.parameters for p in points], accs, "-", color=color, label=base)
        xs = [values.index(_sweep_value(e)) for e in mine]
        right.errorbar(
            xs,
            accs,
            yerr=[p.std for p in points],
            fmt="o-",
            capsize=4,
            color=color,
            label=base,
        )
    right.set_xticks(range(len(values)), labels=values)
    right.set_xlabel(key)
    right.set_ylabel("ACC (%)")
    right.grid(True, alpha=0.3)
    for ax in (left, right):
        if bases:
            ax.legend(fontsize=8)
    fig.suptitle(f"Sweep over {key}: {board.get('stream', '?')}")
    return figure_png(fig)


def task_curves_png(board: dict[str, Any]) -> bytes:
    """Mean accuracy over the tasks seen so far after each task (all entries), then per entry
    the accuracy on each task j after every task from j on (mean over runs, by position)."""
    entries = [e for e in board.get("entries") or [] if (e.get("curves") or {}).get("seen_acc")]
    cols = min(4, len(entries) + 1)
    rows = -(-(len(entries) + 1) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(entries) + 1 :]:
        ax.axis("off")
    first = axes[0]
    for entry in entries:
        seen = entry["curves"]["seen_acc"]
        first.plot(range(1, len(seen) + 1), [100 * v for v in seen], "o-", label=entry["label"])
    first.set_title("mean accuracy over tasks seen so far")
    for ax, entry in zip(axes[1:], entries, strict=False):
        matrix = as_array(entry["curves"]["matrix"])
        names = entry["curves"]["tasks"] or [f"task {j + 1}" for j in range(matrix.shape[1])]
        for j in range(matrix.shape[1]):
            steps = np.arange(j, matrix.shape[0])
            ax.plot(steps + 1, 100 * matrix[steps, j], "o-", markersize=3, label=names[j])
        ax.set_title(f"{entry['label']}: accuracy on each task")
    steps = max((len(e["curves"]["seen_acc"]) for e in entries), default=1)
    for ax in axes[: len(entries) + 1]:
        ax.set_xticks(range(1, steps + 1))
        ax.set_xlabel("after training task #")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Per-task accuracy curves (oracle routing): {board.get('stream', '?')}")
    return figure_png(fig)


def write_leaderboard(board: dict[str, Any], out_dir: str | Path) -> None:
    """Write leaderboard.json first (everything re-renders from it), then .md, .csv and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "leaderboard.json", board)
    atomic_write_text(out / "leaderboard.md", render_leaderboard_markdown(board))
    atomic_write_text(out / "leaderboard.csv", write_leaderboard_csv(board))
    atomic_write_bytes(out / "acc_vs_params.png", acc_vs_params_png(board))
    atomic_write_bytes(out / "task_curves.png", task_curves_png(board))
    if board.get("sweep"):
        atomic_write_bytes(out / "sweep.png", sweep_png(board))
