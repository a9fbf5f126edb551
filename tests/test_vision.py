"""Images through the same engine: a tiny ViT (built from a config) on scikit-learn's digits.

The digits (8x8, 0..16) ship inside scikit-learn: offline. Five tasks of two digits each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import DEVICE, assert_close, tiny_vit
from PIL import Image
from sklearn.datasets import load_digits
from transformers import ViTImageProcessor
from typer.testing import CliRunner

from continual_peft import (
    Backbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    ModuleBank,
    Task,
    TrainConfig,
)
from continual_peft.backbones.image import ImageBackbone
from continual_peft.cli import app
from continual_peft.engine.loading import load_learner
from continual_peft.modules.lowrank import LowRankSite

TRAIN = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup=0.0)
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def make_vit(processor=None) -> ImageBackbone:
    return ImageBackbone(tiny_vit(), processor, name="tiny-vit", device=DEVICE)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.images, data.target  # (N, 8, 8) in 0..16, (N,)


def normalise(raw: np.ndarray) -> np.ndarray:
    return ((raw / 16.0 - 0.5) / 0.5).astype(np.float32)  # [0, 16] -> [-1, 1]


def digit_tasks(digits, n_train: int = 60, n_test: int = 40) -> list[Task]:
    """Five tasks of two digits ("digits-0-1", ...), balanced, labels "0".."9"; tensor path."""
    images, target = digits
    rng = np.random.default_rng(0)
    tasks = []
    for pair in PAIRS:
        labels = [str(d) for d in pair]
        picked = {d: rng.permutation(np.flatnonzero(target == d)) for d in pair}
        half_train, half_test = n_train // 2, n_test // 2
        train = [i for d in pair for i in picked[d][:half_train]]
        test = [i for d in pair for i in picked[d][half_train : half_train + half_test]]
        tasks.append(
            Task(
                f"digits-{pair[0]}-{pair[1]}",
                labels,
                [normalise(images[i]) for i in train],  # (8, 8) float arrays
                [labels.index(str(target[i])) for i in train],
                [torch.from_numpy(normalise(images[i]))[None] for i in test],  # (1, 8, 8) tensors
                [labels.index(str(target[i])) for i in test],
            )
        )
    return tasks


@pytest.fixture(scope="module")
def routed(digits) -> ContinualLearner:
    """per_task LoRA over the five tasks, with the mahalanobis router (oracle R comes too)."""
    learner = ContinualLearner(make_vit(), config=LearnerConfig(train=TRAIN, router="mahalanobis"))
    for task in digit_tasks(digits):
        learner.learn(task)
    return learner


def test_lora_wraps_vit_attention_projections_and_trains_only_slot_and_head(digits):
    probe = ModuleBank(make_vit(), "lora")
    probe.add_slot(seed=0)
    trainable = [n for n, p in probe.backbone.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".stack.trainable." in n for n in trainable)  # A, B x 4

    backbone = make_vit()
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    learner = ContinualLearner(backbone, config=LearnerConfig(train=TRAIN))
    names = sorted(learner.bank.sites)
    assert names == [f"layers.{i}.attention.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    assert all(isinstance(backbone.model.get_submodule(n), LowRankSite) for n in names)
    record = learner.learn(digit_tasks(digits)[0])
    assert record["trainable_parameters"] == 4 * (8 * 64 + 64 * 8) + (64 * 2 + 2)
    after = {
        n.replace(".base_layer", ""): p
        for n, p in backbone.model.named_parameters()
        if ".stack." not in n
    }
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)  # the backbone never moved
    assert learner.bank.slot_state(0)["layers.0.attention.q_proj.lora_B"].abs().sum() > 0


def test_per_task_learns_every_digit_pair_without_forgetting(routed):
    # measured: ACC 0.975, each task 0.95-1.0 (chance 0.5); the bare backbone ~0.5
    report = routed.report
    final = report["accuracy_matrix"]["oracle"][-1]
    assert report["metrics"]["oracle"]["acc"] >= 0.85 and min(final) >= 0.75
    assert report["metrics"]["oracle"]["forgetting"] == 0.0
    diagonal = [report["accuracy_matrix"]["oracle"][i][i] for i in range(5)]
    assert diagonal == final  # frozen slots and heads: exactly zero forgetting


def test_router_routes_images_to_their_task(routed, digits):
    # measured: routing 0.75-0.875 per task, mean 0.82 (chance 0.2); routed ACC 0.80
    report = routed.report
    routing = report["routing_accuracy"][-1]
    assert np.mean(routing) >= 0.6 and min(routing) >= 0.4
    assert report["metrics"]["routed"]["acc"] >= 0.6
    task = digit_tasks(digits)[2]
    predicted = routed.predict(task.test_inputs)  # no task: the router picks per image
    assert set(predicted) <= {str(d) for d in range(10)}
    truth = [task.labels[y] for y in task.test_labels]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
    assert accuracy == report["accuracy_matrix"]["routed"][-1][2]
    rows = routed.predict_details(task.test_inputs[:3])
    assert all(r["task"].startswith("digits-") for r in rows)


@pytest.mark.parametrize("kind", ["adapter", "prompt", "prefix"])
def test_other_module_kinds_learn_on_vit(digits, kind):
    # measured (6 epochs): adapter ACC 0.925, prompt 0.92 over all five tasks; here two tasks
    learner = ContinualLearner(make_vit(), config=LearnerConfig(module=kind, train=TRAIN))
    for task in digit_tasks(digits)[:2]:
        learner.learn(task)
    report = learner.report
    assert report["metrics"]["oracle"]["acc"] >= 0.8
    assert report["metrics"]["oracle"]["forgetting"] == 0.0


@pytest.mark.parametrize("kind", ["lora", "adapter", "prompt", "prefix"])
def test_rows_without_a_slot_equal_the_bare_vit(kind, digits):
    backbone = make_vit()
    bank = ModuleBank(backbone, kind)
    slot = bank.add_slot(seed=1)
    with torch.no_grad():
        for p in bank.trainable_parameters():  # a slot that changes the output
            p.add_(torch.randn_like(p) * 0.5)
    images = digit_tasks(digits)[0].test_inputs[:3]
    batch = backbone.collate(backbone.encode(images).items)
    with torch.no_grad():
        with bank.base_only():
            bare = backbone.embed(batch)
        with bank.route(torch.tensor([[slot], [-1], [slot]])):
            mixed = backbone.embed(batch)
        with bank.use_slot(slot):
            alone = backbone.embed(batch)
    assert_close(mixed[1], bare[1])
    assert_close(mixed[[0, 2]], alone[[0, 2]])
    assert not torch.allclose(alone, bare, atol=1e-3)


def test_one_batch_mixes_every_kind_on_vit(digits):
    """Rows on lora, adapter, prompt, prefix and no slot, in ONE forward, equal each row alone."""
    backbone = make_vit()
    bank = ModuleBank(backbone, "lora")
    kinds = ["lora", "adapter", "prompt", "prefix"]
    for seed, kind in enumerate(kinds):
        bank.add_slot(seed=seed, kind=kind)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.5)
        bank.freeze_slot()
    assert sorted(bank.kind_sites["adapter"]) == [f"layers.{i}.mlp.fc2" for i in (0, 1)]
    assert sorted(bank.kind_sites["prefix"]) == [f"layers.{i}.attention" for i in (0, 1)]
    images = digit_tasks(digits)[0].test_inputs[:5]
    batch = backbone.collate(backbone.encode(images).items)
    slots = [0, 1, 2, 3, -1]
    with torch.no_grad():
        with bank.route(torch.tensor(slots)):
            mixed = backbone.embed(batch)
        for row, slot in enumerate(slots):
            one = backbone.collate([backbone.encode(images).items[row]])
            with bank.route(torch.tensor([slot])):
                assert_close(mixed[row], backbone.embed(one)[0])


def test_run_directory_reloads_an_image_learner(digits, tmp_path):
    folder = tmp_path / "tiny-vit"
    tiny_vit().save_pretrained(folder)  # no preprocessor_config.json: the tensor path
    run = tmp_path / "run"
    train = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)  # the same predictions back
    config = LearnerConfig(train=train, router="mahalanobis")
    learner = ContinualLearner(str(folder), config=config, run_dir=run)
    assert isinstance(learner.backbone, ImageBackbone) and learner.backbone.processor is None
    tasks = digit_tasks(digits, n_train=16, n_test=8)[:2]
    for task in tasks:
        learner.learn(task)
    learner.finish()
    loaded = load_learner(run)
    assert isinstance(loaded.backbone, ImageBackbone)
    images = tasks[0].test_inputs + tasks[1].test_inputs
    assert loaded.predict(images) == learner.predict(images)
    assert loaded.predict(images, task="digits-2-3") == learner.predict(images, task="digits-2-3")


def vit_folder(tmp_path) -> str:
    """The tiny ViT saved with an image processor: a model folder as users have them."""
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 8, "width": 8},
        do_rescale=True,  # uint8 0..255 -> 0..1
        do_normalize=True,
        image_mean=[0.5],
        image_std=[0.5],
    )
    folder = tmp_path / "vit-with-processor"
    tiny_vit().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_processor_path_takes_pil_and_numpy_images(digits, tmp_path):
    backbone = Backbone.from_pretrained(vit_folder(tmp_path), device=DEVICE)
    assert isinstance(backbone, ImageBackbone) and backbone.processor is not None
    raw = (digits[0][:4] * 255 / 16).round().astype(np.uint8)  # (4, 8, 8)
    as_pil = [Image.fromarray(image, mode="L") for image in raw]
    from_numpy = backbone.encode(list(raw)).items
    from_pil = backbone.encode(as_pil).items
    big = backbone.encode([as_pil[0].resize((16, 16))]).items  # resized by the processor
    expected = torch.from_numpy((raw / 255.0 - 0.5) / 0.5).float()[:, None]  # (4, 1, 8, 8)
    for items in (from_numpy, from_pil):
        assert_close(torch.stack(items), expected)
    assert big[0].shape == (1, 8, 8)
    learner = ContinualLearner(backbone, config=LearnerConfig(train=TRAIN))
    task = digit_tasks(digits)[0]
    pil_task = Task(
        task.name,
        task.labels,
        [Image.fromarray(((x + 1) * 127.5).round().astype(np.uint8)) for x in task.train_inputs],
        task.train_labels,
        [((x[0].numpy() + 1) * 127.5).round().astype(np.uint8) for x in task.test_inputs],
        task.test_labels,
    )
    learner.learn(pil_task)
    assert learner.report["metrics"]["oracle"]["acc"] >= 0.8


def test_clear_errors_for_inputs_of_the_wrong_kind(make_backbone):
    backbone = make_vit()
    with pytest.raises(ContinualPeftError, match=r"has shape \(3, 8, 8\).*takes \(1, 8, 8\)"):
        backbone.encode([np.zeros((3, 8, 8), dtype=np.float32)])
    with pytest.raises(ContinualPeftError, match=r"image 1 has shape \(16, 16\)"):
        backbone.encode([np.zeros((8, 8), np.float32), torch.zeros(16, 16)])
    with pytest.raises(ContinualPeftError, match="dtype torch.uint8.*float pixels"):
        backbone.encode([np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(ContinualPeftError, match="is a Image; without an image processor"):
        backbone.encode([Image.new("L", (8, 8))])
    with pytest.raises(ContinualPeftError, match="input 0 is a text; .* reads images"):
        backbone.encode(["a digit"])
    with pytest.raises(ContinualPeftError, match="input 0 is a ndarray, not a text"):
        make_backbone().encode([np.zeros((8, 8), dtype=np.float32)])


def test_image_folder_stream_through_the_command_line(digits, tmp_path):
    """PNG files in an image folder, read by the `datasets` imagefolder loader (offline) from a
    stream spec, cut into tasks by class, learned on a ViT folder by `continual-peft run`."""
    images, target = digits
    for split, rows in (("train", range(0, 400)), ("test", range(400, 600))):
        for i in rows:
            if target[i] < 4:
                folder = tmp_path / "data" / "digits" / split / str(target[i])
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (images[i] * 255 / 16).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    spec = tmp_path / "digits.toml"
    spec.write_text(
        'name = "digits"\ndata_root = "data"\n[[class_split]]\nprefix = "digits"\n'
        'dataset = "digits"\ntext_column = "image"\nclasses_per_task = 2\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(spec),
            "--backbone",
            vit_folder(tmp_path),
            "--out",
            str(out),
            "--epochs",
            "6",
            "--lr",
            "0.01",
            "--batch-size",
            "8",
            "--baseline",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["task_names"] == ["digits-0-1", "digits-2-3"]
    assert [t["labels"] for t in report["tasks"]] == [["0", "1"], ["2", "3"]]
    assert report["metrics"]["oracle"]["acc"] >= 0.8


def test_nan_or_infinite_pixels_are_named_before_training(digits):
    """Not "the loss became nan ... lower the learning rate": the input, by split and index."""
    task = digit_tasks(digits, n_train=10, n_test=6)[0]
    learner = ContinualLearner(make_vit(), train=TRAIN)
    task.train_inputs[3] = np.full((8, 8), np.nan, dtype=np.float32)
    with pytest.raises(ContinualPeftError, match=r"task 'digits-0-1': train input 3 has NaN"):
        learner.learn(task)
    task = digit_tasks(digits, n_train=10, n_test=6)[0]
    task.test_inputs[5] = torch.full((1, 8, 8), float("inf"))
    with pytest.raises(ContinualPeftError, match=r"test input 5 has NaN or infinite pixel"):
        learner.learn(task)  # the failed first attempt left nothing behind: same name again
    learner.learn(digit_tasks(digits, n_train=10, n_test=6)[0])
    with pytest.raises(ContinualPeftError, match=r"input 0 has NaN or infinite pixel values"):
        learner.predict([np.full((8, 8), np.nan, dtype=np.float32)], task="digits-0-1")
