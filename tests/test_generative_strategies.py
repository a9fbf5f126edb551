"""Every strategy on a generative backbone: replay, ewc, olora and joint learn generation and
label-scoring tasks (replay stores prompt token ids); l2p refuses a language model clearly."""

from __future__ import annotations

import pytest
from conftest import DEVICE

from continual_peft import CausalBackbone, ContinualLearner, ContinualPeftError, LearnerConfig, Task
from continual_peft.backbones.tiny import tiny_model, word_tokenizer

WORDS = ["red", "blue", "green", "apple", "plum", "fox", "crow", "fruit", "animal", "of",
         "Input", "Output", "yes", "no"]  # fmt: skip
FRUIT = [("fruit of red", "apple"), ("fruit of blue", "plum"), ("fruit of green", "fox")]


def backbone() -> CausalBackbone:
    tokenizer = word_tokenizer(WORDS)
    return CausalBackbone(tiny_model("llama", len(tokenizer)), tokenizer, max_length=32,
                          device=DEVICE, dtype="float32")  # fmt: skip


def tasks() -> list[Task]:
    fruit = Task.from_examples("fruit", train=FRUIT * 6, test=FRUIT, kind="generation",
                               template="Input: {text} Output:")  # fmt: skip
    pairs = [("animal of red", "yes"), ("animal of blue", "no"), ("animal of green", "no")]
    animal = Task.from_examples("animal", train=pairs * 6, test=pairs,
                                template="Input: {text} Output:")  # fmt: skip
    return [fruit, animal]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("replay", {"buffer_size": 12}), ("ewc", {"lam": 10.0}), ("olora", {}), ("joint", {})],
)
def test_strategies_learn_generation_and_label_scoring_tasks(strategy, options, tmp_path):
    config = LearnerConfig.from_dict({
        "strategy": strategy, "strategy_options": options,
        "train": {"epochs": 30, "batch_size": 6, "lr": 5e-3, "warmup": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
        "generation": {"max_new_tokens": 3},
    })  # fmt: skip
    learner = ContinualLearner(backbone(), config=config, run_dir=tmp_path / "run")
    for task in tasks():
        learner.learn(task)
    last = learner.report["accuracy_matrix"]["oracle"][-1]
    assert last[1] == 1.0  # the label-scoring task just learned
    assert [r["metric"] for r in learner.records] == ["exact_match", "accuracy"]
    if strategy == "replay":  # it stored the first task's prompts as token ids
        assert learner.strategy.buffer.count("fruit") > 0
        assert all(isinstance(i, list) for i in learner.strategy.buffer.items)
    again = ContinualLearner.load(tmp_path / "run", backbone=backbone(), tasks=tasks())
    assert again.predict([x for x, _ in FRUIT], task="fruit") == learner.predict(
        [x for x, _ in FRUIT], task="fruit"
    )


def test_l2p_refuses_a_language_model():
    config = LearnerConfig.from_dict({"strategy": "l2p", "module": "prompt_pool"})
    with pytest.raises(ContinualPeftError, match="causal"):
        ContinualLearner(backbone(), config=config)
