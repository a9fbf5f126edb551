"""The ModuleBank with LoRA: a frozen backbone, zero-initialised slots, the routed forward."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, run_routed, tolerance

from continual_peft import ContinualPeftError, ModuleBank
from continual_peft.modules import MODULE_KINDS, Routing, lora
from continual_peft.modules.lora import LoRAConfig
from continual_peft.modules.lowrank import LowRankSite


def _batch(backbone, texts=("red apple car", "a dog sleeps at home today", "sad")):
    return backbone.collate(backbone.encode(list(texts)).items)


def test_backbone_is_frozen(make_backbone):
    backbone = make_backbone()
    ModuleBank(backbone, "lora")
    frozen = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert frozen == []


def test_bundled_minilm_loads_offline_and_frozen(monkeypatch):
    from continual_peft import Backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = Backbone.from_pretrained(max_length=16, device=DEVICE)
    assert backbone.hidden_size == 384
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.encode(["word " * 40]).truncated == 1


def test_fresh_slot_is_bit_identical(make_backbone):
    backbone = make_backbone()
    bank = ModuleBank(backbone, "lora", LoRAConfig(targets=["all-linear"]))
    batch = _batch(backbone)
    with torch.no_grad(), bank.base_only():
        base = backbone.embed(batch)
    slot = bank.add_slot(seed=1)
    with torch.no_grad(), bank.use_slot(slot):
        fresh = backbone.embed(batch)
    assert torch.equal(base, fresh)


def test_targets_match_by_suffix_and_unknown_target_is_refused(make_backbone):
    bank = ModuleBank(make_backbone(), "lora")
    assert sorted({n.rsplit(".", 1)[-1] for n in bank.sites}) == ["query", "value"]
    assert len(ModuleBank(make_backbone(), "lora", LoRAConfig(targets=["all-linear"])).sites) == 12
    with pytest.raises(ContinualPeftError, match="no nn.Linear layer matches"):
        ModuleBank(make_backbone(), "lora", LoRAConfig(targets=["nonexistent"]))


def test_unknown_module_kind_lists_valid_names(make_backbone):
    expected = f"unknown module kind 'bogus'; valid names: {', '.join(MODULE_KINDS.names())}"
    with pytest.raises(ContinualPeftError, match=expected):
        ModuleBank(make_backbone(), "bogus")


def test_only_the_trainable_slot_gets_gradients(make_backbone):
    backbone = make_backbone()
    bank = ModuleBank(backbone, "lora")
    bank.add_slot(seed=1)
    bank.freeze_slot()
    slot = bank.add_slot(seed=2)
    with bank.use_slot(slot):
        backbone.embed(_batch(backbone)).sum().backward()
    assert all(p.grad is None for p in backbone.model.parameters() if not p.requires_grad)
    trainable = {id(p) for p in bank.trainable_parameters()}
    requiring = [p for p in backbone.parameters() if p.requires_grad]
    assert {id(p) for p in requiring} == trainable
    # A is kaiming-initialised and B zero, so at step 0 only B has a non-zero gradient.
    assert all(s.stack.trainable["lora_B"].grad.abs().sum() > 0 for s in bank.sites.values())


def _layer(seed: int = 0, slots: int = 3) -> LowRankSite:
    torch.manual_seed(seed)
    layer = LowRankSite(
        base_layer=torch.nn.Linear(6, 5), routing=Routing(), rank=2, names=lora.NAMES, init=None
    )
    for _ in range(slots):
        layer.load_slot(
            {"lora_A": torch.randn(2, 6), "lora_B": torch.randn(5, 2), "scale": torch.tensor(2.0)}
        )
    return layer


def test_gathered_lora_equals_plain_recomputation():
    layer = _layer()
    x = torch.randn(3, 4, 6)
    out = run_routed(layer, x, [[2], [0], [1]])
    for row, slot in enumerate([2, 0, 1]):
        a, b = layer.stack.lora_A[slot], layer.stack.lora_B[slot]
        expected = layer.base_layer(x[row]) + (x[row] @ a.T @ b.T) * (4.0 / 2)
        torch.testing.assert_close(out[row], expected, **tolerance(torch.float32))


def test_soft_mixing_is_the_weighted_sum_of_deltas_and_minus_one_is_no_module():
    layer = _layer()
    x = torch.randn(2, 4, 6)
    base = layer.base_layer(x)
    d0 = run_routed(layer, x, [[0], [0]]) - base
    d2 = run_routed(layer, x, [[2], [2]]) - base
    mixed = run_routed(layer, x, [[0, 2], [2, -1]], [[0.3, 0.7], [0.5, 0.5]])
    torch.testing.assert_close(
        mixed[0], base[0] + 0.3 * d0[0] + 0.7 * d2[0], **tolerance(torch.float32)
    )
    torch.testing.assert_close(mixed[1], base[1] + 0.5 * d2[1], **tolerance(torch.float32))
    none = run_routed(layer, x, [[-1], [-1]])
    assert torch.equal(none, base)


def test_route_refuses_a_missing_slot(make_backbone):
    bank = ModuleBank(make_backbone(), "lora")
    bank.add_slot(seed=0)
    with (
        pytest.raises(ContinualPeftError, match="slot 3 does not exist"),
        bank.route(torch.tensor([0, 3])),
    ):
        pass


def test_site_names_do_not_depend_on_injection_order(make_backbone):
    lora_first = ModuleBank(make_backbone(), "lora")
    prefix_first = ModuleBank(make_backbone(), "prefix")
    prefix_first.add_slot(seed=0, kind="lora")
    assert sorted(prefix_first.kind_sites["lora"]) == sorted(lora_first.sites)
    assert all(".base_layer" not in name for name in prefix_first.kind_sites["lora"])
