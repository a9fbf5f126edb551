"""The accuracy-matrix heatmap PNG: R per routing mode, the routing accuracy, and the baseline."""

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

from continual_peft._io import atomic_write_bytes
from continual_peft._report_data import as_array
from continual_peft._report_data import matrix_of as _matrix
from continual_peft._report_data import report_modes as _modes
from continual_peft._report_data import task_names as _names

MAX_SIDE = 8.0  # inches of cells per panel: reached at 14 tasks, kept for longer streams
MAX_TICKS = 25  # task names per axis at most


def _panels(report: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """R per routing mode and the routing accuracy, then the baseline's R beside them; a matrix
    with no finished task yet (0 x 0, a run stopped in its first task) has no panel."""
    strategy = report.get("strategy", "?")
    panels = [(f"{strategy}: R\nrouting: {mode}", _matrix(report, mode)) for mode in _modes(report)]
    if report.get("routing_accuracy"):
        title = f"{strategy}: routing accuracy\n(share of task j routed to j)"
        panels.append((title, as_array(report["routing_accuracy"])))
    baseline = report.get("baseline") or {}
    for mode in _modes(baseline):
        title = f"baseline {baseline.get('strategy', '?')}: R\nrouting: {mode}"
        panels.append((title, _matrix(baseline, mode)))
    return [(title, data) for title, data in panels if data.size]


def _draw_heatmap(ax: Axes, report: dict[str, Any], title: str, data: np.ndarray) -> AxesImage:
    names = _names(report, max(data.shape))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0)
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
                color = "white" if value < 0.55 else "black"  # viridis is dark at the low end
                text = f"{100 * value:.1f}"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
    return image


def _heatmap_png(report: dict[str, Any]) -> bytes:
    """Render the heatmaps to PNG bytes; a bare Figure keeps pyplot's global state untouched."""
    panels = _panels(report)
    size = max([max(data.shape) for _, data in panels] + [1])
    # cells shrink past MAX_SIDE, so a long stream's figure (and its memory) stays bounded
    side = max(3.6, min(0.6 * size, MAX_SIDE) + 2.0)
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
    return figure_png(fig, dpi=150 if size <= 8 else 100)


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """A bare Figure rendered to PNG bytes (Agg canvas; pyplot's global state stays untouched)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
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
