"""Report files from a hand-built report dict, and the atomic writers they rely on."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.metrics import METRIC_DEFINITIONS, compute_metrics
from continual_peft.reports.plots import heatmap_figure, loss_figure, plot_loss_curves
from continual_peft.reports.run import (
    LOSS_CURVES_FILE,
    REPORT_FILES,
    console_headline,
    console_report,
    load_report,
    render_markdown,
    write_accuracy_csv,
    write_reports,
)
from continual_peft.store.io import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    load_json,
    load_safetensors,
)

pytestmark = pytest.mark.real_plots  # the plots are what this file checks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORACLE = [[0.9, 0.3, None], [0.88, 0.8, 0.45], [0.85, 0.79, 0.9]]
ROUTED = [[0.9, 0.25, None], [0.7, 0.75, 0.4], [0.6, 0.7, 0.85]]
INITIAL = [0.25, 0.3, 0.5]


def _task(name: str, slot: int) -> dict[str, Any]:
    return {
        "name": name,
        "slot": slot,
        "labels": ["x", "y"],
        "train_examples": 300,
        "test_examples": 100,
        "trainable_parameters": 12345,
        "train_seconds": 1.2,
        "eval_seconds": 0.3,
        "final_train_loss": 0.12,
        "truncated_inputs": 0,
        "loss_curve": {"steps": [1, 5, 10], "loss": [1.5 - slot / 10, 0.8, 0.3]},
    }


@pytest.fixture
def report() -> dict[str, Any]:
    # "routed" is listed first on purpose: writers must show every mode, oracle first.
    matrices = {"routed": ROUTED, "oracle": ORACLE}
    seq = [[0.9, 0.3, None], [0.5, 0.8, 0.45], [0.3, 0.4, 0.9]]
    return {
        "schema_version": 1,
        "status": "finished",
        "updated": "2025-01-01T00:00:00+00:00",
        "tool": {"name": "continual-peft", "version": "0.1.0"},
        "stream": "demo",
        "strategy": "per_task",
        "config": {"module": {"kind": "lora", "r": 4}},
        "task_names": ["alpha", "beta", "gamma"],
        "tasks": [_task(name, slot) for slot, name in enumerate(["alpha", "beta", "gamma"])],
        "accuracy_matrix": matrices,
        "initial_accuracy": INITIAL,
        "metrics": {mode: compute_metrics(r, INITIAL) for mode, r in matrices.items()},
        "metric_definitions": METRIC_DEFINITIONS,
        "baseline": {
            "strategy": "seq",
            "accuracy_matrix": {"oracle": seq},
            "metrics": {"oracle": compute_metrics(seq, INITIAL)},
        },
    }


def _csv_blocks(text: str) -> dict[str, list[list[str]]]:
    """Parse accuracy_matrix.csv into mode -> rows (header excluded)."""
    blocks: dict[str, list[list[str]]] = {}
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] != "mode":
            blocks.setdefault(row[0], []).append(row)
    return blocks


def test_write_reports_writes_every_file(report: dict[str, Any], tmp_path: Path) -> None:
    write_reports(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*REPORT_FILES, LOSS_CURVES_FILE])
    assert (tmp_path / "accuracy_matrix.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / LOSS_CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    assert load_report(tmp_path) == report
    assert load_report(tmp_path / "report.json") == report


def test_csv_values_match_matrix(report: dict[str, Any], tmp_path: Path) -> None:
    write_reports(report, tmp_path)
    text = (tmp_path / "accuracy_matrix.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "mode,after_task,alpha,beta,gamma"
    blocks = _csv_blocks(text)
    assert list(blocks) == ["oracle", "routed"]
    for mode, rows in blocks.items():
        assert [row[1] for row in rows] == report["task_names"]
        for row, expected in zip(rows, report["accuracy_matrix"][mode], strict=True):
            assert [None if cell == "" else float(cell) for cell in row[2:]] == expected


def test_markdown_has_tasks_matrices_baseline_and_definitions(report: dict[str, Any]) -> None:
    text = render_markdown(report)
    for name in report["task_names"]:
        assert f"| {name} |" in text
    for definition in METRIC_DEFINITIONS.values():
        assert definition in text
    assert "routing: oracle" in text and "routing: routed" in text
    assert text.index("routing: oracle") < text.index("routing: routed")
    assert "| 88.0 | 80.0 | 45.0 |" in text  # row 2 of the oracle matrix, in percent
    assert "Comparison with baseline `seq`" in text
    # ACC per_task 84.7 vs seq 53.3: ((0.85 + 0.79 + 0.9) - (0.3 + 0.4 + 0.9)) / 3 = +31.3
    assert "| ACC (oracle) | 84.7 | 53.3 | +31.3 |" in text
    assert "| 12,345 |" in text


def test_console_report_shows_every_mode(report: dict[str, Any]) -> None:
    console = Console(record=True, width=120)
    console.print(console_report(report))
    text = console.export_text()
    assert "routing: oracle" in text and "routing: routed" in text
    assert "gamma" in text and "88.0" in text and "ACC" in text


def _headline_cells(text: str, label: str) -> list[str]:
    """The cells of the headline table's row `label`, read from the rendered console text."""
    headline = text[text.index("Headline (%)") :]
    line = next(line for line in headline.splitlines() if f"{label} (oracle)" in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def test_console_report_ends_with_the_baseline_headline(report: dict[str, Any]) -> None:
    console = Console(record=True, width=120)
    console.print(console_report(report))
    text = console.export_text()
    assert "Headline (%): per_task vs baseline seq" in text
    assert "difference = per_task − seq, in percentage points" in text
    ours, theirs = report["metrics"]["oracle"], report["baseline"]["metrics"]["oracle"]
    for key, label, pattern in (
        ("acc", "ACC", "{:.1f}"),
        ("bwt", "BWT", "{:+.1f}"),
        ("forgetting", "Forgetting", "{:.1f}"),
    ):
        a, b = 100 * ours[key], 100 * theirs[key]
        expected = [f"{label} (oracle)", pattern.format(a), pattern.format(b), f"{a - b:+.1f}"]
        assert _headline_cells(text, label) == expected
    # by hand: ACC per_task (0.85 + 0.79 + 0.9) / 3 = 84.7, seq (0.3 + 0.4 + 0.9) / 3 = 53.3
    assert _headline_cells(text, "ACC") == ["ACC (oracle)", "84.7", "53.3", "+31.3"]
    assert "routed)" not in text[text.index("Headline (%)") :]  # the baseline has no router


def test_console_report_without_baseline_has_no_headline(report: dict[str, Any]) -> None:
    report["baseline"] = None
    assert console_headline(report) is None
    console = Console(record=True, width=120)
    console.print(console_report(report))
    assert "Headline" not in console.export_text()


def test_heatmap_plots_the_matrices_in_percent(report: dict[str, Any]) -> None:
    fig = heatmap_figure(report)
    panels = [ax for ax in fig.axes if ax.images]
    expected = [ORACLE, ROUTED, report["baseline"]["accuracy_matrix"]["oracle"]]
    assert len(panels) == len(expected)
    for ax, matrix in zip(panels, expected, strict=True):
        percent = 100 * np.array([[np.nan if v is None else v for v in row] for row in matrix])
        image = ax.images[0]
        np.testing.assert_allclose(image.get_array().filled(np.nan), percent)
        assert image.get_clim() == (0.0, 100.0)
        cells = {
            (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
        }
        shown = {(i, j): f"{v:.1f}" for (i, j), v in np.ndenumerate(percent) if not np.isnan(v)}
        assert cells == shown
    assert "(%)" in fig.get_suptitle()
    assert [ax.get_ylabel() for ax in fig.axes if not ax.images][-1] == "accuracy (%)"


def test_loss_curves_plot_every_recorded_task(report: dict[str, Any], tmp_path: Path) -> None:
    del report["tasks"][1]["loss_curve"]  # a task of an older run
    report["tasks"][2]["loss_curve"] = {"steps": [], "loss": []}  # trained for 0 steps
    lines = loss_figure(report).axes[0].lines
    assert [line.get_label() for line in lines] == ["alpha"]
    assert list(lines[0].get_xdata()) == [1, 5, 10]
    assert list(lines[0].get_ydata()) == [1.5, 0.8, 0.3]
    write_reports(report, tmp_path)
    assert (tmp_path / LOSS_CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    assert f"`{LOSS_CURVES_FILE}`" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_no_loss_curve_writes_and_removes_nothing(report: dict[str, Any], tmp_path: Path) -> None:
    for task in report["tasks"]:
        del task["loss_curve"]
    (tmp_path / LOSS_CURVES_FILE).write_bytes(b"an earlier plot")
    write_reports(report, tmp_path)
    assert (tmp_path / LOSS_CURVES_FILE).read_bytes() == b"an earlier plot"
    assert LOSS_CURVES_FILE not in render_markdown(report)
    assert not plot_loss_curves(report, tmp_path / "other.png")
    assert not (tmp_path / "other.png").exists()


def test_nan_entries_are_blank(report: dict[str, Any]) -> None:
    report["accuracy_matrix"] = {"oracle": [[0.5, float("nan")], [0.4, 0.6]]}
    report["task_names"] = ["alpha", "beta"]
    assert write_accuracy_csv(report).splitlines()[1] == "oracle,alpha,0.5,"
    assert "| alpha | 50.0 |  |" in render_markdown(report)


def test_report_before_first_task_still_writes(tmp_path: Path) -> None:
    empty = {
        "schema_version": 1,
        "status": "running",
        "task_names": [],
        "tasks": [],
        "accuracy_matrix": {},
        "metrics": {},
    }
    write_reports(empty, tmp_path)
    assert (tmp_path / "accuracy_matrix.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / LOSS_CURVES_FILE).exists()  # no finished task, no curve to draw
    assert write_accuracy_csv(empty) == ""


def test_truncated_report_names_the_file(report: dict[str, Any], tmp_path: Path) -> None:
    write_reports(report, tmp_path)
    path = tmp_path / "report.json"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptFileError, match="report.json") as info:
        load_report(tmp_path)
    assert info.value.path == path


def test_missing_report_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ContinualPeftError, match="no report at"):
        load_report(tmp_path)


def test_wrong_schema_version_is_rejected(report: dict[str, Any], tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "report.json", {**report, "schema_version": 99})
    with pytest.raises(ContinualPeftError, match="schema_version 99"):
        load_report(tmp_path)


def test_report_without_required_keys_is_corrupt(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "report.json", {"schema_version": 1, "status": "running"})
    with pytest.raises(CorruptFileError, match="missing keys"):
        load_report(tmp_path)


# ---------------------------------------------------------------- atomic writers


def test_failed_write_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")

    def refuse(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ContinualPeftError, match="report.md: disk full. The previous"):
        atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_json_writes_nan_as_null(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"r": [[0.5, float("nan")]], "t": (1, float("inf"))})
    assert json.loads(path.read_text(encoding="utf-8")) == {"r": [[0.5, None]], "t": [1, None]}
    assert load_json(path) == {"r": [[0.5, None]], "t": [1, None]}


def test_load_json_missing_is_not_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ContinualPeftError, match="does not exist") as info:
        load_json(tmp_path / "nope.json")
    assert not isinstance(info.value, CorruptFileError)


def test_safetensors_round_trip_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "slot.safetensors"
    weight = torch.arange(12.0).reshape(3, 4).t()  # a non-contiguous view
    atomic_save_safetensors({"lora_A": weight}, path, metadata={"task": "alpha"})
    assert torch.equal(load_safetensors(path)["lora_A"], weight)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match="slot.safetensors"):
        load_safetensors(path)


def test_a_schema_version_mismatch_says_where_the_file_comes_from(
    report: dict[str, Any], tmp_path: Path
) -> None:
    """The writer's version is named only when the file names one that is not this one."""
    from continual_peft import __version__

    older = {**report, "schema_version": 0, "tool": {"name": "continual-peft", "version": "0.0.1"}}
    atomic_write_json(tmp_path / "report.json", older)
    with pytest.raises(ContinualPeftError, match="written by continual-peft 0.0.1: read it with"):
        load_report(tmp_path)
    edited = {**report, "schema_version": 99}  # this version's tool field: edited, not older
    atomic_write_json(tmp_path / "report.json", edited)
    with pytest.raises(ContinualPeftError, match="from another version of continual-peft, or"):
        load_report(tmp_path)
    assert edited["tool"]["version"] == __version__
