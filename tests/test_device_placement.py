"""Every tensor the project makes or loads lives on the backbone's device (and in its dtypes).

A CPU-only machine cannot see a tensor left on the wrong GPU, but it can see one made without an
explicit device: under `torch.set_default_device("meta")` such a tensor lands on the meta device,
and the first operation that meets a real tensor fails loudly. The backbone itself is built on
the CPU; then whole runs (every strategy spec, every module kind, every router), reloading,
prediction and export run under the meta default. Afterwards every tensor held by the learner
is checked to be on the backbone's device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, word_task

from continual_peft import Backbone, TrainConfig
from continual_peft.engine.loading import load_learner
from continual_peft.experiments.runner import run_stream
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules import MODULE_KINDS
from continual_peft.routers import ROUTERS
from continual_peft.strategies import load_strategy_spec
from continual_peft.tasks.streams import Stream

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "strategies").glob("*.toml"))
TINY = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, eval_batch_size=8)


def _stream() -> Stream:
    tasks = [word_task(name, n_train=16, n_test=8) for name in ("colors", "animals")]
    return Stream("words", tasks)


def _backbone_factory(tokenizer):
    def make() -> Backbone:
        with torch.device("cpu"):  # the backbone is built for real; everything after is not
            return Backbone(tiny_bert(tokenizer), tokenizer, max_length=16, device="cpu")

    return make


def _tensors(learner) -> dict[str, torch.Tensor]:
    """Every tensor the learner holds besides the backbone's own weights."""
    found = {f"bank/{n}": t for n, t in learner.backbone.named_buffers() if "stack" in n}
    found |= {f"bank/{n}": p for n, p in learner.backbone.named_parameters() if "stack" in n}
    found |= {f"heads/{n}": p for n, p in learner.heads.named_parameters()}
    if learner.router is not None:
        found |= {f"router/{k}": v for k, v in learner.router.state()[0].items()}
    found |= {f"strategy/{k}": v for k, v in learner.strategy.state()[0].items()}
    return found


def _check_placed(learner) -> None:
    device = learner.backbone.device
    stored = {"strategy/buffer.", "strategy/kept."}  # stored inputs wait on the CPU by design
    wrong = {
        name: str(t.device)
        for name, t in _tensors(learner).items()
        if t.device != device and not any(name.startswith(s) for s in stored)
    }
    assert not wrong, f"tensors off the backbone's device {device}: {wrong}"
    for name, head in learner.heads.heads.items():
        assert head.weight.dtype == torch.float32, f"head {name} is {head.weight.dtype}"


def _run(config, tokenizer, tmp_path: Path):
    config.train = TINY
    return run_stream(
        _stream(), config, run_dir=tmp_path / "run", make_backbone=_backbone_factory(tokenizer)
    )


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_every_strategy_spec_runs_with_nothing_made_off_device(spec, tokenizer, tmp_path):
    config = load_strategy_spec(spec)
    with torch.device("meta"):
        learner = _run(config, tokenizer, tmp_path)
        _check_placed(learner)
        reloaded = load_learner(tmp_path / "run", backbone=_backbone_factory(tokenizer)())
        texts = ["red car today", "the dog runs"]
        assert reloaded.predict(texts, task="colors") == learner.predict(texts, task="colors")
        _check_placed(reloaded)


@pytest.mark.parametrize("router", [r for r in ROUTERS.names() if r != "oracle"])
def test_every_router_routes_with_nothing_made_off_device(router, tokenizer, tmp_path):
    config = load_strategy_spec(REPO / "strategies" / "per_task_lora.toml")
    config.router = router
    with torch.device("meta"):
        learner = _run(config, tokenizer, tmp_path)
        _check_placed(learner)
        details = learner.predict_details(["blue shoe now", "a fish hides"])
        assert {row["task"] for row in details} <= {"colors", "animals"}
        reloaded = load_learner(tmp_path / "run", backbone=_backbone_factory(tokenizer)())
        assert reloaded.predict_details(["blue shoe now"])[0]["task"] == details[0]["task"]
        _check_placed(reloaded)


@pytest.mark.parametrize("kind", MODULE_KINDS.names())
def test_every_module_kind_trains_and_predicts_with_nothing_made_off_device(
    kind, tokenizer, tmp_path
):
    config = load_strategy_spec(REPO / "strategies" / "per_task_lora.toml")
    config.module = kind
    if kind == "prompt_pool":
        config = load_strategy_spec(REPO / "strategies" / "l2p.toml")
    with torch.device("meta"):
        learner = _run(config, tokenizer, tmp_path)
        _check_placed(learner)
        mixed = learner.logits(["red car", "a dog sleeps"], ["colors", "animals"])
        assert mixed.device == learner.backbone.device and torch.isfinite(mixed[:, :3]).all()


def test_peft_export_under_a_meta_default(tokenizer, tmp_path):
    config = load_strategy_spec(REPO / "strategies" / "per_task_lora.toml")
    with torch.device("meta"):
        _run(config, tokenizer, tmp_path)
        out = export_task(tmp_path / "run", "colors", "peft", tmp_path / "export")
    assert (out / "adapter_model.safetensors").is_file()
