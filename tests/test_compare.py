"""`compare`: a consistent leaderboard on a tiny backbone, a sweep, and bad input refused."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pytest
from helpers import word_task, write_stream
from typer.testing import CliRunner

from continual_peft import STRATEGIES, Backbone, LearnerConfig, ModuleBank
from continual_peft import cli as cli_module
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments import launch
from continual_peft.experiments.compare import compare, load_leaderboard, total_trainable_parameters
from continual_peft.experiments.entries import entry_from, resolve_entries
from continual_peft.reports.run import load_report
from continual_peft.strategies import NO_SLOT

runner = CliRunner()
NAMES = ("colors", "animals")
BUDGET = ("--epochs", "1", "--batch-size", "8", "--max-train", "12", "--max-test", "6")
# Every registered strategy: per_task and seq, and each one other engineers add (replay, ewc,
# ...) through its shipped spec or the default config.
STRATEGY_NAMES = STRATEGIES.names()


def invoke(*args: str | Path):
    return runner.invoke(cli_module.app, [str(a) for a in args])


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    tasks = [word_task(name, n_train=24, n_test=12) for name in NAMES]
    return write_stream(tmp_path / "stream", tasks)


@pytest.fixture
def tiny(monkeypatch, make_backbone):
    """The CLI's `compare` builds tiny backbones instead of loading the default one."""
    monkeypatch.setattr(launch, "compare", functools.partial(compare, make_backbone=make_backbone))


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the input was validated")

    monkeypatch.setattr(Backbone, "from_pretrained", refuse)


def _plain_count(make_backbone, config: LearnerConfig, labels: int) -> tuple[int, int]:
    """(one slot, one head) trainable parameters, counted from a fresh bank and a linear head."""
    backbone = make_backbone()
    bank = ModuleBank(backbone, config.module, config.kind_config(config.module))
    bank.add_slot(seed=0)
    slot = sum(p.numel() for p in bank.trainable_parameters())
    return slot, (backbone.hidden_size + 1) * labels


def test_compare_writes_a_consistent_leaderboard(spec: Path, tmp_path: Path, tiny, make_backbone):
    out = tmp_path / "cmp"
    names = ",".join(STRATEGY_NAMES)
    result = invoke("compare", "--stream", spec, "--strategies", names, "--out", out, *BUDGET)
    assert result.exit_code == 0, result.output
    for number, name in enumerate(STRATEGY_NAMES, start=1):
        assert f"strategy {number}/{len(STRATEGY_NAMES)}: {name}" in result.stdout
    tables = ["leaderboard.json", "leaderboard.md", "leaderboard.csv"]
    for name in (*tables, "acc_vs_params.png", "task_curves.png"):
        assert (out / name).is_file(), name
    board = load_leaderboard(out)
    assert board["status"] == "finished" and board["tasks"] == list(NAMES)
    entries = {e["label"]: e for e in board["entries"]}
    assert sorted(entries) == STRATEGY_NAMES
    accs = [e["acc"]["mean"] for e in board["entries"]]
    assert accs == sorted(accs, reverse=True)
    assert [e["rank"] for e in board["entries"]] == list(range(1, len(entries) + 1))

    for label, entry in entries.items():
        report = load_report(out / label)
        assert entry["status"] == "finished" and entry["error"] is None, entry["error"]
        for key in ("acc", "bwt", "forgetting"):
            assert entry[key] == {"mean": report["metrics"]["oracle"][key], "std": None, "n": 1}
        # oracle routing: no routed ACC, but for the one strategy that needs a router
        assert entry["routed_acc"]["n"] == (label == "route_or_merge"), label
        assert entry["route_or_merge_acc"]["n"] == (label == "route_or_merge"), label
        assert entry["stored_parameters"]["mean"] >= entry["trainable_parameters"]["mean"] > 0
        # the rule, recomputed from a fresh bank: each distinct slot once, plus every head
        config = LearnerConfig.from_dict(
            {k: v for k, v in report["config"].items() if k != "backbone_fingerprint"}
        )
        slot, head = _plain_count(make_backbone, config, labels=3)
        # each distinct slot; a task with none (linear_probe) trained its head alone
        slots = len({task["slot"] for task in report["tasks"]} - {NO_SLOT})
        if label == "inflora":  # its down-projections are designed, not trained: B alone
            slot //= 2
        # SD-LoRA trains a magnitude per task so far with each slot: 1, then 2, ...
        magnitudes = slots * (slots + 1) // 2 if label == "sdlora" else 0
        expected = slots * slot + magnitudes + len(NAMES) * head
        assert entry["trainable_parameters"]["mean"] == expected, label
        if label in ("per_task", "seq", "linear_probe"):
            assert slots == {"per_task": len(NAMES), "seq": 1, "linear_probe": 0}[label]
        assert entry["module"] == ("none" if slots == 0 else config.module), label
        assert entry["train_seconds"]["mean"] == pytest.approx(
            sum(t["train_seconds"] for t in report["tasks"])
        )
        # the budget is shared, each entry's own lr is kept
        assert report["config"]["train"]["epochs"] == 1
        assert report["config"]["train"]["lr"] == entry["lr"]
        assert len(entry["curves"]["seen_acc"]) == len(NAMES)

    with (out / "leaderboard.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == [e["label"] for e in board["entries"]]
    assert float(rows[0]["acc_mean"]) == board["entries"][0]["acc"]["mean"]
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert "trainable parameters = every parameter trained" in markdown

    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    assert "Leaderboard" in shown.stdout and "per_task" in shown.stdout


@pytest.mark.real_plots("leaderboard")  # the one comparison here that draws them (conftest.py)
def test_sweep_maps_parameters(spec: Path, tmp_path: Path, tiny):
    out = tmp_path / "sweep"
    sweep = ["--strategies", "per_task", "--sweep", "lora.r=1,2", "--lr", "0.01", *BUDGET]
    result = invoke("compare", "--stream", spec, *sweep, "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("sweep.png", "acc_vs_params.png", "task_curves.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000, name
    board = json.loads((out / "leaderboard.json").read_text(encoding="utf-8"))
    assert board["sweep"] == {"key": "lora.r"}
    points = sorted(
        (e["sweep"]["value"], e["trainable_parameters"]["mean"]) for e in board["entries"]
    )
    assert [value for value, _ in points] == [1, 2]
    assert points[0][1] < points[1][1]
    config = load_report(out / "per_task-lora.r-2")["config"]
    assert config["lora"]["r"] == 2 and config["train"]["lr"] == 0.01


def test_a_failing_entry_is_recorded_and_the_rest_run(
    spec: Path, tmp_path: Path, make_backbone, monkeypatch
):
    calls = []

    def flaky() -> Backbone:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return make_backbone()

    monkeypatch.setattr(launch, "compare", functools.partial(compare, make_backbone=flaky))
    out = tmp_path / "c"
    result = invoke(
        "compare", "--stream", spec, "--strategies", "per_task,seq", "--out", out, *BUDGET
    )
    assert result.exit_code == 1, result.output
    assert "1 of 2 entries failed: per_task (leaderboard.md)" in result.stderr
    board = load_leaderboard(out)
    assert [e["label"] for e in board["entries"]] == ["seq", "per_task"]
    failed = board["entries"][1]
    assert failed["status"] == "failed" and "RuntimeError: out of memory" in failed["error"]
    assert board["entries"][0]["status"] == "finished" and board["status"] == "finished"
    assert "RuntimeError: out of memory" in (out / "leaderboard.md").read_text(encoding="utf-8")


def test_parameter_rule_counts_a_shared_slot_once():
    report = {
        "tasks": [
            {"name": "a", "slot": 0, "trainable_parameters": 110},
            {"name": "b", "slot": 0, "trainable_parameters": 120},
            {"name": "c", "slot": 1, "trainable_parameters": 105},
        ]
    }
    heads = {"a": 10, "b": 20, "c": 5}
    assert total_trainable_parameters(report, heads) == 100 + 100 + 10 + 20 + 5


def test_names_resolve_to_their_single_shipped_spec(tmp_path: Path):
    (tmp_path / "seq_lora.toml").write_text('strategy = "seq"\n[train]\nlr = 0.05\n')
    (tmp_path / "per_task_a.toml").write_text('strategy = "per_task"\n')
    (tmp_path / "per_task_b.toml").write_text('strategy = "per_task"\n')
    seq = entry_from("seq", tmp_path)
    assert seq.spec == str(tmp_path / "seq_lora.toml") and seq.config.train.lr == 0.05
    per_task = entry_from("per_task", tmp_path)  # two candidates: the default config
    assert per_task.spec is None and per_task.config == LearnerConfig(strategy="per_task")


def test_entries_must_share_the_budget(tmp_path: Path):
    spec = tmp_path / "long.toml"
    spec.write_text('strategy = "seq"\n[train]\nepochs = 5\n')
    entries = resolve_entries(["per_task", str(spec)])
    with pytest.raises(ContinualPeftError, match="disagree on train.epochs.*--epochs"):
        compare(None, entries, tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--strategies", "per_task,bogus"], "unknown strategy 'bogus'; valid names: "),
        (["--sweep", "lora.rank=1,2"], "--sweep 'lora.rank' is not a setting"),
        (["--sweep", "lora.r=1,two"], "--sweep lora.r: 'two' is not an integer"),
        (["--sweep", "lora.r=0,1"], "--sweep lora.r=0: lora.r = 0 is invalid; it must be >= 1"),
        (["--sweep", "lora.r"], "--sweep 'lora.r': write KEY=V1,V2,..."),
        (["--sweep", "train.epochs=1,2"], "--sweep train.epochs and a command-line option"),
        (["--sweep", "prompt.num_virtual_tokens=2,4"], "so prompt.num_virtual_tokens would"),
        (["--sweep", "lora.targets=query,query+"], "'query+' has an empty name"),
        (["--sweep", "lora.targets=query+query"], "'query+query' has a name twice"),
        (["--sweep", "lora.targets=query+value,value+query"], "a value is listed twice"),
        (["--sweep", "module=lora,,ia3"], "a value is empty"),
        (["--sweep", "lora.r=4,"], "a value is empty"),
        (["--sweep", "module=lora,lora+bogus"], "unknown module kind 'bogus' in 'lora+bogus'"),
    ],
    ids=[
        "strategy",
        "key",
        "value",
        "range",
        "syntax",
        "conflict",
        "kind",
        "list",
        "list-twice",
        "list-order",
        "empty",
        "empty-end",
        "hybrid",
    ],
)
def test_bad_input_exits_2(spec: Path, tmp_path: Path, no_model, options, expected):
    out = tmp_path / "out"
    result = invoke("compare", "--stream", spec, "--out", out, *BUDGET, *options)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_sweep_over_lists_of_targets_sets_each_list():
    entries = resolve_entries(["per_task"], sweep="lora.targets=query,value,query+value,all-linear")
    assert [e.config.kind_config("lora").targets for e in entries] == [
        ["query"],
        ["value"],
        ["query", "value"],
        ["all-linear"],
    ]
    assert [e.sweep["value"] for e in entries] == ["query", "value", "query+value", "all-linear"]
    assert entries[2].label == "per_task-lora.targets-query_value"
    spaced = resolve_entries(["per_task"], sweep="lora.targets=query + value")
    assert spaced[0].config.kind_config("lora").targets == ["query", "value"]


def test_every_registered_strategy_is_a_valid_entry():
    for name in STRATEGIES.names():
        entry = entry_from(name)
        assert entry.config.strategy == name


def test_sweep_plot_follows_the_swept_values_not_the_ranking():
    from continual_peft.reports.leaderboard import in_sweep_order

    assert in_sweep_order(["16", "1", "4", "1"]) == ["1", "4", "16"]
    assert in_sweep_order(["lora", "adapter"]) == ["lora", "adapter"]  # not numbers: as given


def test_an_interrupted_comparison_resumes_to_the_uninterrupted_leaderboard(
    spec: Path, tmp_path: Path, tiny, monkeypatch
):
    from continual_peft.strategies import Strategy
    from continual_peft.strategies.seq import Sequential

    args = ["compare", "--stream", spec, "--strategies", "per_task,seq", *BUDGET]
    clean = tmp_path / "clean"
    assert invoke(*args, "--out", clean).exit_code == 0
    original = Strategy.loss

    def stop_in_seq(self, learner, task, loss):
        if isinstance(self, Sequential) and task.name == NAMES[1]:
            raise KeyboardInterrupt
        return original(self, learner, task, loss)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(Strategy, "loss", stop_in_seq)
        assert invoke(*args, "--out", out).exit_code == 130
    assert load_leaderboard(out)["status"] == "interrupted"
    kept = (out / "per_task" / "checkpoint.json").read_bytes()
    refused = invoke(*args, "--out", out)
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    other = invoke(
        "compare", "--stream", spec, "--strategies", "per_task", *BUDGET, "--resume", out
    )
    assert other.exit_code == 2 and "was started as another comparison" in other.stderr
    resumed = invoke(*args, "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert (out / "per_task" / "checkpoint.json").read_bytes() == kept  # not trained again
    board, reference = load_leaderboard(out), load_leaderboard(clean)
    assert board["status"] == "finished"
    for ours, theirs in zip(board["entries"], reference["entries"], strict=True):
        assert ours["label"] == theirs["label"] and ours["status"] == "finished"
        assert ours["runs"][0]["matrix"] == theirs["runs"][0]["matrix"]


# ---------------------------------------------------------------- choosing on dev, reporting test


def test_a_sweep_chooses_on_a_dev_split_carved_from_train_and_reports_test(
    spec: Path, tmp_path: Path, tiny, make_backbone
):
    from continual_peft.engine.loading import load_learner
    from continual_peft.tasks.streams import load_stream

    out = tmp_path / "sweep"
    sweep = ["--strategies", "per_task", "--sweep", "lora.r=1,4", "--lr", "0.01", *BUDGET]
    result = invoke("compare", "--stream", spec, *sweep, "--dev-share", "0.25", "--out", out)
    assert result.exit_code == 0, result.output
    board = load_leaderboard(out)
    assert board["ranked_by"] == "dev_acc"
    devs = [e["dev_acc"]["mean"] for e in board["entries"]]
    assert devs == sorted(devs, reverse=True)
    best = board["entries"][0]
    assert board["chosen"] == [
        {
            "base": "per_task",
            "label": best["label"],
            "key": "lora.r",
            "value": best["sweep"]["value"],
            "dev_acc": best["dev_acc"]["mean"],
            "acc": best["acc"]["mean"],
        }
    ]
    chosen = f"chosen on dev for per_task: lora.r = {best['sweep']['value']}"
    assert chosen in result.stdout and chosen in (out / "leaderboard.md").read_text()
    # the dev split: carved from train as the stream loads it again, disjoint from both splits;
    # the report's dev scores equal a plain recount of the learner's predictions on it
    stream = load_stream(spec, max_train=12, max_test=6, dev_share=0.25)
    for entry in board["entries"]:
        report = load_report(out / entry["label"])
        learner = load_learner(out / entry["label"], make_backbone())
        scores = []
        for task in stream.tasks:
            record = next(r for r in report["tasks"] if r["name"] == task.name)
            assert record["dev_examples"] == len(task.dev_inputs) == 6  # 0.25 x 8 per label
            assert record["train_examples"] == 12
            assert not set(task.dev_inputs) & (set(task.train_inputs) | set(task.test_inputs))
            predicted = learner.predict(task.dev_inputs, task.name)
            truth = [task.labels[y] for y in task.dev_labels]
            right = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
            assert report["dev"]["by_task"][task.name]["oracle_acc"] == pytest.approx(right)
            scores.append(right)
        assert entry["dev_acc"]["mean"] == pytest.approx(sum(scores) / len(scores))


def test_a_sweep_takes_a_default_dev_share_when_none_is_set(spec: Path, tmp_path: Path, tiny):
    out = tmp_path / "sweep"
    sweep = ["--strategies", "per_task", "--sweep", "lora.r=1,2", *BUDGET]
    result = invoke("compare", "--stream", spec, *sweep, "--out", out)
    assert result.exit_code == 0, result.output
    report = load_report(out / "per_task-lora.r-1")
    assert all(r["dev_examples"] == 3 for r in report["tasks"])  # 0.1 x 8 per label -> 1 each
    assert "0.1 of each label" in report["tasks"][0]["sources"]["dev"]


def test_a_sweep_without_dev_data_is_refused_before_training(spec: Path, tmp_path: Path):
    from continual_peft.tasks.streams import load_stream

    entries = resolve_entries(["per_task"], sweep="lora.r=1,2")
    with pytest.raises(
        ContinualPeftError, match=r"chooses its setting on the dev split.*--dev-share"
    ):
        compare(load_stream(spec), entries, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_selection_follows_dev_even_where_test_disagrees():
    from continual_peft.experiments.compare import leaderboard

    def result(value: int, dev: float, test: float) -> dict:
        run = {"order": "default", "seed": 0, "acc": test, "dev_acc": dev}
        return {
            "label": f"per_task-lora.r-{value}",
            "strategy": "per_task",
            "module": "lora",
            "sweep": {"key": "lora.r", "value": value},
            "base": "per_task",
            "status": "finished",
            "runs": [{**run, "seen_acc": [test], "matrix": [[test]], "tasks": ["a"]}],
        }

    board = leaderboard({"sweep": {"key": "lora.r"}}, [result(1, 0.9, 0.5), result(2, 0.6, 0.8)])
    assert [e["sweep"]["value"] for e in board["entries"]] == [1, 2]  # ranked by dev
    assert board["chosen"][0]["value"] == 1 and board["chosen"][0]["acc"] == 0.5
    test_only = result(1, 0.9, 0.5)
    test_only["runs"][0]["dev_acc"] = None  # no dev split: ranked by ACC, nothing chosen
    plain = leaderboard({}, [test_only])
    assert plain["ranked_by"] == "acc" and plain["chosen"] == []


def test_a_sweep_of_module_shows_the_kind_once():
    from continual_peft.reports.leaderboard import _header

    assert _header({"sweep": {"key": "module"}, "entries": []}).count("module") == 1
    assert "lora.r" in _header({"sweep": {"key": "lora.r"}, "entries": []})
