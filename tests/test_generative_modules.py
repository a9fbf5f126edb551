"""LoRA and adapters on the generative families: Llama, Qwen2, GPT-2 (transformers' Conv1D) and T5.

Tiny float32 models built from configs (`backbones.tiny`); the kinds inject into a stand-in whose
`.model` is the Hugging Face model, so these tests need no Backbone. peft is the oracle for LoRA:
our sites holding a peft model's weights give its logits, one slot or one slot per row.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import DEVICE, assert_close

from continual_peft.backbones.tiny import SPECIAL, tiny_model
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import Routing
from continual_peft.modules.adapter import Adapter
from continual_peft.modules.lora import LoRA
from continual_peft.modules.lowrank import LowRankSite

peft = pytest.importorskip("peft")

ARCHITECTURES = ("llama", "qwen2", "gpt2", "t5")
VOCAB, R, ALPHA = 50, 4, 8.0
# Our targets -> peft's `target_modules` (None: peft's default for the family).
TARGETS = {"default": (["query", "value"], None), "all-linear": (["all-linear"], "all-linear")}


def _model(architecture: str) -> torch.nn.Module:
    return tiny_model(architecture, VOCAB, seed=0).float().to(DEVICE)


def _inputs(architecture: str, rows: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(len(SPECIAL), VOCAB, (rows, 7), generator=generator)}
    if architecture == "t5":
        batch["decoder_input_ids"] = torch.randint(
            len(SPECIAL), VOCAB, (rows, 5), generator=generator
        )
    return {k: v.to(DEVICE) for k, v in batch.items()}


@torch.no_grad()
def _logits(model: torch.nn.Module, architecture: str, **kwargs) -> torch.Tensor:
    return model(**_inputs(architecture), **kwargs).logits


def _peft_model(base: torch.nn.Module, architecture: str, target_modules, adapters: list[str]):
    """A copy of `base` with peft LoRA adapters named `adapters`, random A and (non-zero) B."""

    def config():
        return peft.LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            target_modules=target_modules,
            init_lora_weights=False,
            fan_in_fan_out=architecture == "gpt2",  # Conv1D stores its weight (in, out)
        )

    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), config(), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config())
    return model.eval()


def _peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _load_peft_slots(sites: dict, peft_model, adapters: list[str]) -> None:
    """Each peft adapter becomes one frozen slot (in order) of every site."""
    layers = _peft_layers(peft_model)
    assert set(sites) == set(layers) and sites  # our targets resolve to peft's layers
    for name, site in sites.items():
        layer = layers[name]
        for adapter in adapters:
            site.load_slot(
                {
                    "lora_A": layer.lora_A[adapter].weight.detach(),  # (r, d_in)
                    "lora_B": layer.lora_B[adapter].weight.detach(),  # (d_out, r)
                    "scale": torch.tensor(layer.scaling[adapter]),
                }
            )


def _stand_in(model: torch.nn.Module) -> SimpleNamespace:
    """What a module kind's `inject` reads of a backbone: its model and compute dtype."""
    return SimpleNamespace(model=model, dtype=torch.float32)


def _lora(model: torch.nn.Module, targets: list[str], routing: Routing) -> dict:
    kind = LoRA(r=R, alpha=ALPHA, dropout=0.0, targets=targets)
    return kind.inject(_stand_in(model), routing)


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_holding_peft_weights_gives_peft_logits(architecture, targets):
    ours, peft_targets = TARGETS[targets]
    model = _model(architecture)
    base = _logits(model, architecture)
    peft_model = _peft_model(model, architecture, peft_targets, ["task"])
    routing = Routing()
    sites = _lora(model, ours, routing)
    _load_peft_slots(sites, peft_model, ["task"])
    routing.single = 0
    logits = _logits(model, architecture)
    assert_close(logits, _logits(peft_model, architecture), torch.float32)
    assert not torch.allclose(logits, base, atol=1e-3)  # LoRA did act
    assert "lm_head" not in sites and not isinstance(model.lm_head, LowRankSite)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_mixed_batch_matches_peft_adapter_names(architecture):
    model = _model(architecture)
    peft_model = _peft_model(model, architecture, None, ["task_a", "task_b"])
    routing = Routing()
    _load_peft_slots(_lora(model, ["query", "value"], routing), peft_model, ["task_a", "task_b"])
    indices = torch.tensor([[0], [1], [-1]])  # one slot per row; the last row none
    scale = torch.full(indices.shape, ALPHA / R)
    resolved = Routing.rows(indices, torch.ones(indices.shape), scale)
    routing.indices, routing.weights = resolved.indices.to(DEVICE), resolved.weights.to(DEVICE)
    mixed = _logits(model, architecture)
    theirs = _logits(peft_model, architecture, adapter_names=["task_a", "task_b", "__base__"])
    assert_close(mixed, theirs, torch.float32)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_lora_wraps_an_adapter_site_on_gpt2_conv1d():
    """Two kinds on one Conv1D: LoRA (all-linear) wraps the adapter sites on both c_proj."""
    model = _model("gpt2")
    peft_model = _peft_model(model, "gpt2", "all-linear", ["task"])
    adapter_routing, lora_routing = Routing(), Routing()
    adapters = Adapter(placement="houlsby").inject(_stand_in(model), adapter_routing)
    sites = _lora(model, ["all-linear"], lora_routing)
    mlp_out = sites["transformer.h.0.mlp.c_proj"]
    assert mlp_out.base_layer is adapters["transformer.h.0.mlp.c_proj"]
    assert (mlp_out.d_out, mlp_out.d_in) == (64, 256)
    _load_peft_slots(sites, peft_model, ["task"])
    lora_routing.single = 0
    assert_close(_logits(model, "gpt2"), _logits(peft_model, "gpt2"), torch.float32)
    for site in adapters.values():
        site.load_slot(_trained_looking(site))
    adapter_routing.single = 0
    assert not torch.allclose(_logits(model, "gpt2"), _logits(peft_model, "gpt2"), atol=1e-3)


# --- adapters ------------------------------------------------------------------------------------

_DECODER_ONLY = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
}
_DECODER_ONLY["qwen2"] = _DECODER_ONLY["llama"]
_T5_ATTENTION = (
    "encoder.block.{i}.layer.0.SelfAttention.o",
    "decoder.block.{i}.layer.0.SelfAttention.o",
    "decoder.block.{i}.layer.1.EncDecAttention.o",
)
_T5_FFN = (
    "encoder.block.{i}.layer.1.DenseReluDense.wo",
    "decoder.block.{i}.layer.2.DenseReluDense.wo",
)


def _expected(architecture: str, placement: str) -> set[str]:
    """The layers a placement wraps in a two-layer tiny model."""
    if architecture == "t5":
        names = _T5_FFN + (_T5_ATTENTION if placement == "houlsby" else ())
    else:
        attention, ffn = _DECODER_ONLY[architecture]
        names = (attention, ffn) if placement == "houlsby" else (ffn,)
    return {name.format(i=i) for name in names for i in range(2)}


def _trained_looking(site: LowRankSite) -> dict[str, torch.Tensor]:
    """A fresh slot's tensors with a random up-projection and bias, as after training."""
    generator = torch.Generator().manual_seed(3)
    fresh = site.init(generator, site)
    fresh["adapter_up"] = 0.1 * torch.randn(fresh["adapter_up"].shape, generator=generator)
    fresh["adapter_up_bias"] = 0.1 * torch.randn(site.d_out, generator=generator)
    return fresh


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_adapter_placements_wrap_the_expected_layers(architecture, placement):
    model = _model(architecture)
    sites = Adapter(placement=placement).inject(_stand_in(model), Routing())
    assert set(sites) == _expected(architecture, placement)
    kind = "Conv1D" if architecture == "gpt2" else "Linear"
    assert all(type(site.base_layer).__name__ == kind for site in sites.values())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_fresh_adapter_leaves_logits_bit_identical_and_a_trained_one_changes_them(architecture):
    model = _model(architecture)
    base = _logits(model, architecture)
    routing = Routing()
    sites = Adapter(placement="houlsby").inject(_stand_in(model), routing)
    for site in sites.values():
        site.add_slot(torch.Generator().manual_seed(2))
        site.freeze_slot()
        site.load_slot(_trained_looking(site))
    routing.single = 0
    assert torch.equal(_logits(model, architecture), base)
    routing.single = 1
    assert not torch.allclose(_logits(model, architecture), base, atol=1e-3)


# --- errors --------------------------------------------------------------------------------------


def test_no_match_names_the_conv1d_endings_on_gpt2():
    with pytest.raises(ContinualPeftError) as info:
        _lora(_model("gpt2"), ["dense"], Routing())
    message = str(info.value)
    assert "no nn.Linear layer matches targets ['dense'] (nor any Conv1D layer)" in message
    assert "lm_head (nn.Linear); c_attn, c_fc, c_proj (Conv1D)" in message
    assert "or use ['all-linear']" in message


def test_an_adapter_placement_without_its_layers_names_every_family():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ContinualPeftError) as info:
        Adapter(placement="houlsby").inject(_stand_in(model), Routing())
    message = str(info.value)
    assert "GPT-2 'h.N.attn.c_proj' / 'h.N.mlp.c_proj'" in message
    assert "T5 'SelfAttention.o'" in message and "Sequential has none" in message
