"""The run's PNG plots: the accuracy-matrix heatmap (R per routing mode, the routing accuracy and
the baseline, in percent) and the training-loss curve of every task."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from continual_peft.reports.data import as_array, is_missing
from continual_peft.reports.data import matrix_of as _matrix
from continual_peft.reports.data import report_modes as _modes
from continual_peft.reports.data import task_names as _names
from continual_peft.store.io import atomic_write_bytes

MAX_SIDE = 8.0  # inches of cells per panel: reached at 14 tasks, kept for longer streams
MAX_TICKS = 25  # task names per axis at most


def heatmap_panels(report: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(title, matrix in percent) per panel: R per routing mode and the routing accuracy, then the
    baseline's R beside them; a matrix with no finished task yet (0 x 0, a run stopped in its first
    task) has no panel. The report's fractions become percent here, once, for every panel."""
    strategy = report.get("strategy", "?")
    panels = [(f"{strategy}: R\nrouting: {mode}", _matrix(report, mode)) for mode in _modes(report)]
    if report.get("routing_accuracy"):
        title = f"{strategy}: routing accuracy\n(share of task j routed to j)"
        panels.append((title, as_array(report["routing_accuracy"])))
    baseline = report.get("baseline") or {}
    for mode in _modes(baseline):
        title = f"baseline {baseline.get('strategy', '?')}: R\nrouting: {mode}"
        panels.append((title, _matrix(baseline, mode)))
    return [(title, 100 * data) for title, data in panels if data.size]


def _draw_heatmap(ax: Axes, report: dict[str, Any], title: str, data: np.ndarray) -> AxesImage:
    names = _names(report, max(data.shape))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=100.0)
    long_names = max((len(name) for name in names), default=0) > 4
    step = math.ceil(max(data.shape) / MAX_TICKS)  # long streams: every step-th task is named
    ax.set_xticks(range(0, data.shape[1], step), labels=names[: data.shape[1] : step])
    if long_names:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_yticks(range(0, data.shape[0], step), labels=names[: data.shape[0] : step])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    if max(data.shape) <= 20:  # beyond that the numbers no longer fit in their cells
        size = 9 if max(data.shape) <= 8 else 7 if max(data.shape) <= 15 else 6
        for (i, j), value in np.ndenumerate(data):
            if not math.isnan(value):
                color = "white" if value < 55 else "black"  # viridis is dark at the low end
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=color, fontsize=size)
    return image


def heatmap_figure(report: dict[str, Any]) -> Figure:
    """The heatmaps as a bare Figure (pyplot's global state stays untouched), colour bar in %."""
    panels = heatmap_panels(report)
    size = max([max(data.shape) for _, data in panels] + [1])
    # cells shrink past MAX_SIDE, so a long stream's figure (and its memory) stays bounded
    side = max(3.6, min(0.6 * size, MAX_SIDE) + 2.0)
    width = side * max(len(panels), 1) + 1.2
    dpi = 150 if size <= 8 else 100  # fewer pixels per cell for long streams: bounded memory
    fig = Figure(figsize=(width, side + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    images = [_draw_heatmap(ax, report, *panel) for ax, panel in zip(axes, panels, strict=False)]
    if images:
        fig.colorbar(images[-1], ax=list(axes), label="accuracy (%)", shrink=0.8)
    else:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no task evaluated yet", ha="center", va="center")
    stream, strategy = report.get("stream", "?"), report.get("strategy", "?")
    fig.suptitle(f"Accuracy matrix R (%): {stream} / {strategy}")
    return fig


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """A bare Figure rendered to PNG bytes (Agg canvas; pyplot's global state stays untouched)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_accuracy_matrix(report: dict[str, Any], path: str | Path) -> None:
    """Write a heatmap PNG of R, one panel per routing mode, cells annotated in percent.

    The color scale is fixed to 0-100 % so heatmaps of different runs compare at a glance;
    unmeasured entries stay white. Rendering uses a bare ``Figure`` with the Agg canvas instead of
    pyplot, so it works headless and never switches the caller's matplotlib backend.

    Args:
        report: A report dict (schema version 1).
        path: Target PNG file, written atomically.
    """
    atomic_write_bytes(path, heatmap_png(report))


def heatmap_png(report: dict[str, Any]) -> bytes:
    fig = heatmap_figure(report)
    return figure_png(fig, dpi=fig.dpi)  # the figure's own dpi: fewer pixels for long streams


# ---------------------------------------------------------------- loss curves


def loss_curves(report: dict[str, Any]) -> list[tuple[str, list[int], list[float]]]:
    """(task name, steps, mean losses) per finished task that recorded a non-empty loss curve;
    tasks of older runs (no ``loss_curve`` key) and tasks trained for 0 steps are left out."""
    curves = []
    for task in report.get("tasks") or []:
        curve = task.get("loss_curve") or {}
        # zip: a plot is no place to fail a run over a record the engine wrote inconsistently
        points = list(zip(curve.get("steps") or [], curve.get("loss") or [], strict=False))
        if points:
            steps = [int(step) for step, _ in points]
            losses = [math.nan if is_missing(loss) else float(loss) for _, loss in points]
            curves.append((str(task.get("name", "?")), steps, losses))
    return curves


def loss_figure(report: dict[str, Any]) -> Figure:
    """One line per task: mean training loss against the training step within that task."""
    curves = loss_curves(report)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    many = len(curves) > 10  # past the default colour cycle: one colour map, in task order
    for number, (name, steps, losses) in enumerate(curves):
        color = colormaps["viridis"](number / max(len(curves) - 1, 1)) if many else None
        marker = "o" if len(steps) < 30 else None  # a short curve still shows its points
        ax.plot(steps, losses, marker=marker, markersize=3, linewidth=1.2, color=color, label=name)
    ax.set_xlabel("training step within the task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("mean training loss")
    ax.grid(True, alpha=0.3)
    if curves:
        columns = math.ceil(len(curves) / 20)
        ax.legend(fontsize=7, ncols=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"Training loss per task: {report.get('stream', '?')} / {report.get('strategy', '?')}"
    )
    return fig


def plot_loss_curves(report: dict[str, Any], path: str | Path) -> bool:
    """Write a PNG of every task's training-loss curve, if any task recorded one.

    Args:
        report: A report dict (schema version 1); each task record may hold
            ``loss_curve = {"steps": [...], "loss": [...]}``.
        path: Target PNG file, written atomically.

    Returns:
        Whether the file was written; with no curve (an older run, no finished task yet) nothing
        is written and an existing file is left as it is.
    """
    if not loss_curves(report):
        return False
    atomic_write_bytes(path, figure_png(loss_figure(report)))
    return True
