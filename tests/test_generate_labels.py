"""Classification with `decode = "generate"` matches answers to labels by their tokens.

A tokenizer's decoding does not give back every string (it writes "very good !" as "very good!"),
so a model that writes exactly a label's tokens must still score, and `not_a_label` must count
only answers that are no label. Tiny Llama and T5 models built from configs.
"""

from __future__ import annotations

import warnings

import pytest
from helpers import DEVICE

from continual_peft import (
    CausalBackbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    Seq2SeqBackbone,
    Task,
)
from continual_peft.backbones.tiny import tiny_model, word_tokenizer
from continual_peft.config import GenerationConfig
from continual_peft.engine.heads import LanguageModelHeads

WORDS = ["red", "blue", "green", "plum", "fox", "crow", "very", "good", "bad", "Input", "Output"]
# labels whose own tokens decode to other text: "very good!" and "bad."
PAIRS = [
    ("red fox", "very good !"),
    ("blue crow", "bad ."),
    ("green plum", "very good !"),
    ("red crow", "bad ."),
]
ROUND_TRIP = "do not come back from this backbone's tokenizer"


def lm_backbone(architecture: str):
    """A tiny generative backbone built in memory (float32)."""
    tokenizer = word_tokenizer(WORDS)
    model = tiny_model(architecture, len(tokenizer), seed=0)
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone
    return kind(
        model, tokenizer, max_length=32, name=f"tiny-{architecture}", device=DEVICE, dtype="float32"
    )


def generate_config(epochs: int = 20, lr: float = 5e-3) -> LearnerConfig:
    return LearnerConfig.from_dict(
        {
            "train": {"epochs": epochs, "batch_size": 6, "lr": lr, "warmup": 0.0},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"decode": "generate", "max_new_tokens": 4},
        }
    )


def rating_task(pairs: list[tuple[str, str]] = PAIRS) -> Task:
    """12 test rows: each pair three times."""
    return Task.from_examples(
        "rate", train=pairs * 6, test=pairs * 3, template="Input: {text} Output:"
    )


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_a_model_writing_the_gold_tokens_scores_every_row(architecture: str):
    learner = ContinualLearner(lm_backbone(architecture), config=generate_config())
    task = rating_task()
    with pytest.warns(UserWarning, match=ROUND_TRIP):
        record = learner.learn(task)
    inputs = task.test_inputs
    gold = [task.labels[y] for y in task.test_labels]
    backbone = learner.backbone
    with learner.use_task("rate"):
        written = backbone.generate(learner.heads.prompt_items("rate", inputs).items, 4)
    # the trained model writes exactly each gold label's tokens, whose text is not the label
    assert written == [ids[:-1] for ids in backbone.encode_targets(gold)]
    assert all(backbone.decode(ids) != label for ids, label in zip(written, gold, strict=True))
    assert learner.report["accuracy_matrix"]["oracle"] == [[1.0]]
    assert record["text_scores"]["rate"]["not_a_label"] == 0
    assert learner.predict(inputs, task="rate") == gold


def scripted_generate(backbone, answers: dict[str, str]):
    """A stand-in for `backbone.generate`: a prompt holding input `text` is answered with the
    tokens of `answers[text]` as a target is tokenized, without EOS (as `generate` returns)."""

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        texts = [backbone.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        said = [next(a for x, a in answers.items() if x in text) for text in texts]
        return [ids[:-1] for ids in backbone.encode_targets(said)]

    return generate


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_not_a_label_counts_only_answers_that_are_no_label(architecture: str, monkeypatch):
    backbone = lm_backbone(architecture)
    answers = {
        "red fox": "very good !",  # the gold label: right
        "blue crow": "very good !",  # the other label: wrong, but a label
        "green plum": "very good",  # a label's first tokens: no label
        "red crow": "fox",  # no label
    }
    monkeypatch.setattr(backbone, "generate", scripted_generate(backbone, answers))
    learner = ContinualLearner(backbone, config=generate_config(epochs=1, lr=1e-9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the round-trip warning, tested below
        record = learner.learn(rating_task())
    assert learner.report["accuracy_matrix"]["oracle"] == [[0.25]]  # 3 of 12 rows
    assert record["text_scores"]["rate"]["not_a_label"] == 6
    written = learner.predict(list(answers), task="rate")
    assert written == ["very good !", "very good !", "very good", "fox"]


def opened_warnings(architecture: str, labels: list[str], decode: str = "generate") -> list[str]:
    """The warnings opening a task with `labels` gives, on a fresh LM head."""
    heads = LanguageModelHeads(lm_backbone(architecture), GenerationConfig(decode=decode))
    task = Task.from_examples(
        "rate",
        train=[(f"red {i}", y) for i, y in enumerate(labels)],
        test=[("red", labels[0])],
        labels=labels,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heads.open(task, seed=0)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_the_warning_names_labels_that_do_not_decode_back_and_no_plain_ones(architecture: str):
    said = [
        m
        for m in opened_warnings(architecture, ["good", "bad .", "very good !"])
        if ROUND_TRIP in m
    ]
    assert len(said) == 1
    assert "2 label(s)" in said[0] and "'good'" not in said[0]
    assert "'bad .' -> 'bad.'" in said[0] and "'very good !' -> 'very good!'" in said[0]
    assert not [m for m in opened_warnings(architecture, ["good", "very bad"]) if ROUND_TRIP in m]
    # scored labels are compared as tokens anyway: nothing to warn of
    scored = opened_warnings(architecture, ["bad .", "very good !"], decode="score")
    assert not [m for m in scored if ROUND_TRIP in m]


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_a_label_longer_than_max_new_tokens_is_refused_naming_it(architecture: str):
    config = generate_config(epochs=1)
    config.generation.max_new_tokens = 1
    learner = ContinualLearner(lm_backbone(architecture), config=config)
    expected = r"label\(s\) 'bad .' \(2 tokens\), 'very good !' \(3 tokens\) need more tokens"
    expected += r".*max_new_tokens to at least 3.*score"
    with pytest.raises(ContinualPeftError, match=expected):
        learner.learn(rating_task())
    assert not learner.learned


def test_scoring_labels_takes_any_length_and_generation_targets_warn():
    config = generate_config(epochs=1)
    config.generation.max_new_tokens = 1
    config.generation.decode = "score"  # every label scored whole: nothing to write
    ContinualLearner(lm_backbone("llama"), config=config).learn(rating_task())
    pairs = [("red", "green plum"), ("blue", "fox")]
    task = Task.from_examples("say", pairs * 4, pairs, kind="generation")
    with pytest.warns(UserWarning, match=r"'say': 1 of its 2 targets need more tokens.*to 2"):
        ContinualLearner(lm_backbone("llama"), config=config).learn(task)
