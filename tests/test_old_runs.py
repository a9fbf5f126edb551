"""A run directory written before the package was reorganised (issue 14) still loads, predicts
what it predicted then, and resumes.

`tests/data/run_before_issue_14/` was written by commit d80e31a (the flat package): replay with
the mahalanobis router on the tiny test BERT, two of the three word tasks learned, then the
process stopped (status "running"). `expected.json` holds what that code predicted and
reported; the plots were left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN

from continual_peft import ContinualLearner, LearnerConfig, Stream, TrainConfig, load_learner
from continual_peft.experiments.runner import run_stream
from continual_peft.store.checkpoint import read_checkpoint

FIXTURE = Path(__file__).parent / "data" / "run_before_issue_14"
TRAIN = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0)  # as the run was trained


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    return run


def test_an_old_run_loads_and_predicts_what_it_did(old_run, make_backbone):
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    learner = load_learner(old_run, make_backbone())
    assert learner.predict(expected["inputs"]) == expected["routed"]
    assert learner.predict(expected["inputs"], task="colors") == expected["oracle"]
    assert learner.report["metrics"] == expected["report_metrics"]
    assert isinstance(ContinualLearner.load(old_run, backbone=make_backbone()), ContinualLearner)


def test_an_old_run_resumes_to_what_the_new_code_learns_uninterrupted(
    old_run, tmp_path, make_backbone, tasks
):
    stream = Stream("words", tasks[:3])
    config = LearnerConfig(strategy="replay", router="mahalanobis", train=TRAIN)
    resumed = run_stream(stream, config, old_run, make_backbone=make_backbone, resume=True)
    assert list(resumed.learned) == [t.name for t in tasks[:3]]
    assert read_checkpoint(old_run)["tasks_done"] == 3
    fresh = run_stream(stream, config, tmp_path / "fresh", make_backbone=make_backbone)
    for mode in ("oracle", "routed"):
        np.testing.assert_array_equal(resumed.monitor.matrix(mode), fresh.monitor.matrix(mode))
    assert FAST_TRAIN.epochs != TRAIN.epochs  # the run's own settings, not the suite's default
