"""Bad input, and what happens: one test per row of the table in docs/errors.md.

Every test checks three things: the message names the problem and the fix; the command line
exits non-zero (2 for bad input, 130 for Ctrl-C); and nothing already saved is lost (the files of
earlier tasks are byte-identical before and after, and the report still loads).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
from pathlib import Path

import pytest
from helpers import DEVICE, save_tiny_bert, word_task, write_stream
from typer.testing import CliRunner

from continual_peft import (
    MODULE_KINDS,
    STRATEGIES,
    Backbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    Stream,
    Task,
    TrainConfig,
)
from continual_peft.cli import app
from continual_peft.config import BackboneConfig
from continual_peft.engine.loading import load_learner
from continual_peft.errors import CorruptFileError
from continual_peft.experiments import launch
from continual_peft.experiments.runner import run_stream
from continual_peft.reports.run import load_report
from continual_peft.routers import ROUTERS
from continual_peft.store import io as store_io
from continual_peft.strategies import Strategy, check_config

runner = CliRunner()
NAMES = ("colors", "animals")
ONE_EPOCH = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
TINY = ("--max-train", "12", "--max-test", "6", "--epochs", "1", "--baseline", "none")


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, but temporary ones and the writer's lock
    (released when a run stops): a snapshot to compare."""
    paths = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".tmp" and p.name != ".lock"
    ]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths}


def assert_kept(before: dict[str, bytes], folder: Path) -> None:
    """Every file of the snapshot is still there, byte-identical; no temporary file is left."""
    after = files(folder)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed or vanished"
    assert not list(folder.rglob("*.tmp"))


def refused(result, *expected: str, code: int = 2) -> None:
    """A clean refusal: the exit code, an error line holding every `expected`, no traceback."""
    assert result.exit_code == code, result.output
    assert "error:" in result.stderr, result.output
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_stream(tmp_path / "data", [word_task(n, n_train=12, n_test=6) for n in NAMES])


@pytest.fixture
def tiny_cli(monkeypatch, make_backbone):
    """`continual-peft run` trains on the tiny backbone instead of loading one by name."""
    monkeypatch.setattr(
        launch, "run_stream", functools.partial(run_stream, make_backbone=make_backbone)
    )


@pytest.fixture
def run(run_copy: Path) -> Path:
    """A copy of the session's finished run (two tasks, a router), free to damage."""
    return run_copy


def fail_in_second_task(
    monkeypatch, error: BaseException, snapshot: dict, task_name: str = NAMES[1]
) -> None:
    """Raise `error` from the loss of the second task's first batch (`Strategy.loss` is every
    strategy's hook), after taking a snapshot of the run directory as the first task left it."""
    original = Strategy.loss

    def loss(self, learner, task, value):
        if task.name == task_name:
            snapshot.update(files(learner.run_dir.path))
            if isinstance(error, ValueError):  # stands for a diverged loss
                return value * float("nan")
            raise error
        return original(self, learner, task, value)

    monkeypatch.setattr(Strategy, "loss", loss)


def assert_first_task_kept(run_dir: Path, snapshot: dict, status: set[str]) -> None:
    """The first task's files are as it left them; the report loads and holds only it."""
    assert snapshot, "the second task never started"
    assert_kept({k: v for k, v in snapshot.items() if k.startswith("tasks/")}, run_dir)
    assert not (run_dir / "tasks" / NAMES[1] / "module.safetensors").exists()
    report = load_report(run_dir)
    assert report["status"] in status
    assert report["task_names"] == [NAMES[0]]


# ---------------------------------------------------------------- 1. corrupt safetensors


@pytest.mark.parametrize(
    ("file", "damage"),
    [("module", lambda b: b[:100]), ("head", lambda b: b[:20]), ("module", lambda b: b"\x00" * 64)],
    ids=["truncated-module", "truncated-head", "garbage-module"],
)
def test_corrupt_or_truncated_safetensors(run: Path, file: str, damage):
    path = run / "tasks" / NAMES[1] / f"{file}.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    before = files(run)
    with pytest.raises(CorruptFileError, match="was altered .*sha256 differs.*--resume"):
        load_learner(run)
    inputs = run.parent / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    refused(invoke("predict", "--run", run, "--input", inputs), f"{path} was altered")
    assert_kept(before, run)


# ---------------------------------------------------------------- 2. truncated report.json


def test_truncated_report_json(run: Path):
    report = run / "report.json"
    report.write_bytes(report.read_bytes()[:200])
    before = files(run)
    refused(invoke("report", run), f"{report} is corrupt or truncated", "re-create it")
    inputs = run.parent / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    # the tasks are intact: predict reads the checkpoint, not the report
    result = invoke("predict", "--run", run, "--input", inputs)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task"] in NAMES
    assert_kept(before, run)


def test_predict_output_never_lands_in_the_run_or_crashes(run: Path, tmp_path: Path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    before = files(run)
    for inside in (run / "checkpoint.json", run / "tasks" / "new.jsonl"):
        result = invoke("predict", "--run", run, "--input", inputs, "--output", inside)
        refused(result, "is inside the run directory", "somewhere else")
    missing = tmp_path / "no" / "such" / "folder" / "out.jsonl"
    result = invoke("predict", "--run", run, "--input", inputs, "--output", missing)
    refused(result, f"--output {missing}: the folder {missing.parent} does not exist")
    assert_kept(before, run)
    assert files(run) == before


# ---------------------------------------------------------------- 3. missing labels.json


def test_missing_labels_json(spec: Path, tmp_path: Path):
    missing = spec.parent / NAMES[1] / "labels.json"
    missing.unlink()
    result = invoke("run", spec, "--out", tmp_path / "out", *TINY)
    refused(result, f"{missing}: labels file not found", "leave `labels` out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4. train and test labels disagree


def test_train_and_test_label_sets_disagree(tmp_path: Path):
    # no declared labels: the training labels are the task's labels, and the test set has another
    tasks = [word_task(n, n_train=12, n_test=6) for n in NAMES]
    spec = write_stream(tmp_path / "data", tasks, labels_files=False)
    test_file = spec.parent / NAMES[0] / "test.jsonl"
    lines = test_file.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"text": "a purple cup", "label": "purple"})
    test_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = invoke("run", spec, "--out", tmp_path / "out", "--strict-labels", *TINY)
    refused(
        result,
        f"{test_file}:3: label 'purple' is not one of task 'colors''s labels",
        "declare it in the task's labels or fix the example",
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 5. NaN or exploding loss


def test_nan_loss_stops_the_task_and_keeps_earlier_ones(spec, tmp_path, monkeypatch, tiny_cli):
    snapshot: dict[str, bytes] = {}
    fail_in_second_task(monkeypatch, ValueError("nan"), snapshot)
    out = tmp_path / "out"
    result = invoke("run", spec, "--out", out, "--lr", "0.01", *TINY)
    refused(
        result,
        f"task 2 {NAMES[1]}: the loss became nan at step 0",
        "earlier tasks are untouched",
        "learn the task again",
        "Lower the learning rate (now 0.01)",
    )
    assert_first_task_kept(out, snapshot, {"failed"})


# ---------------------------------------------------------------- 6. a write fails (disk full)


def _disk_full_from_second_task(monkeypatch, snapshot: dict, run_dir: Path) -> None:
    """Every write fails with ENOSPC from the first write of the second task's checkpoint on."""
    real_replace = os.replace
    full = []

    def replace(src, dst):
        if Path(dst).parent.name == NAMES[1] and not full:
            full.append(True)
            snapshot.update(files(run_dir))
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(store_io.os, "replace", replace)


def test_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, make_backbone):
    run_dir, snapshot = tmp_path / "run", {}
    _disk_full_from_second_task(monkeypatch, snapshot, run_dir)
    stream = Stream("words", [word_task(n, n_train=12, n_test=6) for n in NAMES])
    config = LearnerConfig(train=ONE_EPOCH)
    with pytest.raises((OSError, ContinualPeftError), match="No space left on device"):
        run_stream(stream, config, run_dir=run_dir, make_backbone=make_backbone)
    monkeypatch.undo()
    assert_kept(snapshot, run_dir)  # report.json too: the failed rewrite left the old one
    assert not (run_dir / "tasks" / NAMES[1] / "module.safetensors").exists()
    report = load_report(run_dir)
    assert report["task_names"] == [NAMES[0]]


def test_write_failure_is_a_clear_cli_error(spec, tmp_path, monkeypatch, tiny_cli):
    out, snapshot = tmp_path / "out", {}
    _disk_full_from_second_task(monkeypatch, snapshot, out)
    result = invoke("run", spec, "--out", out, *TINY)
    refused(result, "No space left on device. The previous version of the file is kept")
    assert "--resume RUN" in result.stderr
    monkeypatch.undo()
    assert_kept(snapshot, out)


# ---------------------------------------------------------------- 7. unknown names


@pytest.mark.parametrize(
    ("option", "registry"),
    [("--module", MODULE_KINDS), ("--router", ROUTERS), ("--strategy", STRATEGIES)],
    ids=["module", "router", "strategy"],
)
def test_unknown_module_router_or_strategy(spec, tmp_path, monkeypatch, option, registry):
    monkeypatch.setattr(Backbone, "from_pretrained", pytest.fail)  # refused before any model
    result = invoke("run", spec, "--out", tmp_path / "out", option, "bogus", *TINY)
    refused(result, f"{registry.kind} 'bogus'; valid names: {', '.join(registry.names())}")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. path traversal in task names


def test_path_traversal_in_task_names(spec: Path, run: Path, tmp_path: Path):
    text = spec.read_text(encoding="utf-8")
    spec.write_text(text.replace(f'name = "{NAMES[0]}"', 'name = "../../evil"'), encoding="utf-8")
    refused(
        invoke("run", spec, "--out", tmp_path / "out", *TINY),
        "invalid task name '../../evil'. Task names become folder names",
    )
    with pytest.raises(ContinualPeftError, match="invalid task name '../x'"):
        Task.from_examples("../x", train=[("a", "a")], test=[("a", "a")])
    before = files(run)
    refused(
        invoke("export", "--run", run, "--task", f"../{NAMES[0]}", "--out", tmp_path / "x"),
        f"unknown task '../{NAMES[0]}'",
    )
    assert_kept(before, run)
    assert not list(tmp_path.rglob("*evil*")) and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- 9. the wrong backbone


def test_wrong_backbone_for_a_saved_run(
    finished_run, run: Path, tokenizer, tmp_path: Path, monkeypatch
):
    base = finished_run.base
    other = save_tiny_bert(tmp_path / "other", tokenizer, seed=1)
    before = files(run)
    with pytest.raises(ContinualPeftError) as info:
        load_learner(run, backbone=Backbone.from_pretrained(str(other), 32, device=DEVICE))
    message = str(info.value)
    assert f"was trained on backbone '{base}'" in message and f"is '{other}'" in message
    assert "mismatch: weights" in message and "--backbone" in message
    # the folder the run names now holds other weights: `predict` refuses them too (the
    # session's folder itself is left alone: the loader reads `other` when asked for it)
    load = Backbone.from_pretrained

    def replaced(name, *args, **kwargs):
        return load(str(other) if Path(name) == base else name, *args, **kwargs)

    monkeypatch.setattr(Backbone, "from_pretrained", replaced)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    refused(invoke("predict", "--run", run, "--input", inputs), "mismatch: weights")
    assert_kept(before, run)


# ---------------------------------------------------------------- 10. an empty stream


def test_empty_stream(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Backbone, "from_pretrained", pytest.fail)
    spec = tmp_path / "stream.toml"
    spec.write_text('name = "empty"\n', encoding="utf-8")
    refused(invoke("run", spec, "--out", tmp_path / "out"), "the stream has no tasks")
    with pytest.raises(ContinualPeftError, match="stream 'empty' has no tasks"):
        run_stream(Stream("empty", []), LearnerConfig(), run_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 11. non-UTF-8 input


def test_non_utf8_input(spec: Path, run: Path, tmp_path: Path):
    train = spec.parent / NAMES[0] / "train.jsonl"
    lines = train.read_bytes().split(b"\n")
    lines[3] = '{"text": "caf\u00e9 red", "label": "red"}'.encode("latin-1")
    train.write_bytes(b"\n".join(lines))
    refused(invoke("run", spec, "--out", tmp_path / "out", *TINY), f"{train}:4: not UTF-8")
    assert not (tmp_path / "out").exists()
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"text": "a red car"}\n{"text": "caf\xe9"}\n')
    before = files(run)
    refused(
        invoke("predict", "--run", run, "--input", inputs),
        f"{inputs}:2: not a UTF-8 JSON line",
    )
    assert_kept(before, run)


# ---------------------------------------------------------------- 12. inputs longer than max_length


def test_long_inputs_are_truncated_and_counted(tmp_path: Path, make_backbone, tokenizer):
    long, short = "red " + "and so on " * 10, "blue cup"
    train = [(long, "red"), (short, "blue")] * 4
    test = [(long, "red"), (short, "blue"), (long, "red")]
    task = Task.from_examples("long", train=train, test=test)
    config = LearnerConfig(train=ONE_EPOCH, backbone=BackboneConfig(max_length=8))
    learner = run_stream(
        Stream("long", [task]),
        config,
        run_dir=tmp_path / "run",
        make_backbone=lambda: make_backbone(max_length=8),
    )
    expected = sum(len(tokenizer(t)["input_ids"]) > 8 for t, _ in train + test)
    assert expected == 4 + 2
    report = load_report(tmp_path / "run")
    assert report["tasks"][0]["truncated_inputs"] == expected
    assert "truncated inputs" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert learner.predict([long * 3], task="long") in (["red"], ["blue"])  # cut, not refused


# ---------------------------------------------------------------- 13. a label never trained


def test_predict_with_labels_never_seen_in_training(run: Path, tmp_path: Path):
    inputs = tmp_path / "in.jsonl"
    rows = [
        {"text": "a purple violin plays jazz", "label": "purple"},  # a label no task knows
        {"text": "quantum chromodynamics lecture notes"},  # no task at all
        {"text": "the dog sleeps at home"},
    ]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before = files(run)
    result = invoke("predict", "--run", run, "--input", inputs)
    assert result.exit_code == 0, result.output
    known = {None} | {label for n in NAMES for label in word_task(n).labels}
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(predictions) == 3
    for row in predictions:  # always a known task and label, or rejected: never a made-up one
        assert row["task"] in {*NAMES, None} and row["label"] in known
        assert row["rejected"] is (row["label"] is None)
    with pytest.raises(ContinualPeftError, match=r"unknown task 'weather'; learned tasks: \["):
        load_learner(run).predict(["sunny"], task="weather")
    assert_kept(before, run)


# ---------------------------------------------------------------- 14. Ctrl-C


def test_ctrl_c_stops_cleanly_with_earlier_tasks_saved(spec, tmp_path, monkeypatch, tiny_cli):
    snapshot: dict[str, bytes] = {}
    fail_in_second_task(monkeypatch, KeyboardInterrupt(), snapshot)
    out = tmp_path / "out"
    result = invoke("run", spec, "--out", out, *TINY)
    refused(result, "interrupted; the tasks finished so far are saved", code=130)
    assert_first_task_kept(out, snapshot, {"interrupted", "failed"})


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "interrupted; the tasks finished so far are saved"),
        (ValueError(), 2, "the loss became nan at step 0"),
    ],
    ids=["ctrl-c", "nan-loss"],
)
@pytest.mark.real_plots
def test_a_stop_in_the_first_task_names_its_cause_and_writes_empty_reports(
    spec, tmp_path, monkeypatch, tiny_cli, error, code, message
):
    """Zero finished tasks: every report and plot writer copes, so the real cause is shown."""
    fail_in_second_task(monkeypatch, error, {}, task_name=NAMES[0])
    out = tmp_path / "out"
    result = invoke("run", spec, "--out", out, *TINY)
    refused(result, message, code=code)
    assert "Traceback" not in result.output
    report = load_report(out)
    assert report["status"] in {"interrupted", "failed"} and report["task_names"] == []
    assert (out / "report.md").is_file() and (out / "accuracy_matrix.png").is_file()
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------- 15. --resume of a finished run


def test_resume_of_a_finished_run_does_nothing(spec, tmp_path, tiny_cli):
    out = tmp_path / "out"
    assert invoke("run", spec, "--out", out, *TINY).exit_code == 0
    before = files(out)
    result = invoke("run", spec, "--resume", out, *TINY)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert files(out) == before


# ---------------------------------------------------------------- 16-17. never overwrite


def test_a_used_run_folder_is_refused(spec: Path, run: Path, monkeypatch):
    monkeypatch.setattr(Backbone, "from_pretrained", pytest.fail)
    before = files(run)
    refused(invoke("run", spec, "--out", run, *TINY), f"{run} already holds a run")
    assert_kept(before, run)
    assert files(run) == before


def test_a_non_empty_export_folder_is_refused(run: Path, tmp_path: Path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    refused(
        invoke("export", "--run", run, "--task", NAMES[0], "--out", out),
        "already exists and is not empty",
        "nothing was overwritten",
    )
    assert files(out) == {"mine.txt": b"keep me"}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(tasks=c["tasks"][:1]), "tasks_done is 2 but it lists 1 task(s)"),
        (lambda c: c.update(files={}), "files it needs have no sha256 in 'files'"),
        (lambda c: c["tasks"][1].update(slot=7), "uses slot 7 of 2"),
        (lambda c: c.pop("retired"), "'retired' is missing"),
        (lambda c: c["router"].update(task_rows=["x"]), "one file of rows per task"),
    ],
    ids=["task-list-cut", "files-emptied", "slot-out-of-range", "retired-removed", "rows-cut"],
)
def test_a_hand_edited_checkpoint_is_named_not_trusted(run: Path, tmp_path: Path, edit, expected):
    path = run / "checkpoint.json"
    checkpoint = json.loads(path.read_text(encoding="utf-8"))
    edit(checkpoint)
    path.write_text(json.dumps(checkpoint), encoding="utf-8")
    before = files(run)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    refused(invoke("predict", "--run", run, "--input", inputs), "is inconsistent", expected)
    out = tmp_path / "export"
    refused(invoke("export", "--run", run, "--task", NAMES[0], "--out", out), expected)
    assert files(run) == before and not out.exists()


def test_sharper_messages_for_labels_csv_headers_and_predict_input(tmp_path: Path, run: Path):
    from continual_peft.tasks.sources import read_csv
    from continual_peft.tasks.task import read_labels

    labels = tmp_path / "labels.json"
    labels.write_text('["a", "b", "a"]', encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"labels\.json: labels \['a'\] appear more than"):
        read_labels(labels)
    table = tmp_path / "train.csv"
    table.write_text("text,label,text\nhello,a,again\n", encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"train\.csv:1: the header names column\(s\) "):
        read_csv(table, "text", "label")
    plain = tmp_path / "plain.txt"
    plain.write_text("a red car\n", encoding="utf-8")
    refused(
        invoke("predict", "--run", run, "--input", plain),
        f"{plain}:1: not a UTF-8 JSON line",
        'each line must be one JSON object with a "text" (or "prompt") string',
    )
    floats = tmp_path / "floats.jsonl"
    floats.write_text('{"text": "a", "label": 3}\n{"text": "b", "label": 3.0}\n', "utf-8")
    from continual_peft.tasks.sources import read_rows

    with pytest.raises(ContinualPeftError, match=r"floats\.jsonl:2: label 3\.0 is a floating"):
        read_rows(floats, None, "text", "label")
    with pytest.warns(UserWarning, match="has one class .*trivially 100 %"):
        Task.from_examples("lonely", train=[("a", "x")], test=[("b", "x")])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a red car"}\n')
    result = invoke("predict", "--run", run, "--input", bom)
    assert result.exit_code == 0, result.output


def test_task_overrides_that_name_no_task_are_refused(spec: Path, tmp_path: Path):
    strategy = tmp_path / "mixed.toml"
    strategy.write_text('strategy = "per_task"\n[tasks.colours]\nmodule = "prompt"\n', "utf-8")
    out = tmp_path / "out"
    result = invoke("run", spec, "--strategy", strategy, "--out", out, *TINY)
    refused(result, "overrides name task(s) ['colours'] that stream 'words' does not have")
    assert not out.exists()


def test_predict_on_a_run_without_a_router_says_what_to_do(run: Path, tmp_path: Path):
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["config"]["router"] = "oracle"
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    from continual_peft.store.digests import run_config_sha256  # as if it had been made so

    checkpoint = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))
    checkpoint["run_config_sha256"] = run_config_sha256(config["config"])
    checkpoint["router"] = None
    for path in (
        run / "checkpoint.json",
        run / "tasks" / checkpoint["last_task"] / "checkpoint.json",
    ):
        path.write_text(json.dumps(checkpoint), encoding="utf-8")  # and its copy, alike
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    refused(
        invoke("predict", "--run", run, "--input", inputs),
        "name no task, and the run has no router (router 'oracle')",
        "give --task NAME",
        "--router mahalanobis",
    )
    # the task given: no router needed
    result = invoke("predict", "--run", run, "--input", inputs, "--task", NAMES[0])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["routing"] == "given"


def test_a_hand_edited_config_or_routing_is_named(run: Path, tmp_path: Path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    config_file, checkpoint_file = run / "config.json", run / "checkpoint.json"
    original, checkpoint = (
        config_file.read_text(encoding="utf-8"),
        checkpoint_file.read_text("utf-8"),
    )
    edited = json.loads(original)
    edited["config"]["train"]["lr"] = 0.5
    cases = [(json.dumps(edited), "config.json was edited"), ("{}", "config.json is damaged")]
    for text, expected in [*cases, ("[]", "config.json is damaged")]:
        config_file.write_text(text, encoding="utf-8")
        refused(invoke("predict", "--run", run, "--input", inputs), expected)
    config_file.write_text(original, encoding="utf-8")
    for routing, expected in [
        ({"slots": [0, 9], "weights": [1, 1]}, "names slots [0, 9] of 2"),
        ({"slots": [0, 0], "weights": [1, 1]}, "a slot twice"),
        ({"slots": [0], "weights": ["1"]}, "not finite numbers"),
        ({"slots": [0], "weights": [float("nan")]}, "not finite numbers"),
    ]:
        data = json.loads(checkpoint)
        data["tasks"][0]["routing"] = routing
        checkpoint_file.write_text(json.dumps(data), encoding="utf-8")
        out = tmp_path / "export"
        refused(invoke("export", "--run", run, "--task", NAMES[0], "--out", out), expected)
    checkpoint_file.write_text("[]", encoding="utf-8")
    refused(invoke("predict", "--run", run, "--input", inputs), "not a JSON object")


def test_more_places_that_cannot_be_written_or_read(
    run: Path, tmp_path: Path, finished_run, tokenizer
):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    refused(
        invoke("predict", "--run", run, "--input", inputs, "--output", inputs),
        "is the --input file",
    )
    refused(
        invoke("export", "--run", run, "--task", NAMES[0], "--out", run / "tasks" / "zz"),
        "inside the run directory",
    )
    other = save_tiny_bert(tmp_path / "other", tokenizer, seed=1)
    refused(
        invoke(
            "export", "--run", run, "--task", NAMES[0], "--out", tmp_path / "x", "--backbone", other
        ),
        "mismatch: weights",
    )
    learner = load_learner(
        run, backbone=Backbone.from_pretrained(str(finished_run.base), 32, device=DEVICE)
    )
    with pytest.raises(ContinualPeftError, match="wrap it in a list"):
        learner.predict("a red car")
    with pytest.raises(ContinualPeftError, match=r"input 1 is not valid Unicode text"):
        learner.predict(["fine", "bad \ud800"], task=NAMES[0])
    with pytest.raises(ContinualPeftError, match="ONE shared slot for every task"):
        check_config(LearnerConfig(strategy="seq", task_modules={NAMES[0]: "adapter"}))


@pytest.mark.parametrize("given", ["colors", None, 3, ["colors"]])
def test_a_learner_given_no_task_names_what_it_got_and_how_to_make_one(make_backbone, given):
    learner = ContinualLearner(make_backbone())
    with pytest.raises(
        ContinualPeftError, match=r"learn\(\) takes a Task, not .*Task.from_examples"
    ):
        learner.learn(given)
    assert not learner.learned and not learner.records


def test_loading_with_tasks_that_are_no_tasks_is_refused(run: Path):
    with pytest.raises(ContinualPeftError, match=r"load\(tasks=...\) takes a Task, not str"):
        ContinualLearner.load(run, tasks=["colors"])


@pytest.mark.parametrize("build", ["from_examples", "from_lists"])
def test_a_task_without_training_rows_says_its_train_split_is_empty(build):
    test = [("red", "yes"), ("blue", "no")]
    with pytest.raises(ContinualPeftError, match=r"'colors': the train split .* is empty"):
        if build == "from_examples":
            Task.from_examples("colors", [], test)
        else:
            Task.from_lists("colors", [], [], ["red"], ["yes"])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"text": "a"}\n\n{"text": "b"}\n', "line(s) 2 are blank"),
        ('\n{"text": "a"}\n', "line(s) 1 are blank"),
        ('{"text": "a"}\r\n \r\n{"text": "b"}\r\n', "line(s) 2 are blank"),
    ],
)
def test_a_blank_line_between_records_is_refused_naming_it(tmp_path, text, problem):
    from continual_peft.tasks.records import read_records

    path = tmp_path / "inputs.jsonl"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(ContinualPeftError, match=rf"{re.escape(problem)}.*shift every later"):
        read_records(path)


def test_blank_lines_at_the_end_are_ignored_and_lines_stay_aligned(tmp_path):
    from continual_peft.tasks.records import read_records

    path = tmp_path / "inputs.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n  \n', encoding="utf-8")
    assert [r["text"] for r in read_records(path)] == ["a", "b"]


def test_predict_refuses_a_blank_line_and_writes_nothing(run: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app,
        ["predict", "--run", str(run), "--input", "-", "--output", str(out)],
        input='{"text": "red"}\n\n{"text": "blue"}\n',
    )
    assert result.exit_code == 2, result.output
    assert "line(s) 2 are blank" in result.stderr
    assert not out.exists()
