"""A backbone that cannot work is refused when it is loaded, naming why, before any run starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import DEVICE, FAST_TRAIN, tiny_bert, word_task
from transformers import BertConfig, BertModel

from continual_peft import Backbone, ContinualLearner, ContinualPeftError
from continual_peft.config import LearnerConfig


@pytest.fixture
def saved_bert(tokenizer, tmp_path) -> Path:
    folder = tmp_path / "bert"
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_missing_or_empty_folder_says_so(tmp_path):
    with pytest.raises(ContinualPeftError, match=r"backbone folder '.*nowhere/bb' does not exist"):
        Backbone.from_pretrained(str(tmp_path / "nowhere" / "bb"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ContinualPeftError, match=r"holds no model \(no config.json\)"):
        Backbone.from_pretrained(str(tmp_path / "empty"))


def test_a_relative_folder_that_is_not_here_is_never_looked_up_online(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ContinualPeftError, match=r"there is no folder .*bb/tinybert"):
        Backbone.from_pretrained("bb/tinybert")  # an "org/name" look-alike: local cache only


def test_a_folder_without_tokenizer_files_is_refused(saved_bert):
    for name in ("vocab.txt", "tokenizer.json"):
        (saved_bert / name).unlink(missing_ok=True)  # tokenizer.save_pretrained writes either
    with pytest.raises(ContinualPeftError, match="has no tokenizer files"):
        Backbone.from_pretrained(str(saved_bert))


def test_another_models_tokenizer_is_refused(saved_bert, tmp_path):
    other = tmp_path / "other"
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(other)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (saved_bert / name).is_file():
            shutil.copy(saved_bert / name, other / name)
    with pytest.raises(
        ContinualPeftError, match="tokenizer has 30522 tokens but the model has 100"
    ):
        Backbone.from_pretrained(str(other))


def test_max_length_beyond_the_position_embeddings_is_refused(tokenizer, saved_bert):
    with pytest.raises(ContinualPeftError, match=r"max_length 500 exceeds .* \(64 positions\)"):
        Backbone(tiny_bert(tokenizer), tokenizer, max_length=500, device=DEVICE)
    with pytest.raises(ContinualPeftError, match="use --max-length 64 or less"):
        Backbone.from_pretrained(str(saved_bert), max_length=65)
    Backbone.from_pretrained(str(saved_bert), max_length=64)  # the limit itself is fine


def test_inputs_without_tokens_are_refused_and_no_inputs_predict_nothing(tokenizer, tmp_path):
    backbone = Backbone(tiny_bert(tokenizer), tokenizer, max_length=16, device=DEVICE)
    learner = ContinualLearner(backbone, config=LearnerConfig(train=FAST_TRAIN))
    learner.learn(word_task("colors", n_train=12, n_test=6))
    assert learner.predict([], task="colors") == [] and learner.predict([]) == []
    backbone.tokenizer = _empty_text_tokenizer(tokenizer)
    with pytest.raises(ContinualPeftError, match=r"input 1 \(''\) has no tokens"):
        learner.predict(["red car", ""], task="colors")


def _empty_text_tokenizer(tokenizer):
    """The tokenizer, as a GPT-2-style one would behave: no special tokens, so "" is no token."""

    def call(texts, **kwargs):
        return tokenizer(texts, add_special_tokens=False, **kwargs)

    return call


def test_a_run_on_a_relative_folder_works_from_anywhere_and_after_a_move(
    saved_bert, tmp_path, monkeypatch
):
    """The run records the folder's absolute path; a moved model is given with --backbone."""
    import json

    from typer.testing import CliRunner

    from continual_peft.cli import app

    monkeypatch.chdir(saved_bert.parent)
    learner = ContinualLearner(
        Backbone.from_pretrained("./bert", max_length=16, device=DEVICE),
        config=LearnerConfig(router="mahalanobis", train=FAST_TRAIN),
        run_dir=tmp_path / "run",
    )
    learner.learn(word_task("colors", n_train=12, n_test=6))
    learner.finish()
    recorded = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert recorded["config"]["backbone"]["name"] == str(saved_bert.resolve())
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red car"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # elsewhere: still found
    run = CliRunner().invoke(app, ["predict", "--run", "run", "--input", str(inputs)])
    assert run.exit_code == 0 and json.loads(run.stdout)["task"] == "colors", run.output
    moved = shutil.move(saved_bert, tmp_path / "moved")
    gone = CliRunner().invoke(app, ["predict", "--run", "run", "--input", str(inputs)])
    assert gone.exit_code == 2 and "does not exist" in gone.stderr, gone.output
    args = ["--run", "run", "--backbone", str(moved)]
    again = CliRunner().invoke(app, ["predict", *args, "--input", str(inputs)])
    assert again.exit_code == 0 and json.loads(again.stdout)["task"] == "colors", again.output
    out = tmp_path / "merged"
    exported = CliRunner().invoke(
        app, ["export", *args, "--task", "colors", "--format", "merged", "--out", str(out)]
    )
    assert exported.exit_code == 0 and (out / "config.json").is_file(), exported.output


def test_a_huge_input_is_cut_and_counted_as_if_tokenized_whole(tokenizer):
    """A long text is read through a prefix: the same ids and truncation count as reading it
    whole, including a text of one endless "word" (where a prefix holds too few tokens)."""
    backbone = Backbone(tiny_bert(tokenizer), tokenizer, max_length=16, device=DEVICE)
    texts = ["a short one", "red car " * 5_000, "x" * 3_000, "ab" * 40 + " tail " * 3]
    encoded = backbone.encode(texts)
    whole = tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert encoded.items == [list(ids) for ids in whole]
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    assert encoded.truncated == sum(n > 16 for n in lengths) >= 1
