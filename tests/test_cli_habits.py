"""The command line as its users expect it: progress in a log file, threads, predict with a task,
eval without training (checked against the run's own report), help texts, version, one way to
name a stream, the library's `with` block, and no expected noise from transformers."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, word_task
from typer.testing import CliRunner

from continual_peft import (
    Backbone,
    ContinualLearner,
    LearnerConfig,
    TrainConfig,
    load_learner,
)
from continual_peft.backbones import placement
from continual_peft.backbones.placement import set_threads, usable_cpus
from continual_peft.cli import app
from continual_peft.engine import progress
from continual_peft.engine.saved_run import check_same_config
from continual_peft.errors import ContinualPeftError
from continual_peft.reports.run import load_report
from continual_peft.store.digests import run_config_sha256

runner = CliRunner()
NAMES = ["colors", "animals"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- progress


def test_a_log_file_gets_a_progress_line_per_interval(finished_run, tmp_path, monkeypatch, request):
    progress.configure("lines", interval=30.0)
    request.addfinalizer(progress.configure)  # back to the library's default
    times = iter(range(0, 10_000, 31))  # every tick 31 s later: a line each time
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(times))
    out = tmp_path / "run"
    options = ["--max-length", "32", "--epochs", "1", "--batch-size", "8"]
    result = invoke(
        "run", finished_run.spec, "--out", out, "--backbone", finished_run.base, *options
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.index(f"run directory: {out}") < result.stdout.index("colors")
    lines = result.stderr.splitlines()
    training = [line for line in lines if line.startswith("task 1 colors: training")]
    assert training and re.search(r"\d+/3 steps \(\d+%\), loss [\d.]+, \d+ s elapsed", training[0])
    assert any(line.startswith("task 2 animals: re-evaluating 2 task(s)") for line in lines)
    assert any(line.startswith("torch threads: ") for line in result.stderr.splitlines())


def test_meters_count_ticks_and_nest_into_the_outer_one(monkeypatch, capsys, request):
    progress.configure("lines", interval=0.0)
    request.addfinalizer(progress.configure)
    progress.tick(5)  # no meter open: nothing
    with progress.meter("outer", 10, "rows") as outer:
        with progress.meter("inner", 99) as inner:
            assert inner is outer
            progress.tick(4, loss=0.5)
        progress.tick(6)
    assert outer.done == 10
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("outer: 4/10 rows (40%), loss 0.5") and "s left" in err[0]
    assert err[-1].startswith("outer: 10/10 rows (100%)")


# ---------------------------------------------------------------- threads


def test_threads_as_asked_auto_lowered_to_the_usable_cpus_and_refused_when_negative(
    monkeypatch,
):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == "1 (as asked)" and torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setattr(placement, "usable_cpus", lambda: 2)
        assert "not torch's default 4" in set_threads(0) and torch.get_num_threads() == 2
        assert set_threads(0).startswith("2 (auto") and torch.get_num_threads() == 2  # kept
        with pytest.raises(ContinualPeftError, match="positive number of CPU threads"):
            set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_usable_cpus_follow_the_affinity_mask():
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_threads_is_where_a_run_computes_not_what_it_is(finished_run):
    """A run resumes and loads with other threads (as on another device)."""
    saved = json.loads((finished_run.run / "config.json").read_text(encoding="utf-8"))["config"]
    changed = json.loads(json.dumps(saved))
    changed["backbone"]["threads"] = 3
    assert run_config_sha256(saved) == run_config_sha256(changed)
    check_same_config(
        finished_run.run, LearnerConfig.from_dict(saved), LearnerConfig.from_dict(changed)
    )
    assert load_learner(finished_run.run).config.backbone.threads == 0  # auto where it loads


# ---------------------------------------------------------------- predict and eval


def test_predict_with_a_task_per_line_or_for_all(finished_run, tmp_path):
    inputs = tmp_path / "in.jsonl"
    rows = [{"text": "a red car"}, {"text": "the cat runs", "task": "animals"}]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    learner = load_learner(finished_run.run)
    result = invoke("predict", "--run", finished_run.run, "--input", inputs)
    assert result.exit_code == 0, result.output
    routed, given = (json.loads(line) for line in result.stdout.splitlines())
    assert routed["routing"] == "router" and routed == {
        **learner.predict_details(["a red car"])[0],
        "routing": "router",
    }
    assert given == {
        "task": "animals",
        "label": learner.predict(["the cat runs"], "animals")[0],
        "rejected": False,
        "routing": "given",
    }
    untasked = tmp_path / "untasked.jsonl"
    untasked.write_text('{"text": "a red car"}\n{"text": "the cat runs"}\n', encoding="utf-8")
    options = ["--task", "colors", "--batch-size", "1"]
    every = invoke("predict", "--run", finished_run.run, "--input", untasked, *options)
    labels = [json.loads(line)["label"] for line in every.stdout.splitlines()]
    assert labels == learner.predict(["a red car", "the cat runs"], task="colors")
    unknown = invoke("predict", "--run", finished_run.run, "--input", untasked, "--task", "moods")
    assert unknown.exit_code == 2 and "unknown task 'moods' (--task)" in unknown.stderr
    zero = invoke("predict", "--run", finished_run.run, "--input", inputs, "--batch-size", "0")
    assert zero.exit_code == 2 and "--batch-size 0: give a positive number" in zero.stderr


def test_predict_and_eval_batch_size_sets_the_rows_per_forward(finished_run, tmp_path, monkeypatch):
    """--batch-size reaches every forward of predict and eval (not only the saved config)."""
    sizes: list[int] = []
    collate = Backbone.collate
    monkeypatch.setattr(
        Backbone, "collate", lambda self, rows: sizes.append(len(rows)) or collate(self, rows)
    )
    inputs = tmp_path / "five.jsonl"
    inputs.write_text("".join(f'{{"text": "red car {i}"}}\n' for i in range(5)), encoding="utf-8")
    result = invoke("predict", "--run", finished_run.run, "--input", inputs, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert sizes and max(sizes) == 2
    sizes.clear()
    scores = invoke("eval", finished_run.spec, "--run", finished_run.run, "--batch-size", "3")
    assert scores.exit_code == 0, scores.output
    assert sizes and max(sizes) == 3


def test_eval_on_the_stream_reproduces_the_runs_last_row(finished_run, tmp_path):
    out = tmp_path / "scores.json"
    result = invoke("eval", finished_run.spec, "--run", finished_run.run, "--output", out)
    assert result.exit_code == 0, result.output
    assert "oracle ACC" in result.stdout and "routing ACC" in result.stdout
    scores, report = json.loads(out.read_text(encoding="utf-8")), load_report(finished_run.run)
    for position, name in enumerate(NAMES):
        task = scores["by_task"][name]
        matrix = report["accuracy_matrix"]
        assert task["oracle_acc"] == pytest.approx(matrix["oracle"][-1][position])
        assert task["routed_acc"] == pytest.approx(matrix["routed"][-1][position])
        routing = report["routing_accuracy"][-1][position]
        assert task["routing_acc"] == pytest.approx(routing)
        assert task["rejected"] == pytest.approx(report["rejected_share"][-1][position])
    assert scores["rows"] == 20 and scores["oracle_acc"] == pytest.approx(
        sum(scores["by_task"][n]["oracle_acc"] for n in NAMES) / 2
    )


def test_eval_on_a_labelled_file_and_its_refusals(finished_run, tmp_path):
    inputs = tmp_path / "labelled.jsonl"
    rows = [
        {"text": "red car", "label": "red", "task": "colors"},
        {"text": "a dog", "label": "dog"},
    ]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "scores.json"
    result = invoke("eval", "--run", finished_run.run, "--input", inputs, "--output", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text(encoding="utf-8"))
    learner = load_learner(finished_run.run)
    routed = [r["label"] for r in learner.predict_details(["red car", "a dog"])]
    assert scores["routed_acc"] == pytest.approx(((routed[0] == "red") + (routed[1] == "dog")) / 2)
    assert scores["by_task"]["colors"]["rows"] == 1 and "animals" not in scores["by_task"]
    oracle = learner.predict(["red car"], task="colors")[0] == "red"
    assert scores["oracle_acc"] == pytest.approx(float(oracle))
    # each figure says the rows it counts: oracle and routing only the line naming a task
    assert (scores["oracle_rows"], scores["routing_rows"], scores["routed_rows"]) == (1, 1, 2)
    line = next(x for x in result.stdout.splitlines() if "all rows" in x)
    assert line.count("(1 of 2)") == 2, line
    neither = invoke("eval", "--run", finished_run.run)
    assert neither.exit_code == 2 and "a stream spec" in neither.stderr
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "x"}\n', encoding="utf-8")
    bad = invoke("eval", "--run", finished_run.run, "--input", unlabelled)
    assert bad.exit_code == 2 and 'have no "label" string' in bad.stderr


# ---------------------------------------------------------------- consistency


def test_version_and_help_texts():
    from continual_peft import __version__

    for flag in ("--version", "-V"):
        assert invoke(flag).stdout.strip() == f"continual-peft {__version__}"
    commands = ["run", "compare", "report", "export", "predict", "eval", "list"]
    listed = invoke("--help").stdout
    assert all(re.search(rf"^  {c} +\S", listed, re.M) for c in commands)
    summaries = listed.split("Commands:")[1]
    assert "..." not in summaries  # whole, not cut
    for command in commands:
        text = invoke(command, "--help").stdout
        assert not re.search(r"<(bool|int|float|str|text|path)>", text), (command, text)
        options = re.findall(r"^  (--[a-z-]+)(?: [A-Z]+)?( +\S.*)?$", text, re.M)
        bare = [name for name, rest in options if not rest]  # an option without help text
        assert not bare, (command, bare)


def test_compare_takes_the_stream_as_run_does(tmp_path, monkeypatch):
    spec = tmp_path / "missing.toml"
    for args in (["compare", spec], ["compare", "--stream", spec]):
        result = invoke(*args, "--out", tmp_path / "out")
        assert result.exit_code == 2 and f"{spec}: spec file not found" in result.stderr
    both = invoke("compare", spec, "--stream", tmp_path / "other.toml")
    assert both.exit_code == 2 and "give the stream spec once" in both.stderr


# ---------------------------------------------------------------- library


def test_a_with_block_finishes_the_run_or_marks_it_failed(make_backbone, tmp_path):
    config = LearnerConfig(train=TrainConfig(epochs=1, batch_size=8))
    task = word_task("colors", n_train=8, n_test=4)
    with ContinualLearner(make_backbone(), config=config, run_dir=tmp_path / "ok") as learner:
        learner.learn(task)
    assert load_report(tmp_path / "ok")["status"] == "finished"
    failing = ContinualLearner(make_backbone(), config=config, run_dir=tmp_path / "no")
    with pytest.raises(RuntimeError, match="boom"), failing as other:
        other.learn(task)
        raise RuntimeError("boom")
    assert load_report(tmp_path / "no")["status"] == "failed"
    assert not (tmp_path / "no" / ".lock").exists()


def test_each_task_records_its_loss_curve(make_backbone):
    config = LearnerConfig(train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0))
    learner = ContinualLearner(make_backbone(), config=config)
    record = learner.learn(word_task("colors", n_train=24, n_test=4))
    curve = record["loss_curve"]
    assert curve["steps"] == list(range(1, record["train_steps"] + 1))  # under 200: every step
    assert record["final_train_loss"] == pytest.approx(sum(curve["loss"][3:]) / 3)  # epoch 2


# ---------------------------------------------------------------- noise


def test_a_pooler_less_checkpoint_loads_quietly_and_a_missing_weight_is_named(
    finished_run, tmp_path, capfd
):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for an unused pooler
        Backbone.from_pretrained(str(finished_run.base), 32, device=str(DEVICE))
    assert "LOAD REPORT" not in capfd.readouterr().err
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in finished_run.base.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights.pop("encoder.layer.0.attention.self.query.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 weight.*encoder.layer.0.attention.self.query.weight"):
        Backbone.from_pretrained(str(broken), 32, device=str(DEVICE))


# ---------------------------------------------------------------- refused early, named clearly


def test_small_refusals_come_before_any_model_loads(finished_run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the input was checked")

    monkeypatch.setattr(Backbone, "from_pretrained", refuse)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "fine"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    odd = invoke("predict", "--run", finished_run.run, "--input", inputs)
    assert odd.exit_code == 2 and f"{inputs}:2: the text is not valid Unicode" in odd.stderr
    inputs.write_text('{"text": "fine"}\n', encoding="utf-8")
    folder = invoke("predict", "--run", finished_run.run, "--input", inputs, "--output", tmp_path)
    assert folder.exit_code == 2 and f"--output {tmp_path} is a folder" in folder.stderr
    rank = invoke(
        "run", finished_run.spec, "--module", "prompt", "--rank", "4", "--out", tmp_path / "x"
    )
    assert rank.exit_code == 2 and "--rank 4 sets the LoRA rank" in rank.stderr
    spec_dir = invoke("run", finished_run.spec, "--strategy", tmp_path, "--out", tmp_path / "y")
    assert spec_dir.exit_code == 2 and "is a folder, not a strategy spec file" in spec_dir.stderr


def test_a_run_without_config_json_says_it_is_missing(run_copy, tmp_path):
    run = run_copy
    (run / "config.json").unlink()
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    result = invoke("predict", "--run", run, "--input", inputs)
    assert result.exit_code == 2 and f"{run / 'config.json'} is missing" in result.stderr


# ---------------------------------------------------------------- where output goes; eval's guards


def test_output_goes_through_links_never_onto_devices_and_dash_is_stdout(finished_run, tmp_path):
    import os

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car", "task": "colors"}\n', encoding="utf-8")
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n", encoding="utf-8")
    link.symlink_to(target)
    linked = invoke("predict", "--run", finished_run.run, "--input", inputs, "--output", link)
    assert linked.exit_code == 0, linked.output
    assert link.is_symlink() and json.loads(target.read_text(encoding="utf-8"))["task"] == "colors"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for command in (["predict", "--input", inputs], ["eval", finished_run.spec]):
        refused = invoke(*command, "--run", finished_run.run, "--output", fifo)
        assert refused.exit_code == 2 and "not a regular file" in refused.stderr
    dash = invoke("predict", "--run", finished_run.run, "--input", inputs, "--output", "-")
    assert dash.exit_code == 0 and json.loads(dash.stdout)["task"] == "colors"
    assert not (Path.cwd() / "-").exists()
    scores = invoke("eval", finished_run.spec, "--run", finished_run.run, "--output", "-")
    assert scores.exit_code == 0 and json.loads(scores.stdout)["rows"] == 20


def test_eval_output_has_predicts_guards(finished_run, tmp_path):
    labelled = tmp_path / "l.jsonl"
    labelled.write_text('{"text": "a red car", "label": "red"}\n', encoding="utf-8")
    cases = [
        (["--input", labelled, "--output", labelled], "is the --input file"),
        (["--input", labelled, "--output", finished_run.run / "report.json"], "inside the run"),
        (["--input", labelled, "--output", tmp_path], "is a folder"),
        (["--input", labelled, "--output", tmp_path / "no" / "x.json"], "does not exist"),
        ([finished_run.spec, "--task", "colors"], "--task goes with --input"),
        ([], "got neither"),
    ]
    for args, expected in cases:
        result = invoke("eval", "--run", finished_run.run, *args)
        assert result.exit_code == 2 and expected in result.stderr, (args, result.output)


def test_eval_names_other_data_unseen_labels_and_shows_the_task_mean(finished_run, tmp_path):
    with pytest.warns(UserWarning, match=r"task\(s\) \['colors', 'animals'\]: the data given"):
        fewer = invoke("eval", finished_run.spec, "--run", finished_run.run, "--max-test", "3")
    assert fewer.exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own data: no warning
        same = invoke("eval", finished_run.spec, "--run", finished_run.run)
    assert same.exit_code == 0 and "mean of tasks" in same.stdout
    labelled = tmp_path / "l.jsonl"
    labelled.write_text('{"text": "a red car", "label": "purple", "task": "colors"}\n', "utf-8")
    with pytest.warns(UserWarning, match=r"never had are scored as wrong: \['colors:purple'\]"):
        odd = invoke("eval", "--run", finished_run.run, "--input", labelled)
    assert odd.exit_code == 0


def test_predict_refuses_a_task_that_contradicts_a_line_and_names_unknown_lines(
    finished_run, tmp_path
):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "x"}\n{"text": "y", "task": "animals"}\n', encoding="utf-8")
    clash = invoke("predict", "--run", finished_run.run, "--input", inputs, "--task", "colors")
    assert clash.exit_code == 2 and "record(s) [2] name another task than --task" in clash.stderr
    inputs.write_text('{"text": "x"}\n{"text": "y", "task": "moods"}\n', encoding="utf-8")
    unknown = invoke("predict", "--run", finished_run.run, "--input", inputs)
    assert unknown.exit_code == 2 and "record 2: 'moods'" in unknown.stderr


def test_threads_far_above_the_cpus_are_refused_and_above_them_said(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(placement, "usable_cpus", lambda: 2)
    try:
        with pytest.raises(ContinualPeftError, match="far more than the 2 CPU"):
            set_threads(99999)
        assert "oversubscribed" in set_threads(3)
    finally:
        torch.set_num_threads(before)


def test_a_closed_stdout_is_said_once_and_the_work_goes_on(monkeypatch, capsys):
    import io
    import os
    import sys

    from continual_peft import cli

    read, write = os.pipe()
    os.close(read)  # the reader is gone
    pipe = io.TextIOWrapper(io.FileIO(write, "w"))
    monkeypatch.setattr(sys, "stdout", pipe)
    out = cli.base.Stdout()
    assert out.write("table\n") == 6 and out.broken
    assert out.write("more\n") == 5  # nothing raised
    assert capsys.readouterr().err.count("standard output was closed") == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["compare", "--sweep", "module=lora,ia3", "--sweep", "lora.r=4,8"], "--sweep"),
        (["compare", "--strategies", "seq", "--strategies=replay"], "--strategies"),
        (["run", "--seeds", "0,1", "--seeds", "2"], "--seeds"),
    ],
)
def test_a_list_option_given_twice_is_refused(tmp_path, args, named):
    result = invoke(*args, "--out", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert f"error: {named} is given 2 times" in result.stderr
    assert "silently keep the last" in result.stderr
    assert not (tmp_path / "x").exists()


def test_other_options_keep_the_last_given_and_a_double_dash_ends_the_options():
    import typer

    from continual_peft.cli.base import given_once

    command = typer.main.get_command(app).commands["run"]
    given_once(command, ["--epochs", "2", "--epochs", "3"])  # the last wins, as in argparse
    given_once(command, ["--exclude", "a", "--exclude", "b"])  # options of several values:
    given_once(command, ["--order", "a,b", "--order", "b,a"])  # repeating adds to them
    given_once(command, ["--seeds", "1", "--", "--seeds", "2"])  # after --: an argument
