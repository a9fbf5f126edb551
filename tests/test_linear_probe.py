"""linear_probe: each task's head trained alone on the frozen backbone, with no slot.

The equivalence tests run on a tiny BERT without dropout, so training sees the same frozen
features as evaluation: the learner's logits are the head applied to the bare backbone's pooled
states, and its trained head is a plain nn.Linear trained by hand on those features with the
engine's optimizer, schedule and batch order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import DEVICE, FAST_TRAIN, assert_close, tiny_bert, tiny_lm, word_task
from torch import nn

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, LearnerConfig, Task
from continual_peft.experiments.compare import parameter_counts
from continual_peft.integrations.peft_export import export_task
from continual_peft.strategies import NO_SLOT, check_config

NAMES = ("colors", "animals", "moods")


def still_bert(tokenizer) -> Backbone:
    """The tests' tiny BERT with every dropout off: the same features in training and eval."""
    model = tiny_bert(tokenizer, still=True)
    return Backbone(model, tokenizer, max_length=32, name="still-bert", device=DEVICE)


def probe(backbone: Backbone, tasks: list[Task], **settings) -> ContinualLearner:
    config = LearnerConfig(strategy="linear_probe", train=FAST_TRAIN, **settings)
    learner = ContinualLearner(backbone, config=config)
    for task in tasks:
        learner.learn(task)
    return learner


@pytest.fixture(scope="module")
def word_tasks() -> list[Task]:
    return [word_task(name, n_train=30, n_test=12) for name in NAMES]


@pytest.fixture(scope="module")
def learner(tokenizer, word_tasks) -> ContinualLearner:
    return probe(still_bert(tokenizer), word_tasks)


def bare_features(learner: ContinualLearner, inputs: list) -> torch.Tensor:
    """(N, d) pooled states of the backbone with every module off, computed here by hand."""
    backbone = learner.backbone
    with torch.no_grad(), learner.bank.base_only():
        return backbone.embed(backbone.collate(backbone.encode(inputs).items)).float()


def trained_by_hand(learner: ContinualLearner, task: Task) -> nn.Linear:
    """An nn.Linear from the head's initial values, trained on the frozen features with AdamW,
    linear warm-up then decay, gradient clipping and the engine's seeded batch order."""
    config, seed = learner.config.train, learner.task_seed(task, "train")
    features = bare_features(learner, task.train_inputs)  # (N, d)
    labels = torch.tensor(task.train_labels, device=features.device)
    head = nn.Linear(features.shape[1], len(task.labels), device=features.device)
    generator = torch.Generator(device="cpu").manual_seed(learner.task_seed(task, "head"))
    with torch.no_grad():
        head.weight.copy_(torch.empty(head.weight.shape).normal_(0, 0.02, generator=generator))
        head.bias.zero_()
    count = len(task.train_inputs)
    per_epoch = math.ceil(count / config.batch_size)
    steps = per_epoch * config.epochs
    warm = max(1, int(steps * config.warmup))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = np.random.default_rng(seed)
    step = 0
    for _ in range(config.epochs):
        for rows in np.array_split(order.permutation(count), per_epoch):
            factor = (step + 1) / warm if step < warm else (steps - step) / max(1, steps - warm)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * max(0.0, factor)
            index = torch.as_tensor(rows, device=features.device)
            loss = nn.functional.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(list(head.parameters()), config.grad_clip)
            optimizer.step()
            step += 1
    return head


def test_logits_are_the_head_on_the_bare_backbones_features(learner, word_tasks):
    for task in word_tasks:
        head = learner.heads.heads[task.name]
        with torch.no_grad():
            expected = head(bare_features(learner, task.test_inputs))
        got = learner.logits(task.test_inputs, [task.name] * len(task.test_inputs))
        assert_close(got, expected)


def test_the_head_equals_a_plain_linear_trained_on_frozen_features(learner, word_tasks):
    for task in word_tasks:
        plain = trained_by_hand(learner, task)
        head = learner.heads.heads[task.name]
        torch.testing.assert_close(head.weight, plain.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.bias, plain.bias, rtol=1e-5, atol=1e-5)


def test_no_slot_is_opened_and_only_heads_train(learner, word_tasks):
    assert learner.bank.num_slots == 0
    for task, record in zip(word_tasks, learner.records, strict=True):
        assert record["slot"] == NO_SLOT and record["module"] is None
        assert learner.strategy.routing(learner, task.name) == ([], [])
        head = learner.heads.heads[task.name]
        assert record["trainable_parameters"] == sum(p.numel() for p in head.parameters())
        assert record["trainable_parameters"] == (learner.backbone.hidden_size + 1) * 3
    heads = {name: (learner.backbone.hidden_size + 1) * 3 for name in NAMES}
    counts = parameter_counts(learner.report, heads)
    assert counts == {"slots": {}, "heads": sum(heads.values()), "total": sum(heads.values())}


def test_frozen_heads_leave_no_oracle_forgetting(learner):
    metrics = learner.report["metrics"]["oracle"]
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    matrix = learner.monitor.matrix("oracle")
    for j in range(len(NAMES)):  # each column stays what it was right after its task
        assert set(matrix[j:, j].tolist()) == {matrix[j, j]}
    assert metrics["acc"] > 0.5  # the keywords are linearly readable from the features


def test_a_router_picks_the_task_whose_head_answers(make_backbone, word_tasks):
    routed = probe(make_backbone(), word_tasks, router="mahalanobis")
    report = routed.report
    assert set(report["accuracy_matrix"]) == {"oracle", "routed"}
    assert len(report["routing_accuracy"]) == len(NAMES)
    assert report["metrics"]["routed"]["acc"] > 0.5
    details = routed.predict_details(word_tasks[1].test_inputs)
    assert {row["task"] for row in details} <= {*NAMES, None}
    assert routed.bank.num_slots == 0


def test_loading_then_learning_equals_learning_straight(tmp_path, tokenizer, word_tasks, learner):
    straight = learner
    first = probe(still_bert(tokenizer), word_tasks[:2])
    first.save(tmp_path / "saved")
    resumed = ContinualLearner.load(tmp_path / "saved", still_bert(tokenizer), tasks=word_tasks)
    resumed.learn(word_tasks[2])
    assert resumed.report["accuracy_matrix"] == straight.report["accuracy_matrix"]
    inputs = [x for task in word_tasks for x in task.test_inputs[:3]]
    names = [task.name for task in word_tasks for _ in range(3)]
    assert torch.equal(resumed.logits(inputs, names), straight.logits(inputs, names))


def test_export_is_refused_naming_the_head(tmp_path, tokenizer, word_tasks):
    learner = probe(still_bert(tokenizer), word_tasks[:1])
    learner.save(tmp_path / "run")
    with pytest.raises(ContinualPeftError, match=r"no module to export.*colors/head\.safetensors"):
        export_task(tmp_path / "run", "colors", "peft", tmp_path / "out")


def test_a_generative_backbone_is_refused_naming_the_fixes_before_any_folder(tmp_path):
    config = LearnerConfig(strategy="linear_probe", train=FAST_TRAIN)
    with pytest.raises(ContinualPeftError, match="nothing to train.*zero-shot.*per_task"):
        ContinualLearner(tiny_lm("llama"), config=config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"module": "adapter"}, 'module = "adapter"'),
        ({"task_modules": {"colors": "prompt"}}, r"per-task modules .*\['colors'\]"),
        ({"modules": {"lora": {"r": 4}}}, r"options of module kind\(s\) \['lora'\]"),
        ({"max_slots": 2}, "max_slots = 2 does not apply.*opens no slot"),
    ],
)
def test_settings_it_would_ignore_are_refused(settings, named):
    data = LearnerConfig(strategy="linear_probe").to_dict()
    for key, value in settings.items():
        if key == "task_modules":
            data["tasks"] = {task: {"module": kind} for task, kind in value.items()}
        elif key == "modules":
            for kind, options in value.items():
                data[kind] |= options
        else:
            data[key] = value
    with pytest.raises(ContinualPeftError, match=named):
        check_config(LearnerConfig.from_dict(data))
