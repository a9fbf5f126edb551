"""The command line: listings, bad input refused before any model loads, and a tiny full run."""

from __future__ import annotations

import csv
import functools
import json
import re
from pathlib import Path

import pytest
from helpers import word_task, write_stream
from typer.testing import CliRunner

from continual_peft import MODULE_KINDS, STRATEGIES
from continual_peft.backbones.text import Backbone
from continual_peft.cli import app
from continual_peft.cli import base as cli_base
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments import launch
from continual_peft.experiments.runner import run_stream
from continual_peft.routers import ROUTERS
from continual_peft.tasks.records import read_texts

KIND_NAMES = ", ".join(MODULE_KINDS.names())
REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def stream_spec(tmp_path: Path) -> Path:
    """A valid two-task stream on disk (small word tasks)."""
    tasks = [word_task(name, n_train=24, n_test=12) for name in ("colors", "animals")]
    return write_stream(tmp_path / "stream", tasks)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load a pretrained backbone."""

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the input was validated")

    monkeypatch.setattr(Backbone, "from_pretrained", refuse)


# ---------------------------------------------------------------- list


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("modules", MODULE_KINDS.names()),
        ("strategies", STRATEGIES.names()),
        ("routers", ROUTERS.names()),
    ],
)
def test_list_shows_every_registered_name(what: str, expected: list[str]):
    result = invoke("list", what)
    assert result.exit_code == 0, result.output
    listed = [n for n in expected if re.search(rf"^{re.escape(n)}(:|$)", result.stdout, re.M)]
    assert listed == expected, result.stdout


def test_list_names_the_built_ins():
    assert "lora" in invoke("list", "modules").stdout
    assert "a hybrid slot: kinds joined by '+'" in invoke("list", "modules").stdout
    strategies = invoke("list", "strategies").stdout
    assert "per_task" in strategies and "seq" in strategies
    assert "oracle" in invoke("list", "routers").stdout


def test_list_streams_shows_each_spec_with_its_tasks_and_orders(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped specs are listed from the checkout's streams/
    result = invoke("list", "streams")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("demo (embedded): demo, tasks support-product,") for line in lines)
    benchmark = next(line for line in lines if line.startswith("streams/cl_benchmark.toml"))
    assert "tasks agnews, amazon, yelp, dbpedia" in benchmark
    assert "orders: mbpa1, mbpa2, mbpa3, mbpa4, order1, order2, order3" in benchmark


def test_list_strategies_shows_the_shipped_specs(monkeypatch):
    monkeypatch.chdir(REPO)
    stdout = invoke("list", "strategies").stdout
    assert (
        "strategies/per_task_routed.toml: strategy per_task, module lora, router mahalanobis"
        in (stdout)
    )


def test_list_bogus_names_the_choices():
    result = invoke("list", "bogus")
    assert result.exit_code == 2
    assert "cannot list 'bogus'; choose one of: modules, strategies, streams, routers" in (
        result.stderr
    )


# ---------------------------------------------------------------- run: bad input


def _edit_line(path: Path, number: int, line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _replace(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def _expect_refusal(spec: Path, out: Path, expected: str, *options: str) -> None:
    result = invoke("run", spec, "--out", out, *options)
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_run_undeclared_test_label(stream_spec: Path, tmp_path: Path, no_model):
    test_file = stream_spec.parent / "animals" / "test.jsonl"
    _edit_line(test_file, 3, json.dumps({"text": "a cow moos", "label": "cow"}))
    expected = f"{test_file}:3: label 'cow' is not one of task 'animals''s labels"
    _expect_refusal(stream_spec, tmp_path / "out", expected, "--strict-labels")


def test_run_missing_file(stream_spec: Path, tmp_path: Path, no_model):
    missing = stream_spec.parent / "colors" / "train.jsonl"
    missing.unlink()
    _expect_refusal(stream_spec, tmp_path / "out", f"{missing}: file not found")


def test_run_malformed_line(stream_spec: Path, tmp_path: Path, no_model):
    train = stream_spec.parent / "colors" / "train.jsonl"
    _edit_line(train, 5, '{"text": "red car", label: "red"}')
    _expect_refusal(stream_spec, tmp_path / "out", f"{train}:5: malformed JSON")


def test_run_duplicate_task_names(stream_spec: Path, tmp_path: Path, no_model):
    _replace(stream_spec, 'name = "animals"', 'name = "colors"')
    _expect_refusal(
        stream_spec, tmp_path / "out", f"{stream_spec}: tasks[1].name: duplicate task name 'colors'"
    )


@pytest.mark.parametrize("name", ["../evil", "Upper", ""])
def test_run_invalid_task_name(stream_spec: Path, tmp_path: Path, no_model, name: str):
    _replace(stream_spec, 'name = "colors"', f"name = {json.dumps(name)}")
    _expect_refusal(
        stream_spec,
        tmp_path / "out",
        f"{stream_spec}: tasks[0].name: invalid task name {name!r}. Task names become folder "
        "names: use lower-case letters",
    )


def test_run_unknown_spec_key(stream_spec: Path, tmp_path: Path, no_model):
    _replace(stream_spec, 'name = "words"', 'name = "words"\nmax_tests = 3')
    _expect_refusal(stream_spec, tmp_path / "out", "unknown key(s) ['max_tests']; valid keys:")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--strategy", "bogus"],
            f"unknown strategy 'bogus'; valid names: {', '.join(STRATEGIES.names())}",
        ),
        (["--module", "bogus"], f"unknown module kind 'bogus'; valid names: {KIND_NAMES}"),
        (
            ["--baseline", "bogus"],
            f"unknown strategy 'bogus'; valid names: {', '.join(STRATEGIES.names())}",
        ),
        (["--epochs", "0"], "train.epochs = 0 is invalid; it must be >= 1"),
        (["--lr", "-1"], "train.lr = -1.0 is invalid; it must be > 0"),
        (["--rank", "0"], "lora.r = 0 is invalid; it must be >= 1"),
        (["--max-train", "0"], "task 'colors': max_train = 0 is invalid; it must be >= 1"),
        (["--reject-rate", "0.05"], "reject_rate 0.05 needs a router that scores tasks"),
        (
            ["--router", "mahalanobis", "--reject-rate", "1.5"],
            r"reject_rate must be in [0, 1), got 1.5",
        ),
    ],
    ids=[
        "strategy",
        "module",
        "baseline",
        "epochs",
        "lr",
        "rank",
        "max-train",
        "oracle-reject",
        "reject-rate",
    ],  # fmt: skip
)
def test_run_bad_option(
    stream_spec: Path, tmp_path: Path, no_model, options: list[str], expected: str
):
    _expect_refusal(stream_spec, tmp_path / "out", expected, *options)


def test_run_bad_strategy_spec_file(stream_spec: Path, tmp_path: Path, no_model):
    spec = tmp_path / "strategy.toml"
    spec.write_text('strategy = "per_task"\n[train]\nepochs = 1\nepoch = 2\n', encoding="utf-8")
    _expect_refusal(
        stream_spec,
        tmp_path / "out",
        f"{spec}: [train]: unknown key(s) ['epoch']; valid keys:",
        "--strategy",
        str(spec),
    )


def test_run_missing_stream_spec(tmp_path: Path, no_model):
    _expect_refusal(tmp_path / "nope.toml", tmp_path / "out", "nope.toml: spec file not found")


# ---------------------------------------------------------------- a whole run, then `report`


def _check_run_dir(run_dir: Path, names: list[str]) -> dict:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "finished"
    assert report["task_names"] == names
    for file in ("report.md", "accuracy_matrix.csv", "accuracy_matrix.png", "config.json"):
        assert (run_dir / file).is_file(), file
    for name in names:
        for file in ("module.safetensors", "head.safetensors", "task.json"):
            assert (run_dir / "tasks" / name / file).is_file(), (name, file)
    with (run_dir / "accuracy_matrix.csv").open(newline="") as handle:
        assert any(name in row for row in csv.reader(handle) for name in names)
    return report


@pytest.mark.real_plots
def test_run_then_report(stream_spec: Path, tmp_path: Path, make_backbone, monkeypatch):
    # The CLI loads a backbone by name; the function it calls gets the tiny one instead.
    monkeypatch.setattr(
        launch, "run_stream", functools.partial(run_stream, make_backbone=make_backbone)
    )
    run_dir = tmp_path / "run"
    options = "--baseline seq --epochs 1 --batch-size 8 --lr 0.01 --rank 2 --max-train 16"
    result = invoke("run", stream_spec, "--out", run_dir, *options.split(), "--max-test", "8")
    assert result.exit_code == 0, result.output
    # Rich may wrap a long path at the console width: compare without whitespace.
    assert re.sub(r"\s", "", f"run directory: {run_dir}") in re.sub(r"\s", "", result.stdout)
    # one table per task as it finishes, one headline at the end: nothing printed twice
    assert result.stdout.count("Headline (%)") == 1
    assert result.stdout.count("words / per_task: 2 task(s), finished") == 0
    assert result.stdout.count("words / per_task: 2 task(s)") == 1

    names = ["colors", "animals"]
    report = _check_run_dir(run_dir, names)
    base = _check_run_dir(run_dir / "baseline-seq", names)
    assert report["strategy"] == "per_task" and base["strategy"] == "seq"
    assert report["baseline"]["strategy"] == "seq"
    assert report["baseline"]["accuracy_matrix"] == base["accuracy_matrix"]
    assert report["baseline"]["metrics"] == base["metrics"]
    assert len(report["accuracy_matrix"]["oracle"]) == 2
    assert [t["train_examples"] for t in report["tasks"]] == [16, 16]
    assert [t["test_examples"] for t in report["tasks"]] == [8, 8]
    assert report["config"]["train"]["epochs"] == 1 and report["config"]["lora"]["r"] == 2
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]
    assert config["strategy"] == "per_task" and config["train"]["lr"] == 0.01

    for target in (run_dir, run_dir / "report.json"):
        result = invoke("report", target)
        assert result.exit_code == 0, result.output
        assert all(name in result.stdout for name in names)
        assert "words / per_task: 2 task(s), finished" in result.stdout


def test_run_refuses_a_used_run_dir(stream_spec: Path, tmp_path: Path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    result = invoke("run", stream_spec, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"{out} already holds a run (report.json); choose another --out folder" in (
        result.stderr
    )
    assert [p.name for p in out.iterdir()] == ["report.json"]


def test_report_on_truncated_file(tmp_path: Path):
    path = tmp_path / "report.json"
    text = json.dumps({"schema_version": 1, "status": "finished", "task_names": ["a"]})
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    for target in (tmp_path, path):
        result = invoke("report", target)
        assert result.exit_code == 2
        assert re.search(rf"{re.escape(str(path))} is corrupt or truncated", result.stderr)


def test_report_without_a_run(tmp_path: Path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert f"no report at {tmp_path / 'report.json'}" in result.stderr


def test_shipped_specs_are_found_from_any_working_directory(tmp_path, monkeypatch):
    """`list` and `compare --strategies NAME` locate strategies/ and streams/ from the package."""
    from continual_peft.experiments.entries import entry_from

    monkeypatch.chdir(tmp_path)
    strategies = CliRunner().invoke(app, ["list", "strategies"])
    streams = CliRunner().invoke(app, ["list", "streams"])
    assert strategies.exit_code == 0 and "l2p.toml" in strategies.stdout, strategies.output
    assert streams.exit_code == 0 and "cl_benchmark" in streams.stdout, streams.output
    entry = entry_from("l2p")
    assert entry.spec.endswith("strategies/l2p.toml") and entry.config.module == "prompt_pool"


# ---------------------------------------------------------------- sharper messages


@pytest.mark.parametrize("where", ["spec", "train", "labels", "predict"])
def test_a_folder_given_for_a_file_is_named_as_a_folder(stream_spec, tmp_path, no_model, where):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    if where == "predict":  # what `predict --input` reads, once the run is found
        with pytest.raises(ContinualPeftError, match=f"{folder} is a folder, not a JSONL file"):
            read_texts(folder)
        return
    if where == "spec":
        result = invoke("run", folder, "--out", tmp_path / "out")
    else:
        text = stream_spec.read_text(encoding="utf-8")
        key = "train" if where == "train" else "labels"
        pattern = rf'(?m)^{key} = "colors/[a-z.]+"$'
        stream_spec.write_text(re.sub(pattern, f'{key} = "{folder}"', text, count=1), "utf-8")
        result = invoke("run", stream_spec, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"{folder} is a folder, not a" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ('["red", "blue", "red"]', "label(s) ['red'] are listed more than once"),
        ('["red", " ", "blue", "green"]', "label ' ' is empty or blank"),
    ],
)
def test_repeated_or_blank_labels_are_named(stream_spec, tmp_path, no_model, labels, expected):
    text = stream_spec.read_text(encoding="utf-8")
    stream_spec.write_text(
        re.sub(r'(?m)^labels = "colors/labels.json"$', f"labels = {labels}", text, count=1),
        encoding="utf-8",
    )
    result = invoke("run", stream_spec, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "task 'colors'" in result.stderr and expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_strategy_with_a_shipped_spec_of_its_name_runs_with_it():
    config = launch.resolve_config("l2p", {}, None)
    assert (config.strategy, config.module) == ("l2p", "prompt_pool")
    assert launch.resolve_config("per_task", {}, None).module == "lora"  # no spec of that name


def test_warnings_are_one_line_on_stderr():
    format_ = cli_base.format_warning
    lines = [
        format_(UserWarning("task 'x' has one class"), UserWarning, __file__, 1),
        format_(FutureWarning("old API"), FutureWarning, "/lib/other.py", 7),
    ]
    assert "".join(lines).splitlines() == [
        "warning: task 'x' has one class",
        "warning: old API (FutureWarning, other.py:7)",
    ]


@pytest.mark.real_plots
def test_run_with_rejection_reports_what_it_did(stream_spec, tmp_path, make_backbone, monkeypatch):
    monkeypatch.setattr(
        launch, "run_stream", functools.partial(run_stream, make_backbone=make_backbone)
    )
    run_dir = tmp_path / "run"
    options = "--epochs 1 --batch-size 8 --max-test 8 --router mahalanobis --reject-rate 0.25"
    result = invoke("run", stream_spec, "--out", run_dir, *options.split())
    assert result.exit_code == 0, result.output
    assert "Routing and rejection after the last task" in result.stdout
    report = _check_run_dir(run_dir, ["colors", "animals"])
    assert report["config"]["router_options"] == {"reject_rate": 0.25}
    block = report["rejection"]
    assert block["reject_rate"] == 0.25 and block["calibrated"] == [True, True]
    assert len(report["rejected_share"]) == 2
