"""Re-evaluation after each task: every task's rows in one mixed pass equal the per-task
evaluation (oracle, routed, routing, rejection, route-or-merge's fallback; an encoder and a
generative backbone); the `[evaluation]` schedule (old tasks after every k-th task, on a fixed
sample) leaves NaN entries and says so in records and reports; metrics over such matrices
equal a plain numpy recomputation; bad settings are refused by name."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from helpers import tiny_lm, word_task
from typer.testing import CliRunner

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig
from continual_peft.cli import app
from continual_peft.config import EvaluationConfig, TrainConfig
from continual_peft.engine import prediction
from continual_peft.engine.loading import saved_config
from continual_peft.engine.prediction import FALLBACK_MODE, task_scores
from continual_peft.engine.schedule import fixed_sample
from continual_peft.experiments.runner import run_stream
from continual_peft.metrics import compute_metrics
from continual_peft.reports.run import render_markdown
from continual_peft.store.digests import config_sha256
from continual_peft.tasks.streams import Stream, load_stream
from continual_peft.tasks.task import Task
from continual_peft.tasks.toy import TOY_WORDS, toy_generative_stream

NAN = float("nan")
ONE_EPOCH = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
STRONGER = TrainConfig(epochs=2, batch_size=8, lr=3e-2, warmup=0.0)  # accuracies below 1


def renamed(task: Task, name: str) -> Task:
    """`task`'s examples under another name (word_task has three vocabularies)."""

    def pairs(inputs, labels):
        return [(x, task.labels[y]) for x, y in zip(inputs, labels, strict=True)]

    return Task.from_examples(
        name,
        train=pairs(task.train_inputs, task.train_labels),
        test=pairs(task.test_inputs, task.test_labels),
        labels=task.labels,
    )


def word_tasks(count: int, n_test: int = 10) -> list[Task]:
    bases = ("colors", "animals", "moods")
    return [
        renamed(word_task(bases[i % 3], n_train=24, n_test=n_test, seed=i), f"{bases[i % 3]}{i}")
        for i in range(count)
    ]


def learn_and_recompute(learner: ContinualLearner, tasks: list[Task]) -> list[dict]:
    """Learn `tasks`; after each, the new matrix rows and the same numbers recomputed task by
    task through the per-task paths (`Predictor.accuracy`, `Predictor.routed_scores`), with the
    answers each scored (`mixed`: those of the learner's own evaluation; `alone`: task by task;
    both score oracle answers task by task, then routed ones, in the same order)."""
    found = []
    predictor = learner.predictor
    answers: list[tuple[str, list]] = []

    def scored(metric, given, task, rows=None):
        answers.append((task.name, list(given)))
        return task_scores(metric, given, task, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prediction, "task_scores", scored)
        for task in tasks:
            answers.clear()
            learner.learn(task)
            mixed = answers[2:]  # after begin_task's two per-task "before" accuracies
            answers.clear()
            states = list(learner.learned.values())
            oracle = [predictor.accuracy(s) for s in states]
            scores = [predictor.routed_scores(learner.router, s) for s in states]
            found.append(
                {
                    "rows": {m: learner.monitor.rows[m][-1] for m in learner.monitor.modes},
                    "routing": learner.monitor.routing_rows[-1],
                    "rejected": learner.monitor.rejected_rows[-1],
                    "accepted": learner.monitor.accepted_rows[-1],
                    "oracle": oracle,
                    "routed": [r.metric for r in scores],
                    "routing_alone": [r.routing for r in scores],
                    "rejected_alone": [r.rejected for r in scores],
                    "accepted_alone": [r.accepted for r in scores],
                    FALLBACK_MODE: [r.fallback for r in scores],
                    "mixed": mixed,
                    "alone": list(answers),
                }
            )
    return found


def assert_same_as_alone(found: list[dict]) -> None:
    for after in found:
        assert after["mixed"] == after["alone"]  # every answer, not only the scores
        for mode, row in after["rows"].items():
            np.testing.assert_array_equal(row, after[mode], err_msg=mode)
        for key in ("routing", "rejected", "accepted"):
            np.testing.assert_array_equal(after[key], after[f"{key}_alone"], err_msg=key)


@pytest.fixture(scope="module")
def route_or_merge_run(tokenizer):
    """Route-or-merge under mahalanobis with rejection, four word tasks, one epoch each."""
    from helpers import tiny_backbone

    config = LearnerConfig(
        strategy="route_or_merge",
        strategy_options={"margin": 0.5},
        router="mahalanobis",
        router_options={"reject_rate": 0.2, "layers": "last"},
        train=STRONGER,
    )
    learner = ContinualLearner(tiny_backbone(tokenizer), config=config)
    return learner, learn_and_recompute(learner, word_tasks(4))


def test_mixed_evaluation_equals_per_task_evaluation(route_or_merge_run):
    learner, found = route_or_merge_run
    assert set(learner.monitor.modes) == {"oracle", "routed", FALLBACK_MODE}
    assert_same_as_alone(found)
    last = found[-1]
    # the case is not trivial: some rows rejected, some wrong, the fallback changed something
    assert max(last["rejected"]) > 0
    assert min(last["oracle"]) < 1
    assert last[FALLBACK_MODE] != last["routed"]


def test_one_pass_over_every_task(route_or_merge_run, monkeypatch):
    """`evaluate` routes once and runs one oracle and one routed pass over all rows."""
    learner, _ = route_or_merge_run
    predictor, router = learner.predictor, learner.router
    calls = {"route": 0, "accuracy": 0, "routed_scores": 0}
    real_route = router.route

    def route(features):
        calls["route"] += 1
        return real_route(features)

    monkeypatch.setattr(router, "route", route)
    for name in ("accuracy", "routed_scores"):
        monkeypatch.setattr(predictor, name, lambda *a, _n=name, **k: calls.__setitem__(_n, 1))
    ours, rows = predictor.routed_accuracy(router)
    assert calls == {"route": 1, "accuracy": 0, "routed_scores": 0}
    np.testing.assert_array_equal(ours, learner.monitor.rows["routed"][-1])
    total = sum(len(s.test_items) for s in learner.learned.values())
    assert predictor.evaluation_rows(None, []) == total


def test_generative_backbone_mixed_equals_per_task():
    backbone = tiny_lm("llama", name="tiny-llama", words=TOY_WORDS)
    config = LearnerConfig.from_dict(
        {
            "router": "prototype",
            "train": {"epochs": 3, "batch_size": 8, "lr": 5e-3, "warmup": 0.0},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "generation": {"max_new_tokens": 3},
        }
    )
    learner = ContinualLearner(backbone, config=config)
    stream = toy_generative_stream(train_per_task=12, test_per_task=6)
    found = learn_and_recompute(learner, stream.tasks)
    assert_same_as_alone(found)
    texts = {text for _, given in found[-1]["mixed"] for text in given}
    assert len(texts) > 2, "the tasks' slots write different answers"


# ---------------------------------------------------------------- the schedule


class Spy:
    """Records the rows each `Predictor.evaluate` call was given."""

    def __init__(self, learner: ContinualLearner) -> None:
        self.rows: list[dict] = []
        real = learner.predictor.evaluate

        def evaluate(router, router_items, rows=None):
            self.rows.append(rows)
            return real(router, router_items, rows)

        learner.predictor.evaluate = evaluate


def scheduled(tokenizer, evaluation: EvaluationConfig, seed: int = 0) -> ContinualLearner:
    from helpers import tiny_backbone

    config = LearnerConfig(router="prototype", train=ONE_EPOCH, evaluation=evaluation, seed=seed)
    return ContinualLearner(tiny_backbone(tokenizer), config=config)


@pytest.fixture(scope="module")
def every_second(tokenizer):
    """Four tasks of a planned stream, old tasks after every 2nd task on 4 of their 10 rows."""
    tasks = word_tasks(4)
    learner = scheduled(tokenizer, EvaluationConfig(every=2, sample=4))
    learner.resume_into(None, {"name": "words", "tasks": [t.name for t in tasks]})
    spy = Spy(learner)
    for task in tasks:
        learner.learn(task)
    return learner, spy, tasks


def test_old_tasks_are_measured_after_every_kth_task_only(every_second):
    learner, _, _ = every_second
    nan_after_third = [[0, 1], [0, 1, 2]]  # columns not measured after task 3 (row 2)
    for mode in learner.monitor.modes:
        R = learner.monitor.matrix(mode)
        assert np.isnan(R[2, nan_after_third[0]]).all(), mode
        assert np.isfinite(np.diag(R)).all() and np.isfinite(R[1, :2]).all()
        assert np.isfinite(R[3]).all(), "the planned stream's last task: a full row"
    for matrix in (learner.monitor.routing_matrix(), learner.monitor.rejected_matrix()):
        assert np.isnan(matrix[2, :2]).all() and np.isfinite(matrix[3]).all()
    records = [r["reevaluation"] for r in learner.records]
    assert records == [
        {"tasks": 1, "rows": 10, "sampled": False},
        {"tasks": 2, "rows": 4 + 10, "sampled": True},
        {"tasks": 1, "rows": 10, "sampled": False},
        {"tasks": 4, "rows": 40, "sampled": False},
    ]


def test_sampled_entry_is_the_metric_on_the_fixed_sample(every_second):
    learner, spy, tasks = every_second
    first = tasks[0]
    seed = zlib.crc32(f"{learner.config.seed}/{first.name}/reevaluation".encode())
    rows = fixed_sample(len(first.test_inputs), 4, seed)
    assert spy.rows[1] == {first.name: rows, tasks[1].name: None}
    # per_task leaves the first task's slot alone: its predictions now are those of then
    answers = learner.predict([first.test_inputs[i] for i in rows], task=first.name)
    truth = [first.labels[first.test_labels[i]] for i in rows]
    expected = np.mean([a == b for a, b in zip(answers, truth, strict=True)])
    assert learner.monitor.matrix()[1, 0] == pytest.approx(expected)
    # the diagonal is measured on all rows
    diagonal = [learner.predictor.accuracy(s) for s in learner.learned.values()]
    np.testing.assert_array_equal(np.diag(learner.monitor.matrix()), diagonal)


def test_sample_is_the_same_rows_every_time_and_the_newest_task_full(tokenizer):
    tasks = word_tasks(3, n_test=30)
    learner = scheduled(tokenizer, EvaluationConfig(sample=5))  # no stream plan: no last row
    spy = Spy(learner)
    for task in tasks:
        learner.learn(task)
    first, second, third = (t.name for t in tasks)
    assert spy.rows[0] == {first: None}
    assert spy.rows[1][first] == spy.rows[2][first] and len(spy.rows[2][first]) == 5
    assert spy.rows[1][second] is None and spy.rows[2][third] is None
    assert len(spy.rows[2][second]) == 5
    assert [r["reevaluation"]["sampled"] for r in learner.records] == [False, True, True]
    other = scheduled(tokenizer, EvaluationConfig(sample=5), seed=1)
    seeds = [other.task_seed(tasks[0], "reevaluation"), learner.task_seed(tasks[0], "reevaluation")]
    assert fixed_sample(30, 5, seeds[0]) != fixed_sample(30, 5, seeds[1])  # the run's seed counts


def test_a_stream_runs_last_task_gets_a_full_row_and_exact_metrics(tokenizer):
    from helpers import tiny_backbone

    tasks = word_tasks(3)
    config = LearnerConfig(train=ONE_EPOCH, evaluation=EvaluationConfig(every=5, sample=3))
    learner = run_stream(
        Stream(name="words", tasks=tasks), config, make_backbone=lambda: tiny_backbone(tokenizer)
    )
    R = learner.monitor.matrix()
    assert np.isnan(R[1, 0]) and np.isfinite(R[2]).all()
    report = learner.report
    metrics = report["metrics"]["oracle"]
    assert metrics["acc"] == pytest.approx(R[2].mean())
    assert metrics["bwt"] == pytest.approx(np.mean(R[2, :2] - np.diag(R)[:2]))
    assert "after every 5th task only" in report["reevaluation"]
    assert "fixed sample of at most 3 test rows" in report["reevaluation"]
    assert f"- re-evaluation: {report['reevaluation']}" in render_markdown(report)


def test_default_schedule_measures_everything_and_reports_nothing_new(route_or_merge_run):
    learner, _ = route_or_merge_run
    report = learner.report
    assert "reevaluation" not in report and "re-evaluation" not in render_markdown(report)
    assert all(not r["reevaluation"]["sampled"] for r in learner.records)
    assert [r["reevaluation"]["tasks"] for r in learner.records] == [1, 2, 3, 4]


# ---------------------------------------------------------------- metrics with NaN


def numpy_metrics(R: np.ndarray) -> dict:
    """The metrics written directly in numpy: unmeasured (NaN) entries skipped where a metric
    allows, None where it needs one."""
    T, last = len(R), R[-1]
    full_rows = [R[i, : i + 1].mean() for i in range(T) if np.isfinite(R[i, : i + 1]).all()]
    complete = np.isfinite(last).all()
    diag = np.diag(R)
    return {
        "acc": last.mean() if complete else None,
        "avg_incremental_acc": np.mean(full_rows),
        "bwt": (last[:-1] - diag[:-1]).mean() if complete else None,
        "forgetting": (
            np.mean([np.nanmax(R[j : T - 1, j]) - last[j] for j in range(T - 1)])
            if complete
            else None
        ),
        "avalanche_forgetting": [
            None if np.isnan(last[j]) else diag[j] - last[j] for j in range(T - 1)
        ]
        + [None],
    }


# after every 2nd task; R[j-1, j] measured before each task's training
SCHEDULED = np.array(
    [
        [0.90, 0.40, NAN, NAN, NAN],
        [0.80, 0.85, 0.30, NAN, NAN],
        [NAN, NAN, 0.95, 0.20, NAN],
        [0.95, 0.70, 0.60, 0.90, 0.35],
        [0.60, 0.75, 0.90, 0.80, 0.88],
    ]
)


@pytest.mark.parametrize("rows", [5, 4, 3])
def test_metrics_over_unmeasured_entries_match_numpy(rows):
    R = SCHEDULED[:rows, :rows]
    b = np.full(rows, 0.1)
    got, expected = compute_metrics(R, b), numpy_metrics(R)
    for key in ("acc", "avg_incremental_acc", "bwt", "forgetting"):
        if expected[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(expected[key]), key
    assert got["avalanche_forgetting"] == pytest.approx(expected["avalanche_forgetting"])
    assert got["fwt"] == pytest.approx(np.mean(np.diag(R, 1) - b[1:]))


def test_forgetting_peak_skips_unmeasured_rows():
    # task 0's peak is 0.95 (row 3), measured after a row that skipped it
    assert compute_metrics(SCHEDULED, None)["forgetting"] == pytest.approx(
        np.mean([0.95 - 0.60, 0.85 - 0.75, 0.95 - 0.90, 0.90 - 0.80])
    )
    assert compute_metrics(SCHEDULED[:3, :3], None)["acc"] is None  # row 2 not complete


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"every": 0}, r"evaluation\.every = 0 is invalid; it must be an integer from 1 to"),
        ({"sample": -1}, r"evaluation\.sample = -1 is invalid; it must be an integer from 0 to"),
        ({"every": True}, r"\[evaluation\]: key 'every' must be int, got True"),
        ({"sample": 2.5}, r"\[evaluation\]: key 'sample' must be int"),
        ({"rows": 5}, r"\[evaluation\]: unknown key\(s\) \['rows'\]; valid keys"),
    ],
)
def test_bad_evaluation_settings_are_refused_naming_the_key(section, message):
    with pytest.raises(ContinualPeftError, match=message):
        LearnerConfig.from_dict({"evaluation": section}, "spec.toml")


def test_a_bool_built_in_python_is_refused_too():
    with pytest.raises(ContinualPeftError, match=r"evaluation\.sample = False is invalid"):
        LearnerConfig(evaluation=EvaluationConfig(sample=False)).validate()


def test_default_schedule_leaves_config_dicts_and_hashes_unchanged(tmp_path):
    default = LearnerConfig().to_dict()
    assert "evaluation" not in default
    explicit = LearnerConfig.from_dict({"evaluation": {"every": 1, "sample": 0}})
    assert config_sha256(explicit.to_dict()) == config_sha256(default)
    spec = tmp_path / "spec.toml"
    spec.write_text('strategy = "per_task"\n[evaluation]\nevery = 5\nsample = 200\n')
    from continual_peft import load_strategy_spec

    config = load_strategy_spec(spec)
    assert config.evaluation == EvaluationConfig(every=5, sample=200)
    assert config.to_dict()["evaluation"] == {"every": 5, "sample": 200}
    assert LearnerConfig.from_dict(config.to_dict()) == config


def test_resuming_with_another_schedule_is_refused(finished_run, run_copy):
    """The schedule is part of the run's configuration: a resume keeps the run's own."""
    config = saved_config(run_copy)
    config.evaluation = EvaluationConfig(every=2)
    with pytest.raises(ContinualPeftError, match=r"evaluation\.every: 1 in the run, 2 here") as err:
        run_stream(load_stream(finished_run.spec), config, run_dir=run_copy, resume=True)
    assert "evaluation.sample" not in str(err.value)  # the same on both sides: not named


@pytest.mark.parametrize("key", ["every", "sample"])
def test_a_count_beyond_a_million_is_refused(key):
    from continual_peft.strategies import check_config

    config = LearnerConfig(evaluation=EvaluationConfig(**{key: 10**21}))
    with pytest.raises(ContinualPeftError, match=f"evaluation.{key} = 10+ is invalid.*1,000,000"):
        check_config(config)


def test_run_options_set_the_schedule():
    def invoke(*args: str):
        return CliRunner().invoke(app, ["run", *args, "--baseline", "none"])

    result = invoke("--eval-every", "0")
    assert result.exit_code != 0
    assert "evaluation.every = 0 is invalid" in result.output
    result = invoke("--eval-sample", "-3")
    assert "evaluation.sample = -3 is invalid" in result.output


def test_sampled_rows_are_left_out_of_the_metrics():
    """A sampled estimate above the full-set value must not read as forgetting."""
    from continual_peft.engine.monitor import ForgettingMonitor

    monitor = ForgettingMonitor(("oracle",))
    for j, row in enumerate([[0.75], [1.0, 0.5], [0.75, 0.5, 0.9]]):  # row 2 sampled: 1.0
        monitor.before_task(0.3, {"oracle": 0.3 if j else float("nan")})
        monitor.after_task({"oracle": row})
    assert monitor.metrics("oracle")["forgetting"] > 0  # the estimate taken at face value
    honest = monitor.metrics("oracle", estimated=[1])
    assert honest["forgetting"] == pytest.approx(0.0)
    assert honest["acc"] == pytest.approx(np.mean([0.75, 0.5, 0.9]))
