"""The backbone fingerprint: a run is only loaded on the backbone it was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import DEVICE, tiny_bert, word_task
from transformers import BertConfig, BertModel

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, TrainConfig
from continual_peft.backbones.fingerprint import check_fingerprint, full_config_sha256
from continual_peft.engine.loading import load_learner


def backbone(tokenizer, model=None, name: str = "tiny-bert") -> Backbone:
    model = model if model is not None else tiny_bert(tokenizer)
    return Backbone(model, tokenizer, max_length=32, name=name, device=DEVICE)


def other_config(tokenizer) -> BertModel:
    """The tiny BERT with another dropout: the same weights (same seed and shapes), other config."""
    model = tiny_bert(tokenizer)
    config = BertConfig(**{**model.config.to_dict(), "hidden_dropout_prob": 0.2})
    other = BertModel(config, add_pooling_layer=False).eval()
    other.load_state_dict(model.state_dict())
    return other


def saved(b: Backbone) -> dict:
    return {"name": b.name, **b.fingerprint()}


def test_the_same_model_from_another_folder_is_accepted(tokenizer, tmp_path: Path):
    for folder in ("a", "b"):
        tiny_bert(tokenizer).save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    ours = Backbone.from_pretrained(str(tmp_path / "a"), 32, device=DEVICE)
    loaded = Backbone.from_pretrained(str(tmp_path / "b"), 32, device=DEVICE)
    assert loaded.fingerprint() == ours.fingerprint()  # the folder is not part of the config hash
    check_fingerprint(saved(ours), loaded, "run x")


@pytest.mark.parametrize(
    ("make", "differs"),
    [
        (lambda tok: tiny_bert(tok, seed=1), "weights"),
        (other_config, "config"),
    ],
    ids=["other-seed", "other-config"],
)
def test_another_backbone_is_refused_naming_both(tokenizer, make, differs: str):
    ours, theirs = backbone(tokenizer), backbone(tokenizer, make(tokenizer), name="other-bert")
    with pytest.raises(ContinualPeftError) as info:
        check_fingerprint(saved(ours), theirs, "run runs/x")
    message = str(info.value)
    assert message.startswith("run runs/x was trained on backbone 'tiny-bert' (model class Bert")
    assert "but the backbone given is 'other-bert' (model class BertModel" in message
    for fingerprint in (ours.fingerprint(), theirs.fingerprint()):
        key = f"{differs}_sha256" if differs == "weights" else "config_sha256"
        assert fingerprint[key] in message
    assert f"(mismatch: {differs}" in message  # other weights differ in deeper layers too
    assert "use 'tiny-bert' (pass it as backbone=... or --backbone)" in message


def test_another_model_class_is_refused(tokenizer):
    recorded = {**saved(backbone(tokenizer)), "model_class": "GPT2Model"}
    with pytest.raises(ContinualPeftError, match=r"mismatch: model class\)"):
        check_fingerprint(recorded, backbone(tokenizer), "run x")


def test_old_runs_and_missing_keys_still_load(tokenizer):
    ours = backbone(tokenizer)
    legacy = {**saved(ours), "config_sha256": full_config_sha256(ours)}
    check_fingerprint(legacy, ours, "run x")  # a config hash that covers the folder name too
    check_fingerprint({}, ours, "run x")  # nothing recorded: nothing to check
    check_fingerprint({**saved(ours), "name": "moved/elsewhere"}, ours, "run x")  # only a name


def test_load_learner_refuses_another_backbone(tokenizer, tmp_path: Path):
    learner = ContinualLearner(
        backbone(tokenizer), train=TrainConfig(epochs=1, batch_size=8), run_dir=tmp_path / "run"
    )
    learner.learn(word_task("colors", n_train=8, n_test=4))
    learner.finish()
    assert load_learner(tmp_path / "run", backbone=backbone(tokenizer)).predict(
        ["a red cup"], task="colors"
    )  # the same model built again is accepted
    other = backbone(tokenizer, other_config(tokenizer), name="other-bert")
    with pytest.raises(ContinualPeftError, match=r"trained on backbone 'tiny-bert'.*'other-bert'"):
        load_learner(tmp_path / "run", backbone=other)


def test_a_model_whose_deeper_layers_differ_is_another_backbone(tokenizer):
    """The embeddings alone (weights_sha256) do not tell a fine-tune from its base model."""
    ours = Backbone(tiny_bert(tokenizer), tokenizer, max_length=32, name="tiny-bert", device=DEVICE)
    model = tiny_bert(tokenizer)
    with torch.no_grad():
        model.encoder.layer[-1].output.dense.weight.add_(0.01)
    tuned = Backbone(model, tokenizer, max_length=32, name="tiny-bert", device=DEVICE)
    assert ours.fingerprint()["weights_sha256"] == tuned.fingerprint()["weights_sha256"]
    with pytest.raises(ContinualPeftError, match="mismatch: layer weights"):
        check_fingerprint({"name": "tiny-bert", **ours.fingerprint()}, tuned, "run r")
    older = {k: v for k, v in ours.fingerprint().items() if k != "layers_sha256"}
    check_fingerprint({"name": "tiny-bert", **older}, ours, "run r")  # recorded before the key
