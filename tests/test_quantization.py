"""Quantized frozen backbones (bitsandbytes: NF4 4-bit, LLM.int8 8-bit) against oracles.

Our LoRA on `Linear4bit` / `Linear8bitLt` layers gives peft's outputs on the same quantized model;
an adapter on a quantized layer adds its plain recomputation; kinds mixed per row in one batch
equal each row alone; training reaches only the trainable slot and leaves the quantized weights
bit-identical; a router reads the quantized model's own frozen features; a task exported in
peft's format loads onto the same quantized base with the run's outputs, and a merged export is
refused.

A tiny Llama (over LM_WORDS) and a tiny BERT are saved to folders once and quantized at load,
on the session's device, computing in float32 whatever CONTINUAL_PEFT_TEST_DTYPE says
(`helpers.quantized_backbone`; the runs' configs name float32). The tolerances, and why:
- 4-bit: both sides of a comparison run bitsandbytes' same 4-bit matmul on the same packed
  weights (the weights dequantized to float32, then a float32 matmul), so they differ only in
  how a delta is added (peft scales the d_out-wide delta and adds it; we scale the r-wide
  intermediate and add inside one addmm): float32 reorderings, `tolerance(torch.float32)`.
- 8-bit: the same, but every `Linear8bitLt` casts its input to float16 before rounding it to
  int8, so a float32 ulp of difference upstream may flip one float16 rounding (relative 2^-11)
  in a later layer: `tolerance(torch.float16)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    DEVICE,
    FAST_TRAIN,
    LM_WORDS,
    assert_close,
    generated_together_and_alone,
    lm_word_tasks,
    load_tokenizer,
    quantized_backbone,
    require_bitsandbytes,
    save_tiny_bert,
    tolerance,
    word_task,
)
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig
from typer.testing import CliRunner

from continual_peft import BackboneConfig, ContinualLearner, LearnerConfig, ModuleBank
from continual_peft.backbones.quantization import Quantization, quantized_layers
from continual_peft.backbones.tiny import save_tiny
from continual_peft.cli import app
from continual_peft.modules.adapter import AdapterConfig
from continual_peft.modules.bitfit import BitFitConfig
from continual_peft.modules.lora import LoRAConfig
from continual_peft.modules.prefix import PrefixConfig
from continual_peft.modules.prompt import PromptConfig

peft = pytest.importorskip("peft")

FAMILIES = ("llama", "bert")
AUTO = {"llama": AutoModelForCausalLM, "bert": AutoModel}
R, ALPHA = 4, 12.0  # scale 3: not a power of two, so scaling before or after a matmul rounds apart
TEXTS = {
    "llama": [
        "Input: fruit of red Output:",
        "blue of crow",
        "plum",
        "green apple fox",
        "of",
        "red red plum",
        "crow of apple fruit",
        "fox",
    ],
    "bert": [
        "red apple car",
        "a dog sleeps at home today",
        "sad",
        "blue fish jumps",
        "happy",
        "a red car",
        "dogs sleep",
        "fish",
    ],
}
# every kind each family takes, one slot each, and a hybrid slot of two
KINDS = ["lora", "adapter", "prompt", "prefix", "bitfit", "ia3", "ia3+lora"]
KIND_CONFIGS = {
    "lora": LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, targets=["all-linear"]),
    "adapter": AdapterConfig(placement="houlsby", activation="gelu"),
    "prompt": PromptConfig(num_virtual_tokens=3),
    "prefix": PrefixConfig(num_virtual_tokens=3),
    "bitfit": BitFitConfig(bias_free="add"),  # Llama has no bias: a learnt one on each layer
}
# LLM.int8 sends every input column holding a value above this threshold to a float16 matmul,
# choosing the columns over the whole batch (padding included): with outliers, a row's int8
# rounding depends on the rows beside it (measured: 1e-4 on hidden states, 2e-3 on a sum of
# log-probabilities). No activation of the tiny models reaches this one, so each row is
# quantized on its own and only our routing is under test.
NO_OUTLIERS = 1e6
QUANTIZATIONS = {"4bit": (4, {}), "8bit-no-outliers": (8, {"int8_threshold": NO_OUTLIERS})}
FOUR_BIT = "4bit (nf4, double quantization)"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama and BERT, each saved with its tokenizer to a folder."""
    require_bitsandbytes()
    root = tmp_path_factory.mktemp("quantized")
    return {
        "llama": save_tiny(root / "llama", "llama", LM_WORDS),
        "bert": save_tiny_bert(root / "bert", load_tokenizer()),
    }


def layer_kind(bits: int) -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt


def hf_quantized(folder: Path, family: str, config: BitsAndBytesConfig) -> torch.nn.Module:
    """The folder as transformers alone loads it quantized by `config`, as a peft user would:
    on the session's device, in float32. The BERT folder has no pooler, so it is built without
    one (transformers would start its weights at random inside a quantized layer that
    cannot run them)."""
    options = {"add_pooling_layer": False} if family == "bert" else {}
    model = AUTO[family].from_pretrained(
        folder, quantization_config=config, device_map={"": DEVICE}, dtype=torch.float32, **options
    )
    return model.eval()


def outputs(model: torch.nn.Module, family: str, batch: dict) -> torch.Tensor:
    """An LM's logits, an encoder's last hidden states (a Hugging Face model or a PeftModel)."""
    out = model(**batch)
    return out.logits if family == "llama" else out.last_hidden_state


def add_random_slot(bank: ModuleBank, seed: int, kind: str | None = None) -> int:
    """A frozen slot whose every tensor (up-projections too) is random and non-zero, checked to
    keep its trained values exactly once frozen: its dtype is the compute dtype, never that of a
    quantized layer's packed or int8 weight."""
    slot = bank.add_slot(seed, kind=kind)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    trained = {k: v.detach().clone() for k, v in bank.slot_state(slot).items()}
    bank.freeze_slot()
    frozen = bank.slot_state(slot)
    for key, value in trained.items():
        assert frozen[key].dtype == torch.float32 and torch.equal(frozen[key], value), key
    bank.backbone.eval()
    return slot


# ---------------------------------------------------------------- LoRA against peft


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_quantized_layers_gives_pefts_outputs(folders, family, bits):
    backbone = quantized_backbone(folders[family], bits)
    bank = ModuleBank(backbone, "lora", KIND_CONFIGS["lora"])
    sites = bank.sites
    assert {id(site.base_layer) for site in sites.values()} == {
        id(layer) for layer in quantized_layers(backbone.model)
    }  # every quantized layer is wrapped, and nothing else
    assert all(type(site.base_layer) is layer_kind(bits) for site in sites.values())

    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=sorted(sites), init_lora_weights=False
    )
    torch.manual_seed(1)  # init_lora_weights=False: B random, so the delta matters
    quantization = Quantization(bits).hf_config(torch.float32)  # the config ours loaded with
    theirs_model = peft.get_peft_model(hf_quantized(folders[family], family, quantization), config)
    state = {}
    for name in sites:
        layer = theirs_model.base_model.model.get_submodule(name)
        assert type(layer.base_layer) is layer_kind(bits)  # peft's bitsandbytes LoRA layer
        state[f"{name}.lora_A"] = layer.lora_A["default"].weight.detach()
        state[f"{name}.lora_B"] = layer.lora_B["default"].weight.detach()
        state[f"{name}.scale"] = torch.tensor(layer.scaling["default"])
    slot = bank.load_slot(state)

    batch = backbone.collate(backbone.encode(TEXTS[family]).items)
    with torch.no_grad():
        with bank.use_slot(slot):
            ours = outputs(backbone.model, family, batch)
        with bank.base_only():
            bare = outputs(backbone.model, family, batch)
        theirs = outputs(theirs_model.eval(), family, batch)
    dtype = torch.float32 if bits == 4 else torch.float16  # why: the module docstring
    assert_close(ours, theirs, dtype)
    assert (ours - bare).abs().max() > 100 * tolerance(dtype)["atol"]  # the LoRA did act


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_an_adapter_on_a_quantized_layer_adds_its_plain_recomputation(folders, family, bits):
    backbone = quantized_backbone(folders[family], bits)
    bank = ModuleBank(backbone, "adapter", KIND_CONFIGS["adapter"])
    slot = add_random_slot(bank, seed=1)
    generator = torch.Generator().manual_seed(0)
    assert len(bank.sites) == 4  # houlsby: after attention and after the FFN, in two layers
    with bank.use_slot(slot):
        for name, site in bank.sites.items():
            assert type(site.base_layer) is layer_kind(bits), name
            x = torch.randn(2, 5, site.d_in, generator=generator).to(DEVICE)
            out = site.base_layer(x)  # the quantized layer alone: (2, 5, d_out)
            t = site.stack.slot(slot)
            hidden = F.gelu(out @ t["adapter_down"].T + t["adapter_down_bias"])  # (2, 5, r)
            expected = out + t["scale"] * (hidden @ t["adapter_up"].T + t["adapter_up_bias"])
            # one layer, one input: the quantized output is the same call on both sides
            assert_close(site(x), expected, torch.float32)
            assert (expected - out).abs().max() > 0.1  # the adapter did act


# ---------------------------------------------------------------- kinds mixed per row


def _per_row(backbone, bank: ModuleBank, family: str, rows: list[int], slots: list[int]):
    """Rows `rows` of the family's texts in one batch, each on its slot (-1: none): an
    encoder's pooled states (B, d), an LM's summed log-probabilities of a target (B,)."""
    texts = [TEXTS[family][i] for i in rows]
    routed = torch.tensor([[slots[i]] for i in rows]), torch.ones(len(rows), 1)
    with torch.no_grad(), bank.route(*routed):
        if family == "bert":
            return backbone.embed(backbone.collate(backbone.encode(texts).items))
        targets = backbone.encode_targets(
            ["apple", "fox crow", "yes", "no of", "plum", "red", "crow", "of of"]
        )
        prompts = backbone.encode(texts).items
        return backbone.target_logprobs(prompts, [targets[i] for i in rows])[0]


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_kinds_mixed_per_row_on_a_quantized_backbone_equal_each_row_alone(
    folders, family, quantization
):
    bits, settings = QUANTIZATIONS[quantization]
    backbone = quantized_backbone(folders[family], bits, **settings)
    bank = ModuleBank(backbone, "lora", configs=KIND_CONFIGS)
    slots = [add_random_slot(bank, seed, kind) for seed, kind in enumerate(KINDS)] + [-1]
    assert bank.slot_kinds == KINDS
    rows = list(range(len(slots)))

    mixed = _per_row(backbone, bank, family, rows, slots)
    alone = torch.cat([_per_row(backbone, bank, family, [row], slots) for row in rows])
    assert_close(mixed, alone, torch.float32)  # each row quantized alone: see NO_OUTLIERS
    bare = _per_row(backbone, bank, family, rows, [-1] * len(rows))
    assert_close(mixed[-1], bare[-1], torch.float32)  # the row on no slot is the bare model's
    for row in rows[:-1]:
        assert not torch.allclose(mixed[row], bare[row], atol=1e-3), KINDS[row]  # each acted
    if family == "llama":  # and greedy decoding with the KV cache, row by row
        items = backbone.encode(TEXTS[family]).items
        routing = torch.tensor(slots)[:, None], torch.ones(len(slots), 1)
        together, each = generated_together_and_alone(backbone, bank, items, *routing, 4)
        assert together == each


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_reach_only_the_trainable_slot_through_quantized_layers(folders, bits):
    backbone = quantized_backbone(folders["bert"], bits)
    bank = ModuleBank(backbone, "lora", KIND_CONFIGS["lora"])
    add_random_slot(bank, seed=1)  # an earlier task's frozen slot, routed beside the new one
    slot = bank.add_slot(seed=2)
    batch = backbone.collate(backbone.encode(TEXTS["bert"]).items)
    # a random direction: the sum of a LayerNorm's outputs hardly depends on its input
    direction = torch.randn(backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    direction = direction.to(DEVICE)
    backbone.train()  # as a training loop runs it (LLM.int8 has a training path of its own)
    try:
        with bank.route(torch.tensor([[0, slot]] * len(TEXTS["bert"]))):
            (backbone.embed(batch) @ direction).sum().backward()
    finally:
        backbone.eval()
    trainable = {id(p) for p in bank.trainable_parameters()}
    assert {id(p) for p in backbone.parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)
    # B starts at zero, so B alone has a gradient at step 0: in the first layer too, reached
    # back through the second layer's quantized matmuls
    for name, site in bank.sites.items():
        assert site.stack.trainable["lora_B"].grad.abs().sum() > 0, name
        weight = site.base_layer.weight  # packed 4-bit or int8: no float to train
        assert weight.grad is None and not weight.is_floating_point(), name


@dataclass(frozen=True)
class QuantizedRun:
    """A finished run on a 4-bit backbone, its directory and the task its exports hold."""

    learner: ContinualLearner
    run: Path
    base: Path  # the full-precision model folder the run quantized at load
    exported: str
    before: dict[str, torch.Tensor] | None = None  # the frozen model's state before training


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen model's tensors as bitsandbytes stores them (packed 4-bit weights with their
    absmax, quantization maps and nested statistics; every unquantized tensor), without the
    slots' stacks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".stack." not in k}


@pytest.fixture(scope="module")
def encoder_run(folders, tmp_path_factory) -> QuantizedRun:
    """Two word tasks learned on the tiny BERT quantized to 4 bits by the config, per_task LoRA,
    routed by a Mahalanobis router; the state of the quantized model taken before training."""
    config = LearnerConfig(
        router="mahalanobis",
        train=FAST_TRAIN,
        backbone=BackboneConfig(
            name=str(folders["bert"]),
            max_length=32,
            device=DEVICE,
            dtype="float32",
            quantize="4bit",
        ),
    )
    run = tmp_path_factory.mktemp("encoder-run") / "run"
    learner = ContinualLearner(config=config, run_dir=run)
    before = frozen_state(learner.backbone.model)
    for name in ("colors", "animals"):
        learner.learn(word_task(name))
    learner.finish()
    return QuantizedRun(learner, run, folders["bert"], "animals", before)


def test_training_on_a_4bit_backbone_learns_and_leaves_its_weights_bit_identical(encoder_run):
    learner = encoder_run.learner
    assert learner.backbone.quantization == Quantization(4)
    assert learner.config.backbone.quantize == "4bit"
    written = json.loads((encoder_run.run / "config.json").read_text(encoding="utf-8"))
    assert written["model"]["quantization"] == FOUR_BIT
    assert written["config"]["backbone"]["quantize"] == "4bit"

    for record in learner.records:
        loss = record["loss_curve"]["loss"]
        assert sum(loss[-4:]) / 4 < 0.95 * sum(loss[:4]) / 4, record["name"]  # the loss fell
    report = learner.report
    final, initial = report["accuracy_matrix"]["oracle"][-1], report["initial_accuracy"]
    for name, after, before in zip(report["task_names"], final, initial, strict=True):
        assert after > 0.8 and after > before + 0.3, name  # chance: 1/3

    layers = quantized_layers(learner.backbone.model)
    assert len(layers) == 12 and all(layer.weight.dtype == torch.uint8 for layer in layers)
    after = frozen_state(learner.backbone.model)
    assert after.keys() == encoder_run.before.keys()
    assert any(k.endswith("weight.absmax") for k in after)  # the 4-bit statistics are compared
    for key, value in after.items():
        assert value.dtype == encoder_run.before[key].dtype, key
        assert torch.equal(value, encoder_run.before[key]), key


# ---------------------------------------------------------------- routing


def test_a_router_reads_the_quantized_models_frozen_features(encoder_run, folders):
    learner = encoder_run.learner
    router = learner.router
    assert router.name == "mahalanobis"
    written = json.loads((encoder_run.run / "report.json").read_text(encoding="utf-8"))
    assert written["routing_accuracy"] == learner.report["routing_accuracy"]
    assert min(written["routing_accuracy"][-1]) >= 0.9  # both tasks routed (chance: 1/2)

    plain = quantized_backbone(folders["bert"], 4)  # the same quantized model, with no slot
    for index, state in enumerate(learner.learned.values()):
        inputs = state.task.train_inputs  # what the router was fitted on
        with torch.no_grad():
            expected = plain.embed(plain.collate(plain.encode(inputs).items), router.layers)
        assert expected.shape == (len(inputs), 64)  # "auto": both layers side by side
        assert_close(learner.features(inputs, router.layers), expected, torch.float32)
        assert_close(router.stats.means[index], expected.mean(dim=0), torch.float32)


def test_a_quantized_run_loads_back_quantized_and_predicts_the_same(encoder_run):
    learner = encoder_run.learner
    loaded = ContinualLearner.load(encoder_run.run)
    assert loaded.backbone.quantization == Quantization(4)
    assert len(quantized_layers(loaded.backbone.model)) == 12
    texts = TEXTS["bert"]
    assert loaded.predict_details(texts) == learner.predict_details(texts)
    assert loaded.predict(texts, task="colors") == learner.predict(texts, task="colors")


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def generative_run(folders, tmp_path_factory) -> QuantizedRun:
    """A label-scored and a generation task learned on the tiny Llama quantized to 4 bits."""
    config = LearnerConfig.from_dict(
        {
            "strategy": "per_task",
            "module": "lora",
            "train": {"epochs": 2, "batch_size": 6, "lr": 2e-2, "warmup": 0.0},
            "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"max_new_tokens": 3},
            "backbone": {
                "name": str(folders["llama"]),
                "max_length": 32,
                "device": DEVICE,
                "dtype": "float32",
                "quantize": "4bit",
            },
        }
    )
    run = tmp_path_factory.mktemp("generative-run") / "run"
    learner = ContinualLearner(config=config, run_dir=run)
    for task in lm_word_tasks():
        learner.learn(task)
    learner.finish()
    return QuantizedRun(learner, run, folders["llama"], "fruit")  # slot 1


def export(run: QuantizedRun, format: str, out: Path):
    args = ["export", "--run", str(run.run), "--task", run.exported, "--format", format]
    return CliRunner().invoke(app, [*args, "--out", str(out)])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_export_loads_onto_the_same_quantized_base_with_the_runs_outputs(
    request, family, tmp_path
):
    run = request.getfixturevalue({"llama": "generative_run", "bert": "encoder_run"}[family])
    out = tmp_path / "peft"
    result = export(run, "peft", out)
    assert result.exit_code == 0, result.output

    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["quantization"]["describe"] == FOUR_BIT == info["backbone"]["quantization"]
    arguments = info["quantization"]["bitsandbytes_config"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True" in readme

    # the recorded settings rebuild the run's quantized base
    base = hf_quantized(run.base, family, BitsAndBytesConfig(**arguments))
    model = peft.PeftModel.from_pretrained(base, out).eval()
    wrapped = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped and all(type(m.base_layer) is layer_kind(4) for m in wrapped)
    learner = run.learner
    batch = learner.backbone.collate(learner.backbone.encode(TEXTS[family]).items)
    with torch.no_grad():
        with learner.use_task(run.exported):
            ours = outputs(learner.backbone.model, family, batch)
        with learner.bank.base_only():
            bare = outputs(learner.backbone.model, family, batch)
        theirs = outputs(model, family, batch)
    assert_close(theirs, ours, torch.float32)  # 4-bit: see the module docstring
    assert (ours - bare).abs().max() > 100 * tolerance(torch.float32)["atol"]  # the LoRA acted


def test_a_merged_export_of_a_quantized_run_is_refused_naming_the_quantization(
    generative_run, tmp_path
):
    out = tmp_path / "merged"
    result = export(generative_run, "merged", out)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert f"quantized {FOUR_BIT}: a merged export is refused" in message
    assert "--format peft" in message and "Traceback" not in result.output
    assert not out.exists()
