"""Order x seed grids: the summary statistics, a real tiny grid through the CLI, and bad input."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import word_task, write_stream
from typer.testing import CliRunner

from continual_peft import Backbone, LearnerConfig, Stream
from continual_peft import cli as cli_module
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments import launch
from continual_peft.experiments.grid import (
    load_aggregate,
    parse_seeds,
    resolve_orders,
    run_grid,
    summarise,
)
from continual_peft.experiments.runner import run_stream
from continual_peft.reports.run import load_report

runner = CliRunner()
NAMES = ("colors", "animals", "moods")
ORDERS = '[orders]\nforward = ["colors", "animals", "moods"]\nbackward = ["moods", "animals"]\n'


def invoke(*args: str | Path):
    return runner.invoke(cli_module.app, [str(a) for a in args])


@pytest.fixture
def grid_spec(tmp_path: Path) -> Path:
    """Three small word tasks on disk, with two named orders."""
    spec = write_stream(tmp_path / "stream", [word_task(n, n_train=18, n_test=9) for n in NAMES])
    spec.write_text(spec.read_text(encoding="utf-8") + "\n" + ORDERS, encoding="utf-8")
    return spec


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the input was validated")

    monkeypatch.setattr(Backbone, "from_pretrained", refuse)


# ---------------------------------------------------------------- summarise (no training)


def _run(order: str, seed: int, acc: float, bwt: float, forgetting: float, routed):
    metrics = {"acc": acc, "bwt": bwt, "forgetting": forgetting, "routed_acc": routed}
    return {"order": order, "tasks": [], "seed": seed, "run_dir": f"{order}-seed{seed}", **metrics}


def test_summarise_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, size=(6, 4))
    runs = [
        _run("order1" if i < 3 else "order2", i % 3, *values[i, :3], values[i, 3]) for i in range(6)
    ]
    runs[4]["routed_acc"] = None  # not measured: left out of that metric's n
    summary = summarise(runs)
    assert "ddof=1" in summary["std"]
    assert list(summary["by_order"]) == ["order1", "order2"]
    groups = {"order1": [0, 1, 2], "order2": [3, 4, 5]}
    for name, rows in [*groups.items(), ("overall", list(range(6)))]:
        stats = summary["overall"] if name == "overall" else summary["by_order"][name]
        for column, key in enumerate(("acc", "bwt", "forgetting", "routed_acc")):
            expected = np.array([values[i, column] for i in rows if (i, key) != (4, "routed_acc")])
            assert stats[key]["n"] == len(expected)
            assert stats[key]["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
            assert stats[key]["std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)


def test_summarise_one_run_and_no_router():
    summary = summarise([_run("default", 0, 0.5, -0.1, 0.2, None)])
    assert summary["overall"]["acc"] == {"mean": 0.5, "std": None, "n": 1}
    assert summary["overall"]["routed_acc"] == {"mean": None, "std": None, "n": 0}


# ---------------------------------------------------------------- parsing orders and seeds


def test_parse_seeds():
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad, message in [("0,x", "'x' is not an integer"), ("1,1", "listed twice"), ("", "''")]:
        with pytest.raises(ContinualPeftError, match=message):
            parse_seeds(bad)


def test_resolve_orders():
    tasks = [word_task(n, n_train=3, n_test=3) for n in NAMES]
    orders = {"default": list(NAMES), "fwd": list(NAMES), "rev": list(reversed(NAMES))}
    stream = Stream("words", tasks, orders=orders)
    assert resolve_orders(stream, ["all"]) == ["fwd", "rev"]
    assert resolve_orders(stream, ["rev", "default,fwd"]) == ["rev", "default", "fwd"]
    assert resolve_orders(stream, ["moods,colors", "animals,"]) == [
        ["moods", "colors"],
        ["animals"],
    ]
    for bad in ["nope", "moods,nope", "fwd,moods", ","]:
        with pytest.raises(ContinualPeftError, match="named orders: \\['default', 'fwd', 'rev'\\]"):
            resolve_orders(stream, [bad])


def test_a_repeated_order_is_refused(tmp_path: Path, no_model):
    stream = Stream("words", [word_task(n, n_train=3, n_test=3) for n in NAMES])
    stream.orders = {"default": list(NAMES)}
    for orders in (["default", "default"], ["default", list(NAMES)]):
        with pytest.raises(ContinualPeftError, match="given twice|same tasks in the same order as"):
            run_grid(stream, LearnerConfig(), orders, [0], tmp_path / "grid")
    assert not (tmp_path / "grid").exists()


# ---------------------------------------------------------------- CLI: bad input


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--order", "sideways"], "named orders: ['backward', 'default', 'forward']"),
        (["--order", "colors,zebras"], "--order 'colors,zebras': not a named order"),
        (["--seeds", "0,x"], "--seeds '0,x': 'x' is not an integer"),
        (["--seeds", "0", "--seed", "1"], "give --seed or --seeds, not both"),
    ],
    ids=["unknown-order", "unknown-task", "bad-seeds", "seed-and-seeds"],
)
def test_cli_refuses(grid_spec: Path, tmp_path: Path, no_model, options, expected):
    result = invoke("run", grid_spec, "--out", tmp_path / "out", *options)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- real runs


def test_cli_one_order_one_seed_is_a_plain_run(grid_spec, tmp_path, make_backbone, monkeypatch):
    monkeypatch.setattr(
        launch, "run_stream", functools.partial(run_stream, make_backbone=make_backbone)
    )
    out = tmp_path / "run"
    options = ["--order", "moods,colors", "--seeds", "3", "--epochs", "1", "--rank", "2"]
    result = invoke("run", grid_spec, "--out", out, *options, "--max-train", "8", "--max-test", "4")
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report["task_names"] == ["moods", "colors"] and report["config"]["seed"] == 3
    assert not (out / "aggregate.json").exists()


def test_cli_grid_two_orders_two_seeds(grid_spec, tmp_path, make_backbone, monkeypatch):
    monkeypatch.setattr(
        launch, "run_grid", functools.partial(run_grid, make_backbone=make_backbone)
    )
    out = tmp_path / "grid"
    grid = ["--order", "forward", "--order", "backward", "--seeds", "0,1", "--router", "prototype"]
    budget = ["--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--rank", "2"]
    budget += ["--max-length", "16"]
    result = invoke("run", grid_spec, "--out", out, *grid, *budget)
    assert result.exit_code == 0, result.output
    assert "run 3/4: backward, seed 0" in result.stdout
    assert "grid directory:" in result.stdout
    aggregate = load_aggregate(out)
    assert aggregate["status"] == "finished" and aggregate["seeds"] == [0, 1]
    expected_tasks = {"forward": list(NAMES), "backward": ["moods", "animals"]}
    assert aggregate["orders"] == expected_tasks
    runs = aggregate["runs"]
    expected = [("forward", 0), ("forward", 1), ("backward", 0), ("backward", 1)]
    assert [(r["order"], r["seed"]) for r in runs] == expected
    for run in runs:
        report = load_report(out / run["run_dir"])
        assert report["task_names"] == run["tasks"] == expected_tasks[run["order"]]
        assert report["config"]["seed"] == run["seed"]
        metrics = report["metrics"]
        assert run["acc"] == metrics["oracle"]["acc"]
        assert run["bwt"] == metrics["oracle"]["bwt"]
        assert run["forgetting"] == metrics["oracle"]["forgetting"]
        assert run["routed_acc"] == metrics["routed"]["acc"]
    assert summarise(runs) == aggregate["summary"]
    assert runs[0]["routed_acc"] is not None
    for file in ("aggregate.md", "aggregate.csv", "aggregate.png"):
        assert (out / file).stat().st_size > 0
    with (out / "aggregate.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["order", "seed", "tasks", "run_dir"]
    keys = ("acc", "bwt", "forgetting", "routed_acc")
    assert [float(v) for v in rows[1][4:8]] == [runs[0][k] for k in keys]
    markdown = (out / "aggregate.md").read_text(encoding="utf-8")
    assert "sample standard deviation (ddof=1)" in markdown and "routed ACC" in markdown

    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    assert "forward" in shown.stdout and "backward" in shown.stdout and "±" in shown.stdout


def test_a_failing_combination_propagates_and_keeps_the_finished(tmp_path, make_backbone):
    stream = Stream("words", [word_task(n, n_train=12, n_test=6) for n in NAMES[:2]])
    stream.orders = {"default": list(NAMES[:2])}
    calls = []

    def flaky() -> Backbone:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return make_backbone(16)

    config = LearnerConfig.from_dict({"train": {"epochs": 1, "batch_size": 8}, "lora": {"r": 2}})
    with pytest.raises(RuntimeError, match="simulated"):
        run_grid(stream, config, ["default"], [0, 1], tmp_path / "grid", make_backbone=flaky)
    aggregate = json.loads((tmp_path / "grid" / "aggregate.json").read_text(encoding="utf-8"))
    assert aggregate["status"] == "failed" and aggregate["failed"]["seed"] == 1
    assert [r["run_dir"] for r in aggregate["runs"]] == ["default-seed0"]
    assert aggregate["runs"][0]["routed_acc"] is None  # oracle routing: no routed ACC
    assert load_report(tmp_path / "grid" / "default-seed0")["status"] == "finished"


def test_an_interrupted_grid_resumes_to_the_uninterrupted_aggregate(
    grid_spec, tmp_path, make_backbone, monkeypatch
):
    from continual_peft.strategies import Strategy

    monkeypatch.setattr(
        launch, "run_grid", functools.partial(run_grid, make_backbone=make_backbone)
    )
    stream_args = ["--max-train", "8", "--max-test", "4"]
    options = ["--order", "backward", "--seeds", "0,1", "--epochs", "1", "--batch-size", "8"]
    options += ["--rank", "2", "--max-length", "16", *stream_args]
    clean = tmp_path / "clean"
    assert invoke("run", grid_spec, "--out", clean, *options).exit_code == 0
    original = Strategy.loss

    def stop_in_seed_1(self, learner, task, loss):
        if learner.config.seed == 1 and task.name == "animals":
            raise KeyboardInterrupt
        return original(self, learner, task, loss)

    out = tmp_path / "grid"
    with monkeypatch.context() as patch:
        patch.setattr(Strategy, "loss", stop_in_seed_1)
        assert invoke("run", grid_spec, "--out", out, *options).exit_code == 130
    assert load_aggregate(out)["status"] == "failed"
    kept = (out / "backward-seed0" / "checkpoint.json").read_bytes()
    again = invoke("run", grid_spec, "--out", out, *options)
    assert again.exit_code == 2 and "--resume" in again.stderr
    other = invoke("run", grid_spec, "--resume", out, "--seeds", "0,2", *stream_args)
    assert other.exit_code == 2 and "was started as another grid (seeds" in other.stderr
    resumed = invoke("run", grid_spec, "--resume", out, *stream_args)  # the rest: the grid's
    assert resumed.exit_code == 0, resumed.output
    assert (out / "backward-seed0" / "checkpoint.json").read_bytes() == kept  # not re-trained
    ours, theirs = load_aggregate(out), load_aggregate(clean)
    assert ours["status"] == "finished"
    assert ours["runs"] == theirs["runs"] and ours["summary"] == theirs["summary"]
    finished = invoke("run", grid_spec, "--resume", out, *stream_args)
    assert finished.exit_code == 0 and "is finished: nothing to do" in finished.stdout
    other = invoke("run", grid_spec, "--resume", out, "--epochs", "2", *stream_args)
    assert other.exit_code == 2 and "was started as another grid" in other.stderr
    shutil.rmtree(out / "backward-seed1")  # a finished grid that lost a run: run again
    repaired = invoke("run", grid_spec, "--resume", out, *stream_args)
    assert repaired.exit_code == 0, repaired.output
    assert load_aggregate(out)["runs"] == theirs["runs"]
