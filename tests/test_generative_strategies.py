"""Every strategy on a generative backbone: replay, ewc, olora, inflora, sdlora and joint learn
generation and label-scoring tasks (replay stores prompt token ids); l2p refuses a language model
clearly.
Their saving, loading and other shared invariants on a tiny Llama: test_cases.py."""

from __future__ import annotations

import pytest
from helpers import tiny_lm

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig, Task

FRUIT = [("fruit of red", "apple"), ("fruit of blue", "plum"), ("fruit of green", "fox")]


def tasks() -> list[Task]:
    fruit = Task.from_examples(
        "fruit", train=FRUIT * 6, test=FRUIT, kind="generation", template="Input: {text} Output:"
    )
    pairs = [("animal of red", "yes"), ("animal of blue", "no"), ("animal of green", "no")]
    animal = Task.from_examples(
        "animal", train=pairs * 6, test=pairs, template="Input: {text} Output:"
    )
    return [fruit, animal]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("replay", {"buffer_size": 12}),
        ("ewc", {"lam": 10.0}),
        ("olora", {}),
        ("inflora", {}),
        ("merge", {"method": "task_arithmetic", "weight": "mean"}),
        ("sdlora", {}),
        ("joint", {}),
    ],
)
def test_strategies_learn_generation_and_label_scoring_tasks(strategy, options):
    config = LearnerConfig.from_dict(
        {
            "strategy": strategy,
            "strategy_options": options,
            "train": {"epochs": 30, "batch_size": 6, "lr": 5e-3, "warmup": 0.0},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"max_new_tokens": 3},
        }
    )
    learner = ContinualLearner(tiny_lm("llama"), config=config)
    for task in tasks():
        learner.learn(task)
    last = learner.report["accuracy_matrix"]["oracle"][-1]
    assert last[1] == 1.0  # the label-scoring task just learned
    assert [r["metric"] for r in learner.records] == ["exact_match", "accuracy"]
    if strategy == "replay":  # it stored the first task's prompts as token ids
        assert learner.strategy.buffer.count("fruit") > 0
        assert all(isinstance(i, list) for i in learner.strategy.buffer.items)


def test_l2p_refuses_a_language_model():
    config = LearnerConfig.from_dict({"strategy": "l2p", "module": "prompt_pool"})
    with pytest.raises(ContinualPeftError, match="causal"):
        ContinualLearner(tiny_lm("llama"), config=config)
