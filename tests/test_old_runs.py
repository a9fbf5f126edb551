"""Run directories in checkpoint formats 1 and 2 still load, predict what they predicted then,
and resume; `store.migration` reads them in the current format.

`tests/data/run_format_1/` was written by commit d80e31a, `tests/data/run_format_2/` by commit
e749c28: replay with the mahalanobis router on the tiny test BERT, two of the three word tasks
learned (status "running"). `expected.json` holds what that code predicted and reported; the
plots were left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST_TRAIN

from continual_peft import ContinualLearner, LearnerConfig, Stream, TrainConfig, load_learner
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.runner import run_stream
from continual_peft.store.checkpoint import CHECKPOINT_FORMAT, read_checkpoint

DATA = Path(__file__).parent / "data"
TRAIN = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0)  # as the runs were trained


@pytest.fixture(params=[1, 2], ids=["format_1", "format_2"])
def old_run(request, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(DATA / f"run_format_{request.param}" / "run", run)
    return run


def fixture_of(run: Path) -> Path:
    """The fixture folder an old run was copied from (by its checkpoint's format)."""
    found = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))["format"]
    return DATA / f"run_format_{found}"


def test_an_old_run_loads_and_predicts_what_it_did(old_run, make_backbone):
    expected = json.loads((fixture_of(old_run) / "expected.json").read_text(encoding="utf-8"))
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
    assert len(read_checkpoint(old_run).tasks) == 3
    on_disk = json.loads((old_run / "checkpoint.json").read_text(encoding="utf-8"))
    assert on_disk["format"] == CHECKPOINT_FORMAT == 3  # the next checkpoint is the current format
    # every task's part is in its folder now, old tasks' too
    assert "records" not in on_disk and "monitor" not in on_disk
    assert len(on_disk["router"]["task_rows"]) == 3
    loaded = ContinualLearner.load(old_run, backbone=make_backbone()).report
    for key in ("accuracy_matrix", "metrics", "tasks", "routing_accuracy"):
        assert loaded[key] == resumed.report[key], key
    fresh = run_stream(stream, config, tmp_path / "fresh", make_backbone=make_backbone)
    for mode in ("oracle", "routed"):
        np.testing.assert_array_equal(resumed.monitor.matrix(mode), fresh.monitor.matrix(mode))
    assert FAST_TRAIN.epochs != TRAIN.epochs  # the run's own settings, not the suite's default


def test_an_old_run_reads_in_the_current_format(old_run):
    on_disk = json.loads((old_run / "checkpoint.json").read_text(encoding="utf-8"))
    router = on_disk["router"]
    assert on_disk["format"] in (1, 2)
    checkpoint = read_checkpoint(old_run)
    tensors, meta = router if on_disk["format"] == 1 else (router["tensors"], router["meta"])
    assert checkpoint.router.tensors == tensors and checkpoint.router.meta == meta
    assert checkpoint.router.task_rows == [] and checkpoint.retired == []
    assert checkpoint.records == on_disk["records"]
    assert checkpoint.baseline is None and checkpoint.task_names == ["colors", "animals"]
    assert [list(t.routing.slots) for t in checkpoint.tasks] == [[0], [0]]  # one shared slot
    on_disk_after = json.loads((old_run / "checkpoint.json").read_text(encoding="utf-8"))
    assert on_disk_after == on_disk  # reading rewrites nothing


def test_a_format_1_task_without_routing_reads_its_own_slot_or_olora_s_sum(tmp_path):
    from continual_peft.store.migration import upgrade_checkpoint

    old = {
        "format": 1,
        "slots": [{"file": "a", "kind": "lora", "trainable": False}] * 3,
        "tasks": [{"name": "b", "slot": 1}],
        "router": None,
        "strategy": ["s.safetensors", "s.json"],
    }
    (tmp_path / "config.json").write_text(json.dumps({"config": {"strategy": "per_task"}}))
    (tmp_path / "baseline-seq").mkdir()
    new = upgrade_checkpoint(old, tmp_path, tmp_path / "checkpoint.json")
    assert new["tasks"][0]["routing"] == {"slots": [1], "weights": [1.0]}
    assert new["baseline"] == "seq" and new["stream_plan"] is None and new["format"] == 3
    assert new["strategy"] == {"tensors": "s.safetensors", "meta": "s.json"}
    assert "routing" not in old["tasks"][0]  # its argument is not changed
    (tmp_path / "config.json").write_text(json.dumps({"config": {"strategy": "olora"}}))
    new = upgrade_checkpoint(old, tmp_path, tmp_path / "checkpoint.json")
    assert new["tasks"][0]["routing"] == {"slots": [0, 1, 2], "weights": [1.0] * 3}
    with pytest.raises(ContinualPeftError, match="format 4 is not supported"):
        upgrade_checkpoint({"format": 4}, tmp_path, tmp_path / "checkpoint.json")
