"""The learner's state in one place: one reader for every command, checks made once, no
argument changed behind its caller's back."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from continual_peft import ContinualLearner, LearnerConfig, Stream, TrainConfig
from continual_peft.cli import app
from continual_peft.engine.saved_run import read_run
from continual_peft.engine.state import resolve_backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.runner import run_stream
from continual_peft.store.checkpoint import CHECKPOINT_FORMAT, Checkpoint, read_checkpoint
from continual_peft.store.migration import CURRENT
from continual_peft.strategies import base as strategy_base

TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)


@pytest.fixture
def finished(finished_run) -> Path:
    """The session's finished two-task run (per_task LoRA, prototype router): read, not changed."""
    return finished_run.run


def test_the_checkpoint_round_trips_through_its_json(finished):
    checkpoint = read_checkpoint(finished)
    on_disk = json.loads((finished / "checkpoint.json").read_text(encoding="utf-8"))
    assert on_disk["format"] == CHECKPOINT_FORMAT
    assert checkpoint.to_json() == on_disk
    # the records and matrices are read from the tasks' folders
    assert "records" not in on_disk and "monitor" not in on_disk
    parts = {"records": checkpoint.records, "monitor": checkpoint.monitor}
    assert Checkpoint.from_json(on_disk | parts) == checkpoint
    assert checkpoint.task_names == ["colors", "animals"]
    assert checkpoint.router is not None and checkpoint.router.tensors.endswith(".safetensors")


def test_config_json_names_the_backbone_s_family_type_size_and_dtype(finished):
    saved = json.loads((finished / "config.json").read_text(encoding="utf-8"))
    assert saved["format"] == CURRENT
    model = saved["model"]
    assert model["family"] == "encoder" and model["model_type"] == "bert"
    assert model["dtype"] == "float32" and model["parameters"] > 0


@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_edited_config_json_is_refused_by_predict_and_export_alike(run_copy, tmp_path, command):
    run = run_copy
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    saved["config"]["train"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "red apple"}\n', encoding="utf-8")
    args = {
        "predict": ["predict", "--run", str(run), "--input", str(inputs), "--task", "colors"],
        "export": ["export", "--run", str(run), "--task", "colors", "--out", str(tmp_path / "x")],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "config.json was edited" in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_damaged_slot_is_refused_by_predict_and_export_alike(run_copy, tmp_path, command):
    run = run_copy
    slot = run / "tasks" / "colors" / "module.safetensors"
    slot.write_bytes(slot.read_bytes()[:-7] + b"garbage")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "red apple"}\n', encoding="utf-8")
    args = {
        "predict": ["predict", "--run", str(run), "--input", str(inputs), "--task", "colors"],
        "export": ["export", "--run", str(run), "--task", "colors", "--out", str(tmp_path / "x")],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert "module.safetensors was altered" in " ".join(result.output.split())


def test_to_dict_and_resolving_the_backbone_change_nothing_given(make_backbone):
    config = LearnerConfig(module="adapter", train=TRAIN)
    before = copy.deepcopy(config)
    config.to_dict()
    assert config == before and config.modules == {}  # kind_config filled nothing in
    backbone, resolved = resolve_backbone(make_backbone(), config)
    assert config == before
    assert resolved is not config and resolved.backbone.dtype == "float32"
    assert resolved.backbone.max_length == backbone.max_length
    learner = ContinualLearner(make_backbone(), config=config)
    assert config == before and learner.config is not config
    learner.config.train.eval_batch_size = 3  # what predict --batch-size does
    assert config.train.eval_batch_size == before.train.eval_batch_size


def test_a_run_checks_its_configs_once(make_backbone, tasks, monkeypatch):
    """run_stream checks the run's and the baseline's config where it is entered; the learners
    it builds trust them (no second check of the same config)."""
    checked = []
    real = strategy_base.check_strategy

    def counting(config, where="config"):
        checked.append(config.strategy)
        return real(config, where)

    monkeypatch.setattr(strategy_base, "check_strategy", counting)
    config = LearnerConfig(train=TRAIN)
    run_stream(Stream("words", tasks[:1]), config, baseline="seq", make_backbone=make_backbone)
    assert sorted(checked) == ["per_task", "seq"]


def test_a_failed_task_after_its_checkpoint_is_kept(make_backbone, tasks, tmp_path, monkeypatch):
    """A failure after a checkpoint holds the task (the report could not be written) keeps the
    task; one before it undoes the task."""
    learner = ContinualLearner(make_backbone(), config=LearnerConfig(train=TRAIN), run_dir=tmp_path)
    learner.learn(tasks[0])

    def no_report() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(learner, "write_report", no_report)
    with pytest.raises(OSError):
        learner.learn(tasks[1])
    assert list(learner.learned) == [tasks[0].name, tasks[1].name]
    assert learner.checkpointed(tasks[1].name)
    monkeypatch.setattr(learner, "checkpoint", lambda task: no_report())
    with pytest.raises(OSError):
        learner.learn(tasks[2])
    assert list(learner.learned) == [tasks[0].name, tasks[1].name]  # undone
    assert learner.bank.num_slots == 2 and len(learner.records) == 2


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        (["--max-train", "7"], "other data than when the run learned it"),
        (["--baseline", "seq"], "was started with no baseline, but this resume asks for seq"),
    ],
)
def test_resuming_a_finished_run_refuses_another_stream_or_baseline(
    finished_run, tmp_path, extra, refusal
):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run, run)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    result = CliRunner().invoke(app, ["run", str(finished_run.spec), "--resume", str(run), *extra])
    assert result.exit_code == 2, result.output
    assert refusal in " ".join(result.output.split())
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_hand_edited_routing_in_checkpoint_json_is_refused(finished_run, tmp_path, command):
    """The checkpoint must agree with its copy in the newest task's folder: an edited routing
    would otherwise send a task's rows (and its export) through another task's slot."""
    run = tmp_path / "run"
    shutil.copytree(finished_run.run, run)
    checkpoint = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))
    checkpoint["tasks"][-1]["routing"] = {"slots": [0], "weights": [1.0]}
    (run / "checkpoint.json").write_text(json.dumps(checkpoint), encoding="utf-8")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "the cat runs"}\n', encoding="utf-8")
    name = checkpoint["tasks"][-1]["name"]
    args = {
        "predict": ["predict", "--run", str(run), "--input", str(inputs), "--task", name],
        "export": ["export", "--run", str(run), "--task", name, "--out", str(tmp_path / "x")],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert "differs from its copy" in " ".join(result.output.split()), result.output
    assert "['tasks']" in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["x", None, 99])
def test_a_format_that_is_no_version_is_named(finished_run, tmp_path, value):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run, run)
    for name in ("checkpoint.json", "config.json"):
        data = json.loads((run / name).read_text(encoding="utf-8"))
        original = data["format"]
        data["format"] = value
        (run / name).write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ContinualPeftError) as refused:
            read_run(run)
        message = str(refused.value)
        if name == "checkpoint.json":
            expected = "not a version number" if value != 99 else "a newer continual-peft"
        else:
            expected = "format" if value is not None else "was edited"
        assert expected in message, message
        data["format"] = original
        (run / name).write_text(json.dumps(data), encoding="utf-8")


def test_a_checkpoint_naming_a_file_outside_the_run_is_refused(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run, run)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for name in ("checkpoint.json", f"tasks/{read_checkpoint(run).task_names[-1]}/checkpoint.json"):
        data = json.loads((run / name).read_text(encoding="utf-8"))
        data["slots"][0]["file"] = "../outside.safetensors"
        data["files"]["../outside.safetensors"] = "x"
        (run / name).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="is outside the run directory"):
        read_run(run)
