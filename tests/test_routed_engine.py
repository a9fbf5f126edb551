"""The engine with a task-agnostic router: routed R beside oracle R, routing accuracy, predict.
That the routed matrix recomputes from `predict` and that a saved run reloads to the same routed
predictions, for every router: test_cases.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import FAST_TRAIN, load_tokenizer, tiny_backbone, word_task

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig


def _learn(make_backbone, tasks, router: str, **options) -> ContinualLearner:
    config = LearnerConfig(train=FAST_TRAIN, router=router, router_options=options)
    learner = ContinualLearner(make_backbone(), config=config)
    for task in tasks:
        learner.learn(task)
    return learner


@pytest.fixture(scope="module")
def routed():
    """per_task LoRA with the mahalanobis router over the three word tasks (tests only read it)."""
    tasks = [word_task(name) for name in ("colors", "animals", "moods")]
    return _learn(lambda: tiny_backbone(load_tokenizer()), tasks, "mahalanobis")


def test_report_has_routed_and_oracle_side_by_side(routed, tasks):
    report = routed.report
    assert set(report["accuracy_matrix"]) == {"oracle", "routed"}
    routing = np.array(report["routing_accuracy"], dtype=float)
    assert routing.shape == (3, 3) and np.isnan(routing[0, 1]) and not np.isnan(routing[2, 0])
    oracle, routed_acc = report["metrics"]["oracle"]["acc"], report["metrics"]["routed"]["acc"]
    assert report["routed_over_oracle"] == pytest.approx(routed_acc / oracle)
    assert "routing" in report["metric_definitions"]
    assert report["metrics"]["routed"]["fwt"] is None  # no routed value before a task is known


def test_perfectly_routed_task_matches_oracle(routed):
    report = routed.report
    for j, share in enumerate(report["routing_accuracy"][-1]):
        if share == 1.0:
            assert (
                report["accuracy_matrix"]["routed"][-1][j]
                == report["accuracy_matrix"]["oracle"][-1][j]
            )
    assert max(report["routing_accuracy"][-1]) == 1.0  # the toy tasks use disjoint words


def test_predict_details(routed):
    rows = routed.predict_details(["red apple car", "dog sleeps"])
    assert [r["task"] for r in rows] == ["colors", "animals"]
    assert all(r["label"] in ("red", "blue", "green", "cat", "dog", "fish") for r in rows)
    assert all(abs(sum(t["weight"] for t in r["topk"]) - 1) < 1e-6 for r in rows)


def test_rejected_rows_are_unknown(make_backbone, tasks):
    learner = _learn(
        make_backbone, tasks[:2], "mahalanobis", reject_rate=0.1, calibration_share=0.25
    )
    far = "zebra quantum xylophone " * 5
    assert learner.predict([far]) == [None]
    row = learner.predict_details([far])[0]
    assert row["rejected"] is True and row["task"] is None and row["label"] is None
    assert learner.predict_details([far])[0]["topk"] == []


def test_oracle_learner_needs_a_task(make_backbone, tasks):
    learner = _learn(make_backbone, tasks[:1], "oracle")
    with pytest.raises(ContinualPeftError, match="pass task="):
        learner.predict(["red apple"])
    assert "routed" not in learner.report["accuracy_matrix"]


def test_unknown_router_and_bad_options(make_backbone):
    with pytest.raises(ContinualPeftError, match="unknown router 'psychic'"):
        ContinualLearner(make_backbone(), config=LearnerConfig(router="psychic"))
    with pytest.raises(ContinualPeftError, match=r"invalid options \['bogus'\]"):
        ContinualLearner(
            make_backbone(), config=LearnerConfig(router="prototype", router_options={"bogus": 1})
        )


def test_cli_predict_writes_jsonl(finished_run, tmp_path):
    from typer.testing import CliRunner

    from continual_peft import cli

    run = str(finished_run.run)  # two tasks, a prototype router
    (tmp_path / "in.jsonl").write_text('{"text": "red apple car"}\n{"text": "dog sleeps"}\n')
    result = CliRunner().invoke(
        cli.app, ["predict", "--run", run, "--input", str(tmp_path / "in.jsonl")]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["task"] for r in rows] == ["colors", "animals"]
    assert set(rows[0]) == {"task", "label", "rejected", "score", "topk", "routing"}
    assert rows[0]["rejected"] is False
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    bad = CliRunner().invoke(
        cli.app, ["predict", "--run", run, "--input", str(tmp_path / "bad.jsonl")]
    )
    assert bad.exit_code == 2 and "bad.jsonl:2" in bad.output


def test_router_can_fit_on_more_inputs_than_the_slot(make_backbone, tmp_path):
    from continual_peft.tasks.streams import load_stream

    for name, words in (("colors", ["red", "blue"]), ("animals", ["cat", "dog"])):
        folder = tmp_path / name
        folder.mkdir()
        lines = [f'{{"text": "{w} thing {i}", "label": "{w}"}}' for i in range(40) for w in words]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "test.jsonl").write_text("\n".join(lines[:10]) + "\n")
    entries = "".join(
        f'[[tasks]]\nname = "{n}"\ntrain = "{n}/train.jsonl"\ntest = "{n}/test.jsonl"\n'
        f"labels = {json.dumps(w)}\n"
        for n, w in (("colors", ["red", "blue"]), ("animals", ["cat", "dog"]))
    )
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "s"\nmax_train = 8\nrouter_max_train = 50\n{entries}')
    stream = load_stream(spec)
    assert [len(t.train_inputs) for t in stream.tasks] == [8, 8]
    assert [len(t.router_inputs) for t in stream.tasks] == [50, 50]
    config = LearnerConfig(train=FAST_TRAIN, router="mahalanobis")
    learner = ContinualLearner(make_backbone(), config=config)
    for task in stream.tasks:
        learner.learn(task)
    assert learner.router.state()[0]["counts"].tolist() == [50, 50]
    with pytest.raises(ContinualPeftError, match="router_max_train = 0 is invalid"):
        load_stream(spec, router_max_train=0)


def test_report_says_what_rejection_did(make_backbone, tasks):
    """The report's rejected share and accepted-rows accuracy recompute from `predict`."""
    from continual_peft.reports.run import console_report, render_markdown

    learner = _learn(
        make_backbone, tasks[:2], "mahalanobis", reject_rate=0.1, calibration_share=0.25
    )
    report = learner.report
    rejected, accepted = report["rejected_share"], report["accepted_acc"]
    assert len(rejected) == 2 and rejected[0][1] is None
    for j, task in enumerate(tasks[:2]):
        rows = learner.predict_details(task.test_inputs)
        truth = [task.labels[y] for y in task.test_labels]
        kept = [r["label"] == t for r, t in zip(rows, truth, strict=True) if not r["rejected"]]
        assert rejected[-1][j] == pytest.approx(np.mean([r["rejected"] for r in rows]))
        assert accepted[-1][j] == (pytest.approx(np.mean(kept)) if kept else None)
    block = report["rejection"]
    assert block["reject_rate"] == 0.1 and block["calibration_examples"] == [15, 15]
    assert block["false_reject"] == pytest.approx(np.mean(rejected[-1]))
    assert block["routed_acc"] == report["metrics"]["routed"]["acc"]
    assert block["by_task"]["rejected"] == rejected[-1]
    markdown = render_markdown(report)
    assert "## Routing and rejection after the last task (%)" in markdown
    assert "reject_rate 0.1 (knn)" in markdown and "Rejected (%)" in markdown
    assert "rejection" in report["metric_definitions"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(console_report(report))
    assert "routed ACC, accepted rows" in console.export_text()


def test_report_without_rejection_has_no_rejection_table(routed):
    from continual_peft.reports.run import render_markdown

    report = routed.report
    assert report["rejection"]["reject_rate"] == 0.0
    assert report["rejected_share"][-1] == [0.0, 0.0, 0.0]
    assert "Routing and rejection" not in render_markdown(report)
