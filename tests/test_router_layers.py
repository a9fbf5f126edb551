"""Routers read several hidden layers, are fitted on every training input by default, and route
each row on its own (a row's route does not depend on the rows batched with it)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import DEVICE, tiny_vit, word_task

from continual_peft import ContinualLearner, LearnerConfig, TrainConfig
from continual_peft.backbones.causal import CausalBackbone
from continual_peft.backbones.features import check_layers, feature_depths
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.seq2seq import Seq2SeqBackbone
from continual_peft.backbones.tiny import tiny_model, word_tokenizer
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.prediction import frozen_features
from continual_peft.errors import ContinualPeftError
from continual_peft.routers import build_router, router_state
from continual_peft.routers.base import ROUTERS
from continual_peft.store.digests import task_digest
from continual_peft.tasks import task as task_module
from continual_peft.tasks.sources import Row
from continual_peft.tasks.task import build_task

TINY = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, eval_batch_size=8)
WORDS = ["red", "blue", "green", "apple", "plum", "fox", "crow", "of", "yes", "no"]


# --- which depths a setting reads ---------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "blocks", "width", "depths"),
    [
        ("last", 6, 384, [6]),
        ("auto", 6, 384, [2, 4, 6]),  # MiniLM: three depths, 1152 features
        ("auto", 12, 768, [4, 8, 12]),
        ("auto", 24, 1536, [12, 24]),  # three would be 4608 wide: two
        ("auto", 32, 4096, [32]),  # one is already 4096 wide
        ("auto", 2, 64, [1, 2]),  # a third and two thirds of 2 both round to block 1
        ([0, -1], 6, 384, [0, 6]),
        ([3], 6, 384, [3]),
    ],
)
def test_feature_depths(layers, blocks, width, depths):
    assert feature_depths(layers, blocks, width) == depths


def test_two_depths_naming_one_layer_are_refused():
    with pytest.raises(ContinualPeftError, match=r"name the same layer twice .*\[6, 6\]"):
        feature_depths([6, -1], 6, 384)
    with pytest.raises(ContinualPeftError, match="same layer twice"):
        feature_depths([0, -7], 6, 384)


def test_a_depth_beyond_the_backbone_is_refused_naming_its_blocks():
    with pytest.raises(ContinualPeftError, match="depth 7 is out of range for a backbone with 6"):
        feature_depths([2, 7], 6, 384)
    with pytest.raises(ContinualPeftError, match="out of range"):
        feature_depths([-8], 6, 384)


@pytest.mark.parametrize("bad", ["first", [], [1, 1], [True], [1.5], 3, None])
def test_bad_layer_settings_are_refused_by_every_scoring_router(bad):
    with pytest.raises(ContinualPeftError, match="layers must be"):
        check_layers(bad, "x")
    for name in ("prototype", "mahalanobis", "gate"):
        with pytest.raises(ContinualPeftError, match="layers must be"):
            build_router(name, layers=bad)


def test_router_defaults_are_the_measured_ones():
    assert build_router("mahalanobis").layers == "auto"
    assert build_router("gate").layers == "auto"
    assert build_router("prototype").layers == "last"  # cosine over stacked depths measured worse
    assert build_router("topk").layers == "auto"  # its base's
    assert build_router("topk", base="prototype").layers == "last"
    assert build_router("mahalanobis", layers=[1, -1]).options["layers"] == [1, -1]


def test_a_depth_the_backbone_lacks_is_refused_before_any_training(make_backbone):
    config = LearnerConfig(router="topk", router_options={"layers": [1, 5]}, train=TINY)
    with pytest.raises(ContinualPeftError, match="depth 5 is out of range for a backbone with 2"):
        ContinualLearner(make_backbone(), config=config)


def test_a_router_state_that_names_no_layers_reads_the_last_layer():
    router = build_router("mahalanobis", layers="last")
    router.add_task(torch.randn(20, 4, dtype=torch.float64, device="cpu"))
    tensors, meta = router_state(router)
    del meta["options"]["layers"]  # a state written without the option
    cls = ROUTERS.get(meta.pop("router"))
    meta.pop("format")
    assert cls.from_state(tensors, meta).layers == "last"


# --- the features of every family ----------------------------------------------------------


def _text_backbone(architecture: str, make_backbone):
    if architecture == "bert":
        return make_backbone()
    tokenizer = word_tokenizer(WORDS)
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone
    model = tiny_model(architecture, len(tokenizer), 0)
    return kind(model, tokenizer, max_length=16, name=architecture, device=DEVICE, dtype="float32")


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "t5", "bert"])
def test_layer_features_are_pooled_hidden_states_of_each_depth(architecture, make_backbone):
    """Each block of "auto"/list features is the masked mean of that depth's hidden states (a
    plain re-computation from the model's own `output_hidden_states`), and the last depth's
    equals the last-layer features."""
    backbone = _text_backbone(architecture, make_backbone)
    batch = backbone.collate(backbone.encode(["red fox", "blue plum of green crow yes"]).items)
    with torch.no_grad():
        last = backbone.embed(batch)
        both = backbone.embed(batch, [0, -1])
        states = backbone.layer_states(batch)
    d = backbone.hidden_size
    assert last.shape == (2, d) and both.shape == (2, 2 * d)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    by_hand = (states[0].float() * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(both[:, :d], by_hand)
    torch.testing.assert_close(both[:, d:], last, atol=1e-5, rtol=1e-5)
    assert backbone.embed(batch, "auto").shape == (2, 2 * d)  # two blocks: depths 1 and 2
    assert backbone.feature_width("auto") == 2 * d and backbone.feature_width([0]) == d
    empty = frozen_features(backbone, ModuleBank(backbone, "lora", None), [], 4, "auto")
    assert empty.shape == (0, 2 * d)


def test_image_layer_features():
    backbone = ImageBackbone(tiny_vit(), None, name="tiny-vit", device=DEVICE)
    batch = backbone.collate(backbone.encode([torch.rand(8, 8) * 16 for _ in range(3)]).items)
    with torch.no_grad():
        features = backbone.embed(batch, "auto")
        states = backbone.layer_states(batch)
    assert features.shape == (3, 2 * backbone.hidden_size)
    torch.testing.assert_close(features[:, : backbone.hidden_size], states[1].float().mean(1))


# --- every decision per row ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("prototype", {}),
        ("mahalanobis", {"reject_rate": 0.1, "calibration_share": 0.5}),
        ("gate", {"steps": 30}),
        ("topk", {"k": 2}),
    ],
)
def test_a_rows_route_is_the_same_alone_and_in_a_mixed_batch(name, options):
    generator = torch.Generator(device="cpu").manual_seed(0)
    router = build_router(name, **options)
    for shift in range(3):
        router.add_task(torch.randn(40, 6, generator=generator, device="cpu") + shift)
    far = torch.full((1, 6), 40.0, device="cpu")  # rejected by mahalanobis
    rows = torch.cat([torch.randn(9, 6, generator=generator, device="cpu") * 3, far])
    together = router.route(rows)
    for i in range(len(rows)):
        alone = router.route(rows[i : i + 1])
        assert torch.equal(alone[0], together[0][i : i + 1])
        assert torch.equal(alone[1], together[1][i : i + 1])


def test_routed_predictions_are_the_same_one_by_one_and_batched(make_backbone, tasks):
    """End to end: frozen features of rows of other lengths padded together, then routing."""
    config = LearnerConfig(router="mahalanobis", train=TINY)
    learner = ContinualLearner(make_backbone(), config=config)
    for task in tasks[:2]:
        learner.learn(task)
    inputs = tasks[0].test_inputs[:6] + tasks[1].test_inputs[:6] + ["red", "a much longer input"]
    random.Random(0).shuffle(inputs)
    batched = learner.predict_details(inputs)
    for text, row in zip(inputs, batched, strict=True):
        alone = learner.predict_details([text])[0]
        assert (alone["task"], alone["label"]) == (row["task"], row["label"])
        assert alone["score"] == pytest.approx(row["score"], rel=1e-4, abs=1e-4)


# --- fitted on every training input by default ---------------------------------------------


def _rows(n: int) -> list[Row]:
    return [Row(f"text {i}", "a" if i % 2 else "b", f"rows.jsonl:{i + 1}") for i in range(n)]


def test_by_default_the_router_sees_every_training_input_and_the_hash_is_unchanged():
    splits = {"train": _rows(30), "test": _rows(6)}
    task = build_task("t", splits, max_train=5)
    assert len(task.train_inputs) == 5
    assert task.router_inputs == [r.input for r in splits["train"]] and task.router_default
    bare = build_task("t", splits, max_train=5)
    bare.router_inputs, bare.router_default = [], False
    assert task_digest(task) == task_digest(bare)  # a run begun before the default resumes
    chosen = build_task("t", splits, max_train=5, router_max_train=12)
    assert len(chosen.router_inputs) == 12 and not chosen.router_default
    assert task_digest(chosen) != task_digest(task)
    whole = build_task("t", splits)
    assert whole.router_inputs == []  # the slot's inputs are every input: nothing more to read


def test_the_default_pool_is_capped(monkeypatch):
    monkeypatch.setattr(task_module, "ROUTER_CAP", 10)
    splits = {"train": _rows(30), "test": _rows(6)}
    capped = build_task("t", splits, max_train=5)
    assert len(capped.router_inputs) == 10 and len(set(capped.router_inputs)) == 10
    assert build_task("t", splits, max_train=5).router_inputs == capped.router_inputs  # seeded
    uncut = build_task("t", splits)  # 30 slot inputs, but the router reads 10
    assert len(uncut.train_inputs) == 30 and len(uncut.router_inputs) == 10


def test_the_router_is_fitted_on_its_pool_and_oracle_runs_encode_none(make_backbone):
    words = word_task("colors", n_train=40, n_test=10)
    splits = {
        split: [Row(x, words.labels[y], "x") for x, y in zip(inputs, labels, strict=True)]
        for split, inputs, labels in (
            ("train", words.train_inputs, words.train_labels),
            ("test", words.test_inputs, words.test_labels),
        )
    }
    task = build_task("colors", splits, max_train=8)
    assert len(task.router_inputs) == 40
    routed = ContinualLearner(
        make_backbone(), config=LearnerConfig(router="mahalanobis", train=TINY)
    )
    routed.learn(task)
    assert routed.records[0]["router_examples"] == 40
    assert routed.router.stats.counts.tolist() == [40.0]
    oracle = ContinualLearner(make_backbone(), config=LearnerConfig(train=TINY))
    oracle.learn(task)
    assert oracle.records[0]["router_examples"] == 0
