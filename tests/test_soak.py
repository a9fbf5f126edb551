"""Soak: a stream of 30 tiny tasks runs to the end with bounded memory and correct reports.

Each task is a two-label keyword task on the tiny BERT (1 epoch, per-task LoRA r=1, a prototype
router), written to a run directory after every task. Memory: the process's resident set is
sampled after each task; what a task legitimately adds (its LoRA slot, head, router prototype,
an accuracy-matrix row, its cached test items and features) is a few kB, so the growth from task
10 to task 30 must stay far below anything a leak of activations, graphs or whole copies of the
bank would cost (benchmarks/soak.py runs longer streams). Reports: ACC, BWT, FWT and forgetting
are recomputed from the saved matrices with plain numpy and compared with the saved metrics.
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import psutil
import pytest

from continual_peft import ContinualLearner, LearnerConfig, LoRAConfig, Task, TrainConfig
from continual_peft.config import BackboneConfig
from continual_peft.reports.plots import heatmap_png

N_TASKS = 30  # each task re-evaluates every earlier one: the cost grows as N_TASKS²
WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tea", "milk", "car", "bus", "oak", "elm"]
FILLER = ["the", "a", "big", "small", "old", "new", "one", "two", "here", "there", "now"]
# Measured on the 2-core CPU box: RSS after task 10 and after task 30 differ by about 1 MB
# (454 -> 455 MB; 455 -> 456 MB from task 10 to 50): each task's state is a few kB. 24 MB is far
# above that noise and far below what a leak would cost over 20 tasks: a copy of the tiny
# backbone per task (~4 MB each) or of the bank would add 80 MB or more.
RSS_GROWTH_LIMIT_MB = 24


def soak_task(k: int) -> Task:
    """Task k: which of two keywords (its own pair) a short sentence holds."""
    rng = random.Random(k)
    labels = rng.sample(WORDS, 2)

    def sample(n: int) -> list[tuple[str, str]]:
        rows = []
        for i in range(n):
            words = [labels[i % 2], *rng.sample(FILLER, 2)]
            rng.shuffle(words)
            rows.append((" ".join(words), labels[i % 2]))
        return rows

    return Task.from_examples(f"t{k:03d}", train=sample(8), test=sample(4), labels=labels)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def recompute(R: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The metrics of DESIGN.md, from the matrix alone (0-based indices)."""
    T = len(R)
    return {
        "acc": R[-1].mean(),
        "avg_incremental_acc": np.mean([R[i, : i + 1].mean() for i in range(T)]),
        "bwt": np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]),
        "fwt": np.mean([R[j - 1, j] - b[j] for j in range(1, T)]),
        "forgetting": np.mean([R[j : T - 1, j].max() - R[-1, j] for j in range(T - 1)]),
    }


def test_a_long_stream_runs_to_the_end_with_bounded_memory(make_backbone, tmp_path):
    # No PNGs here (conftest.py): the heatmap alone cost ~1.5 s a task past 20 tasks; its size
    # is bounded (test below), and benchmarks/soak.py keeps the plots in.
    config = LearnerConfig(
        router="prototype",
        modules={"lora": LoRAConfig(r=1)},
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0),
        backbone=BackboneConfig(max_length=16),
    )
    learner = ContinualLearner(make_backbone(16), config=config, run_dir=tmp_path / "run")
    rss = []
    for k in range(N_TASKS):
        learner.learn(soak_task(k))
        rss.append(rss_mb())
    learner.finish()
    growth = rss[-1] - rss[9]
    print(f"\nRSS after task 1/10/20/30: {rss[0]:.0f}/{rss[9]:.0f}/{rss[19]:.0f}/{rss[-1]:.0f} MB")
    assert growth < RSS_GROWTH_LIMIT_MB, rss

    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "finished"
    assert report["task_names"] == [f"t{k:03d}" for k in range(N_TASKS)]
    assert len(list((tmp_path / "run" / "tasks").iterdir())) == N_TASKS
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


def test_the_heatmap_stays_bounded_for_long_streams():
    """The PNG's pixels stop growing past 20 tasks (they grew with T², ~70 Mpixel at 50 tasks)."""
    sizes = []
    for t in (21, 50, 100):
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
    assert sizes[0] == sizes[1] == sizes[2] < 10e6, sizes
