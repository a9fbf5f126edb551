"""The engine end to end on a tiny backbone: isolation, the routed forward, what it learns,
reports. What every strategy, kind and router share (a failed task rolls back, the same seed
gives the same numbers, a mixed batch equals each row alone, ...) is in test_cases.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST_TRAIN, assert_close, load_tokenizer, tiny_backbone, word_task
from safetensors.torch import load_file

from continual_peft import STRATEGIES, ContinualLearner, ContinualPeftError
from continual_peft.metrics import compute_metrics


def _snapshot(learner, slot, task):
    head = {k: v.clone() for k, v in learner.heads.heads[task].state_dict().items()}
    return {k: v.clone() for k, v in learner.bank.slot_state(slot).items()}, head


@dataclass
class Learned:
    learner: ContinualLearner  # per_task over the three word tasks, finished into `run_dir`
    run_dir: Path
    first: tuple[dict, dict]  # slot 0 and the first head, right after the first task


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Learned:
    run_dir = tmp_path_factory.mktemp("learned") / "run"
    tasks = [word_task(name) for name in ("colors", "animals", "moods")]
    learner = ContinualLearner(tiny_backbone(load_tokenizer()), train=FAST_TRAIN, run_dir=run_dir)
    learner.learn(tasks[0])
    first = _snapshot(learner, 0, tasks[0].name)
    for task in tasks[1:]:
        learner.learn(task)
    learner.finish()
    return Learned(learner, run_dir, first)


@pytest.fixture
def learned(learned_run) -> ContinualLearner:
    return learned_run.learner


def test_earlier_slots_and_heads_are_bit_identical_after_new_tasks(learned_run, tasks):
    learner, before = learned_run.learner, learned_run.first
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


def test_report_metrics_recompute_from_the_saved_matrix(learned_run):
    learner, run_dir = learned_run.learner, learned_run.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    matrix = np.array(report["accuracy_matrix"]["oracle"], dtype=float)
    assert report["metrics"]["oracle"] == compute_metrics(matrix, report["initial_accuracy"])
    assert report["status"] == "finished" and report["schema_version"] == 1
    # R[j-1, j] (before training j, fresh slot and head) equals b[j] for per-task slots.
    assert [matrix[j - 1, j] for j in (1, 2)] == report["initial_accuracy"][1:]
    saved = load_file(run_dir / "tasks" / "colors" / "module.safetensors")
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
