"""Generative backbones make nothing off the backbone's device (see test_device_placement: under
`torch.set_default_device("meta")` a tensor made without an explicit device fails loudly)."""

from __future__ import annotations

import pytest
import torch

from continual_peft import (
    Backbone,
    CausalBackbone,
    ContinualLearner,
    LearnerConfig,
    Seq2SeqBackbone,
    Task,
)
from continual_peft.backbones.tiny import save_tiny
from continual_peft.engine.loading import load_learner
from continual_peft.integrations.peft_export import export_task

WORDS = ["red", "blue", "apple", "plum", "fruit", "of", "yes", "no", "Input", "Output"]


def make(folder):
    def build():
        with torch.device("cpu"):  # the backbone is built for real; everything after is not
            return Backbone.from_pretrained(str(folder), 16, device="cpu", dtype="float32")

    return build


def tasks() -> list[Task]:
    fruit = [("fruit of red", "apple"), ("fruit of blue", "plum")]
    yes = [("red", "yes"), ("blue", "no")]
    return [
        Task.from_examples("fruit", train=fruit * 3, test=fruit, kind="generation",
                           template="Input: {text} Output:"),
        Task.from_examples("colors", train=yes * 3, test=yes, template="Input: {text} Output:"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("architecture", "kind"),
    [("llama", "lora"), ("llama", "prompt"), ("gpt2", "prefix"), ("t5", "lora"), ("t5", "adapter")],
)
def test_generative_runs_make_nothing_off_device(architecture, kind, tmp_path):
    config = LearnerConfig.from_dict({
        "module": kind, "router": "mahalanobis", "strategy": "replay",
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 4},
        "generation": {"max_new_tokens": 2},
    })  # fmt: skip
    build = make(save_tiny(tmp_path / architecture, architecture, WORDS))
    assert isinstance(build(), Seq2SeqBackbone if architecture == "t5" else CausalBackbone)
    with torch.device("meta"):
        learner = ContinualLearner(build(), config=config, run_dir=tmp_path / "run")
        for task in tasks():
            learner.learn(task)
        learner.finish()
        texts = ["fruit of red", "blue"]
        answers = learner.predict(texts, task=["fruit", "colors"])
        assert learner.predict(texts) is not None  # routed
        assert learner.logits(["red"], ["colors"]).device == learner.backbone.device
        reloaded = load_learner(tmp_path / "run", backbone=build())
        assert reloaded.predict(texts, task=["fruit", "colors"]) == answers
        if kind == "lora":
            export_task(tmp_path / "run", "fruit", "peft", tmp_path / "export")
