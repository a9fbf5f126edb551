"""Soak: a stream of 30 tiny tasks through per-task LoRA and the Mahalanobis router (its default
"auto" layers: three depths side by side) leaves a run directory that grows by each task's own
files, holds bounded memory and writes correct reports; with a slot budget the bank stays at it.

The CI-short version of benchmarks/soak.py, whose model, tasks, run-directory census and
untimed checks it imports (timed assertions belong to the benchmark, not the suite). A task's own
files are those of its folder that are not the run's shared state (`soak.SHARED_FILES`: the
router's and strategy's state and the checkpoint's copy): its slot, head, record and any
per-task rows. A run that copies the router's shared covariance (d x d float64, d = 3 x 64)
into every task folder grows by ~10x a task's own bytes and fails the growth checks.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from continual_peft import ContinualLearner
from continual_peft.reports.plots import heatmap_png


def load_benchmark():
    """benchmarks/soak.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


soak = load_benchmark()
N_TASKS = 30  # each task re-evaluates every earlier one: the cost grows as N_TASKS²
# 64 wide and 4 blocks deep: "auto" reads blocks 1, 3 and 4 (192 features), as on a real model
SHAPE = soak.Shape(hidden=64, layers=4, heads=2, intermediate=128, train_rows=16, test_rows=4)
BUDGET = 4  # slots the budgeted run may hold
BUDGET_TASKS = 8


@pytest.fixture(scope="module")
def soaked(tmp_path_factory) -> soak.Soak:
    """The 30-task soak, finished (PNG plots off, as in the whole suite: conftest.py)."""
    config = soak.soak_config(SHAPE, threads=1)
    run = tmp_path_factory.mktemp("soak") / "run"
    learner = ContinualLearner(soak.soak_backbone(N_TASKS, SHAPE), config=config, run_dir=run)
    runner = soak.Soak(learner)
    for k in range(N_TASKS):
        runner.learn(soak.soak_task(k, SHAPE))
    learner.finish()
    return runner


def test_the_router_reads_several_depths(soaked):
    assert soaked.learner.router.dim == 3 * SHAPE.hidden


def test_the_run_directory_grows_by_each_task_own_bytes(soaked):
    check = soak.growth_check(soaked.rows)
    print(f"\n{check.detail}")
    assert check.passed, check.detail


def test_no_shared_state_is_written_per_task(soaked):
    check = soak.copies_check(soaked.rows, soaked.run)
    print(f"\n{check.detail}")
    assert check.passed, check.detail


def test_resident_memory_stays_bounded(soaked):
    # The bound allows 64 MB of allocator noise plus twice the bytes the later tasks' slots and
    # heads hold (about 35 kB a task here); a leak of features, graphs or router copies per task
    # (a d x d covariance is 295 kB) over 22 tasks stays below it only if far smaller than those.
    check = soak.memory_check(soaked.rows)
    print(f"\n{check.detail}")
    assert check.passed, check.detail


def recompute(R: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The metrics of docs/metrics.md, from the matrix alone (0-based indices)."""
    T = len(R)
    return {
        "acc": R[-1].mean(),
        "avg_incremental_acc": np.mean([R[i, : i + 1].mean() for i in range(T)]),
        "bwt": np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]),
        "fwt": np.mean([R[j - 1, j] - b[j] for j in range(1, T)]),
        "forgetting": np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)]),
    }


def test_the_saved_report_holds_every_task_and_its_metrics(soaked):
    report = json.loads((soaked.run / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "finished"
    assert report["task_names"] == [f"t{k:04d}" for k in range(N_TASKS)]
    assert len(list((soaked.run / "tasks").iterdir())) == N_TASKS
    b = np.array(report["initial_accuracy"], dtype=float)
    for mode in ("oracle", "routed"):
        R = np.array(report["accuracy_matrix"][mode], dtype=float)  # None -> nan
        assert R.shape == (N_TASKS, N_TASKS)
        assert np.isfinite(R[np.tril_indices(N_TASKS)]).all()
        expected = recompute(R, b if mode == "oracle" else np.full(N_TASKS, np.nan))
        saved = report["metrics"][mode]
        for name, value in expected.items():
            if np.isnan(value):  # routed FWT: no routed "before" values exist
                assert saved[name] is None, (mode, name)
            else:
                assert saved[name] == pytest.approx(value, abs=1e-12), (mode, name)
    # per-task slots are frozen: no oracle forgetting at all
    assert report["metrics"]["oracle"]["forgetting"] == pytest.approx(0.0, abs=1e-12)
    # a long stream's Markdown shows each matrix's last row; the CSV holds every row
    markdown = (soaked.run / "report.md").read_text(encoding="utf-8")
    assert f"The last row only (after task {N_TASKS}" in markdown
    assert f"\n| t{0:04d} |" not in markdown.split("## Metrics")[0]  # no row of task 1
    csv_rows = (soaked.run / "accuracy_matrix.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_rows) > N_TASKS


def test_a_slot_budget_holds_the_bank_at_max_slots(tmp_path):
    if not soak.has_config_field("max_slots"):
        pytest.skip("LearnerConfig has no max_slots field in this tree (no slot budget yet)")
    config = soak.soak_config(SHAPE, threads=1, **soak.optional_settings(max_slots=BUDGET))
    backbone = soak.soak_backbone(BUDGET_TASKS, SHAPE)
    with ContinualLearner(backbone, config=config, run_dir=tmp_path / "run") as learner:
        for k in range(BUDGET_TASKS):
            learner.learn(soak.soak_task(k, SHAPE))
    check = soak.budget_check(learner, BUDGET, BUDGET_TASKS)
    assert check.passed, check.detail
    assert soak.consolidations(learner), "a budget exceeded must record its consolidations"


def test_the_heatmap_stays_bounded_for_long_streams():
    """The PNG's pixels stop growing past 20 tasks (they grew with T², ~70 Mpixel at 50 tasks)."""
    sizes = []
    for t in (21, 100):
        rows = [[0.5] * (i + 1) + [None] * (t - i - 1) for i in range(t)]
        report = {
            "strategy": "per_task",
            "task_names": [f"t{k:03d}" for k in range(t)],
            "accuracy_matrix": {"oracle": rows, "routed": rows},
            "routing_accuracy": rows,
        }
        png = heatmap_png(report)
        width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR
        sizes.append(width * height)
    assert sizes[0] == sizes[1] < 10e6, sizes
