"""The engine end to end on a tiny backbone: isolation, the routed forward, determinism, reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, assert_close, word_task
from safetensors.torch import load_file

from continual_peft import (
    STRATEGIES,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    TrainConfig,
)
from continual_peft.metrics import compute_metrics


@pytest.fixture
def learned(make_backbone, tasks):
    learner = ContinualLearner(make_backbone(), train=FAST_TRAIN)
    for task in tasks:
        learner.learn(task)
    return learner


def _snapshot(learner, slot, task):
    head = {k: v.clone() for k, v in learner.heads.heads[task].state_dict().items()}
    return {k: v.clone() for k, v in learner.bank.slot_state(slot).items()}, head


def test_earlier_slots_and_heads_are_bit_identical_after_new_tasks(make_backbone, tasks):
    learner = ContinualLearner(make_backbone(), train=FAST_TRAIN)
    learner.learn(tasks[0])
    before = _snapshot(learner, 0, tasks[0].name)
    for task in tasks[1:]:
        learner.learn(task)
    after = _snapshot(learner, 0, tasks[0].name)
    for saved, now in zip(before, after, strict=True):
        assert saved.keys() == now.keys()
        assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert learner.bank.num_slots == 3 and not learner.bank.has_trainable


def test_training_changed_the_slot_and_learned_every_task(learned):
    state = learned.bank.slot_state(0)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in state.items())
    final = learned.report["accuracy_matrix"]["oracle"][-1]
    assert all(acc > 0.6 for acc in final), final  # chance is 1/3


def test_mixed_batch_equals_each_row_alone(learned):
    texts = ["red apple car", "dog sleeps", "sad at home now", "blue cup", "fish hides eats"]
    tasks = ["colors", "animals", "moods", "colors", "animals"]
    mixed = learned.logits(texts, tasks)
    for i, (text, task) in enumerate(zip(texts, tasks, strict=True)):
        alone = learned.logits([text], [task])
        assert_close(mixed[i : i + 1], alone)
    assert learned.predict(texts, tasks) == learned.predict(texts[:1], "colors") + [
        learned.predict([t], k)[0] for t, k in zip(texts[1:], tasks[1:], strict=True)
    ]


def test_per_task_has_zero_oracle_forgetting(learned):
    metrics = learned.report["metrics"]["oracle"]
    assert metrics["forgetting"] == 0.0 and metrics["bwt"] == 0.0


def test_same_seed_same_numbers(make_backbone, tasks):
    runs = []
    for _ in range(2):
        learner = ContinualLearner(make_backbone(), train=FAST_TRAIN, seed=3)
        for task in tasks[:2]:
            learner.learn(task)
        runs.append(learner)
    a, b = (r.report for r in runs)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [t["final_train_loss"] for t in a["tasks"]] == [
        t["final_train_loss"] for t in b["tasks"]
    ]
    for k, v in runs[0].bank.slot_state(1).items():
        assert torch.equal(v, runs[1].bank.slot_state(1)[k])


def test_initial_accuracy_is_measured_on_the_bare_backbone(make_backbone, tasks):
    # b[j] depends only on the backbone and task j's head init, not on what was trained before.
    after_training = ContinualLearner(make_backbone(), strategy="seq", train=FAST_TRAIN)
    for task in tasks[:2]:
        after_training.learn(task)
    first = ContinualLearner(make_backbone(), strategy="seq", train=FAST_TRAIN)
    first.learn(tasks[1])
    assert after_training.monitor.initial[1] == first.monitor.initial[0]
    # ...while R[0, 1] is measured through the shared slot as trained on task 0.
    assert after_training.monitor.before["oracle"][1] != after_training.monitor.initial[1]


def test_seq_shares_one_slot(make_backbone, tasks):
    learner = ContinualLearner(make_backbone(), strategy="seq", train=FAST_TRAIN)
    for task in tasks:
        learner.learn(task)
    assert [t["slot"] for t in learner.report["tasks"]] == [0, 0, 0]
    assert learner.bank.num_slots == 1


def test_report_metrics_recompute_from_the_saved_matrix(make_backbone, tasks, tmp_path):
    learner = ContinualLearner(make_backbone(), train=FAST_TRAIN, run_dir=tmp_path / "run")
    for task in tasks:
        learner.learn(task)
    learner.finish()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    matrix = np.array(report["accuracy_matrix"]["oracle"], dtype=float)
    assert report["metrics"]["oracle"] == compute_metrics(matrix, report["initial_accuracy"])
    assert report["status"] == "finished" and report["schema_version"] == 1
    # R[j-1, j] (before training j, fresh slot and head) equals b[j] for per-task slots.
    assert [matrix[j - 1, j] for j in (1, 2)] == report["initial_accuracy"][1:]
    saved = load_file(tmp_path / "run" / "tasks" / "colors" / "module.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in learner.bank.slot_state(0).items())


def test_duplicate_task_and_unknown_task_are_refused(learned):
    with pytest.raises(ContinualPeftError, match="already learned"):
        learned.learn(word_task("colors"))
    with pytest.raises(ContinualPeftError, match="unknown task 'nope'; learned tasks"):
        learned.predict(["x"], task="nope")


def test_unknown_strategy_lists_valid_names(make_backbone):
    names = ", ".join(STRATEGIES.names())
    with pytest.raises(ContinualPeftError, match=f"unknown strategy 'bogus'; valid names: {names}"):
        ContinualLearner(make_backbone(), strategy="bogus")


def test_kinds_mixed_in_one_run_and_one_batch(make_backbone, tasks):
    config = LearnerConfig(train=FAST_TRAIN, task_modules={"animals": "adapter", "moods": "prompt"})
    learner = ContinualLearner(make_backbone(), config=config)
    for task in tasks:
        learner.learn(task)
    assert [t["module"] for t in learner.report["tasks"]] == ["lora", "adapter", "prompt"]
    texts = ["red apple car", "dog sleeps", "sad at home now", "fish hides eats"]
    names = ["colors", "animals", "moods", "animals"]
    mixed = learner.logits(texts, names)
    for i, (text, name) in enumerate(zip(texts, names, strict=True)):
        assert_close(mixed[i : i + 1], learner.logits([text], [name]))


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_a_failed_task_rolls_back_completely(strategy, make_backbone, monkeypatch):
    """A task that fails (here: its loss diverges on the 2nd step) leaves the learner exactly
    as before it: learning it again, then another task, ends as if it had never failed."""
    from continual_peft.strategies import load_strategy_spec

    tasks = [word_task("colors", n_train=24, n_test=12), word_task("animals", 24, 12)]
    specs = sorted(Path(__file__).parents[1].glob(f"strategies/{strategy}*.toml"))
    config = load_strategy_spec(specs[0]) if specs else LearnerConfig(strategy=strategy)
    config.train = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0)

    def fresh() -> ContinualLearner:
        learner = ContinualLearner(make_backbone(), config=copy.deepcopy(config))
        learner.learn(tasks[0])
        return learner

    clean, failing = fresh(), fresh()
    clean.learn(tasks[1])
    original = failing.strategy.loss
    calls = [0]

    def diverge(learner, task, loss):
        calls[0] += 1
        return loss * float("nan") if calls[0] == 2 else original(learner, task, loss)

    slots = failing.bank.num_slots
    monkeypatch.setattr(failing.strategy, "loss", diverge)
    with pytest.raises(ContinualPeftError, match="learn the task again"):
        failing.learn(tasks[1])
    monkeypatch.undo()
    assert list(failing.learned) == ["colors"] and list(failing.heads.heads) == ["colors"]
    assert failing.bank.num_slots == slots and len(failing.records) == 1
    failing.learn(tasks[1])  # the retry: same seeds, same data, so the same numbers
    assert failing.report["accuracy_matrix"] == clean.report["accuracy_matrix"]
    texts = tasks[1].test_inputs
    assert failing.predict(texts, task="animals") == clean.predict(texts, task="animals")
