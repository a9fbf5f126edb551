"""Our LoRA, given a peft LoRA's weights, reproduces peft's outputs (peft is the test oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, assert_close, tiny_bert

from continual_peft import Backbone, ModuleBank
from continual_peft.modules.lora import LoRAConfig

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("targets", [["query", "value"], ["all-linear"]])
def test_lora_matches_peft(tokenizer, targets):
    base = tiny_bert(tokenizer)
    config = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=targets)
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, init_lora_weights=False
    )
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()

    backbone = Backbone(base, tokenizer, max_length=32, device=DEVICE)
    bank = ModuleBank(backbone, "lora", config)
    state = {}
    for name in bank.sites:
        layer = peft_model.base_model.model.get_submodule(name)
        state[f"{name}.lora_A"] = layer.lora_A["default"].weight.detach()
        state[f"{name}.lora_B"] = layer.lora_B["default"].weight.detach()
        state[f"{name}.scale"] = torch.tensor(layer.scaling["default"])
    assert len(state) == 3 * len(bank.sites) and len(bank.sites) > 0
    slot = bank.load_slot(state)

    batch = backbone.collate(backbone.encode(["a red apple", "the dog sleeps at home"]).items)
    with torch.no_grad(), bank.use_slot(slot):
        ours = backbone(**batch)
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state
    assert_close(ours, theirs)
    assert not torch.allclose(ours, base(**batch).last_hidden_state, atol=1e-3)  # LoRA did act
