"""Metrics against hand-computed matrices, edge cases, and a plain-loop re-computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from continual_peft.errors import ContinualPeftError
from continual_peft.metrics import (
    METRIC_DEFINITIONS,
    avalanche_forgetting,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    compute_metrics,
    forgetting,
    forward_transfer,
)

NAN = float("nan")

# Rows: after training task 1, 2, 3. R[1, 2] = 0.40 and R[2, 3] = 0.30 are the pre-training
# measurements the engine takes just before training tasks 2 and 3.
R3 = np.array(
    [
        [0.90, 0.40, NAN],
        [0.80, 0.85, 0.30],
        [0.70, 0.75, 0.95],
    ]
)
B3 = np.array([0.25, 0.35, 0.20])


def test_hand_computed_3x3() -> None:
    # ACC  = (0.70 + 0.75 + 0.95) / 3                           = 2.40 / 3 = 0.80
    # AIA  = (0.90 + (0.80 + 0.85) / 2 + 0.80) / 3              = 2.525 / 3 = 0.841666...
    # BWT  = ((0.70 - 0.90) + (0.75 - 0.85)) / 2                = -0.15
    # FWT  = ((R[1,2] - b2) + (R[2,3] - b3)) / 2
    #      = ((0.40 - 0.35) + (0.30 - 0.20)) / 2                = 0.075
    # F    = ((max(0.90, 0.80) - 0.70) + (max(0.85) - 0.75)) / 2 = (0.20 + 0.10) / 2 = 0.15
    #        (R[1,2] = 0.40 is measured before task 2 was trained, so it is no peak)
    # Avalanche per task: 0.90 - 0.70 = 0.20, 0.85 - 0.75 = 0.10, last task None
    assert average_accuracy(R3) == pytest.approx(0.80)
    assert average_incremental_accuracy(R3) == pytest.approx(2.525 / 3)
    assert backward_transfer(R3) == pytest.approx(-0.15)
    assert forward_transfer(R3, B3) == pytest.approx(0.075)
    assert forgetting(R3) == pytest.approx(0.15)
    ava = avalanche_forgetting(R3)
    assert ava[:2] == pytest.approx([0.20, 0.10])
    assert ava[2] is None


def test_single_task_metrics_are_none_not_nan() -> None:
    R = [[0.7]]
    metrics = compute_metrics(R, [0.5])
    assert metrics == {
        "acc": pytest.approx(0.7),
        "avg_incremental_acc": pytest.approx(0.7),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "avalanche_forgetting": [None],
    }


def test_no_forgetting_matrix() -> None:
    # Each task keeps the accuracy it reached when trained: every column is constant.
    R = np.array(
        [
            [0.9, NAN, NAN, NAN],
            [0.9, 0.8, NAN, NAN],
            [0.9, 0.8, 0.7, NAN],
            [0.9, 0.8, 0.7, 0.6],
        ]
    )
    assert backward_transfer(R) == 0.0
    assert forgetting(R) == 0.0
    assert avalanche_forgetting(R) == [0.0, 0.0, 0.0, None]
    assert average_accuracy(R) == pytest.approx(0.75)
    assert forward_transfer(R, [0.1, 0.2, 0.3, 0.4]) is None  # superdiagonal not measured


def test_forgetting_differs_from_minus_bwt_when_peak_is_after_the_diagonal() -> None:
    # Task 1 improves after task 2 (0.60 -> 0.90), then drops to 0.70.
    R = np.array(
        [
            [0.60, NAN, NAN],
            [0.90, 0.80, NAN],
            [0.70, 0.80, 0.90],
        ]
    )
    # BWT = ((0.70 - 0.60) + (0.80 - 0.80)) / 2 = 0.05, so -BWT = -0.05
    # F   = ((max(0.60, 0.90) - 0.70) + (0.80 - 0.80)) / 2 = 0.10
    assert backward_transfer(R) == pytest.approx(0.05)
    assert forgetting(R) == pytest.approx(0.10)
    assert avalanche_forgetting(R)[:2] == pytest.approx([-0.10, 0.0])


def test_forgetting_ignores_pre_training_measurement() -> None:
    # R[1, 2] = 0.99 was measured before task 2 was trained; it must not count as task 2's peak.
    R = np.array(
        [
            [0.80, 0.99, NAN],
            [0.80, 0.70, 0.10],
            [0.80, 0.60, 0.90],
        ]
    )
    # F = ((0.80 - 0.80) + (0.70 - 0.60)) / 2 = 0.05 (would be 0.195 with the 0.99 counted)
    assert forgetting(R) == pytest.approx(0.05)


def test_fwt_none_when_baseline_missing() -> None:
    assert forward_transfer(R3, None) is None
    assert forward_transfer(R3, [0.25, NAN, 0.20]) is None
    assert forward_transfer(R3, [NAN, 0.35, 0.20]) == pytest.approx(0.075)  # b[1] is unused


def test_accepts_json_lists_with_null() -> None:
    as_json = json.loads(json.dumps([[0.9, 0.4, None], [0.8, 0.85, 0.3], [0.7, 0.75, 0.95]]))
    assert compute_metrics(as_json, B3.tolist()) == compute_metrics(R3, B3)


def test_compute_metrics_is_json_ready() -> None:
    metrics = compute_metrics(R3, B3)
    assert set(metrics) == {
        "acc",
        "avg_incremental_acc",
        "bwt",
        "fwt",
        "forgetting",
        "avalanche_forgetting",
    }
    json.dumps(metrics, allow_nan=False)
    scalars = [v for k, v in metrics.items() if k != "avalanche_forgetting"]
    assert all(type(v) is float for v in scalars)
    assert all(v is None or type(v) is float for v in metrics["avalanche_forgetting"])


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3)),
        np.zeros((0, 0)),
        np.zeros(3),
        [[0.5, NAN], [0.4, NAN]],  # a diagonal entry is always measured
        [[0.5, NAN], [np.inf, 0.5]],
        [[NAN]],
    ],
)
def test_invalid_matrix_raises_clear_error(bad: object) -> None:
    with pytest.raises(ContinualPeftError, match="accuracy matrix"):
        compute_metrics(bad, None)


def test_wrong_baseline_length_raises() -> None:
    with pytest.raises(ContinualPeftError, match="one entry per task"):
        forward_transfer(R3, [0.1, 0.2])


def test_definitions_cover_every_metric() -> None:
    extra = {"R", "b", "routing", "routing_accuracy", "dev", "rejection"}  # splits, matrices
    assert set(compute_metrics(R3, B3)) | extra == set(METRIC_DEFINITIONS)
    assert "max runs over rows l = j..T-1" in METRIC_DEFINITIONS["forgetting"]


def _loop_metrics(R: np.ndarray, b: np.ndarray) -> dict[str, object]:
    """The formulas of DESIGN.md written with 1-based loops, as a reference."""
    T = R.shape[0]

    def r(i: int, j: int) -> float:
        return float(R[i - 1, j - 1])  # 1-based, so the formulas read as written

    acc = sum(r(T, j) for j in range(1, T + 1)) / T
    aia = sum(sum(r(i, j) for j in range(1, i + 1)) / i for i in range(1, T + 1)) / T
    if T == 1:
        return {"acc": acc, "aia": aia, "bwt": None, "fwt": None, "f": None}
    bwt = sum(r(T, j) - r(j, j) for j in range(1, T)) / (T - 1)
    fwt_terms = [r(j - 1, j) - b[j - 1] for j in range(2, T + 1)]
    fwt = None if any(math.isnan(t) for t in fwt_terms) else sum(fwt_terms) / (T - 1)
    f = sum(max(r(k, j) for k in range(j, T)) - r(T, j) for j in range(1, T)) / (T - 1)
    return {"acc": acc, "aia": aia, "bwt": bwt, "fwt": fwt, "f": f}


def _random_matrix(rng: np.random.Generator, T: int) -> np.ndarray:
    R = np.full((T, T), NAN)
    rows, cols = np.tril_indices(T)
    R[rows, cols] = rng.uniform(0.0, 1.0, size=rows.size)
    if rng.random() < 0.8:  # usually the engine measured the superdiagonal, sometimes not
        R[np.arange(T - 1), np.arange(1, T)] = rng.uniform(0.0, 1.0, size=T - 1)
    return R


@pytest.mark.parametrize("seed", range(20))
def test_matches_plain_loop_on_random_matrices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 9))
    R, b = _random_matrix(rng, T), rng.uniform(0.0, 1.0, size=T)
    expected, got = _loop_metrics(R, b), compute_metrics(R, b)
    assert got["acc"] == pytest.approx(expected["acc"])
    assert got["avg_incremental_acc"] == pytest.approx(expected["aia"])
    for ours, ref in [("bwt", "bwt"), ("fwt", "fwt"), ("forgetting", "f")]:
        if expected[ref] is None:
            assert got[ours] is None
        else:
            assert got[ours] == pytest.approx(expected[ref])
    expected_ava = [R[j, j] - R[-1, j] for j in range(T - 1)]
    assert got["avalanche_forgetting"][:-1] == pytest.approx(expected_ava)
    assert got["avalanche_forgetting"][-1] is None
