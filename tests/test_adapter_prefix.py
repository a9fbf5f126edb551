"""Bottleneck adapters and prefix tuning in the ModuleBank, alone and mixed with LoRA."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, run_routed
from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model

from continual_peft import Backbone, ContinualPeftError, ModuleBank
from continual_peft.modules import Routing, adapter
from continual_peft.modules.adapter import AdapterConfig
from continual_peft.modules.lowrank import LowRankSite
from continual_peft.modules.prefix import PrefixConfig, extend_mask

TEXTS = ("red apple car", "a dog sleeps at home today again", "sad", "blue fish jumps")


# Banks are built on `make_backbone().eval()`: the bank gives new sites the Backbone's mode, and a
# prefix site passes it on to the attention it wraps (attention dropout).


def _batch(backbone, texts=TEXTS):
    return backbone.collate(backbone.encode(list(texts)).items)


def _add_random_slot(bank: ModuleBank, seed: int, kind: str | None = None) -> int:
    """A frozen slot whose every tensor (up-projections too) is random and non-zero."""
    slot = bank.add_slot(seed, kind=kind)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    bank.freeze_slot()
    bank.backbone.eval()  # a wrapped layer must not start in training mode (LoRA's dropout)
    return slot


def _each_row_alone(bank: ModuleBank, slots: list[int]) -> torch.Tensor:
    rows = []
    for text, slot in zip(TEXTS, slots, strict=True):
        batch = _batch(bank.backbone, [text])
        with bank.base_only() if slot < 0 else bank.use_slot(slot):
            rows.append(bank.backbone.embed(batch))
    return torch.cat(rows)


def _routed(bank: ModuleBank, indices, weights=None) -> torch.Tensor:
    weights = None if weights is None else torch.tensor(weights)
    with bank.route(torch.tensor(indices), weights):
        return bank.backbone.embed(_batch(bank.backbone))


def _adapter_bank(make_backbone, placement: str, **kw) -> ModuleBank:
    return ModuleBank(make_backbone().eval(), "adapter", AdapterConfig(placement=placement, **kw))


# --- adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@torch.no_grad()
def test_fresh_adapter_slot_is_bit_identical(make_backbone, placement):
    bank = _adapter_bank(make_backbone, placement, activation="gelu")
    batch = _batch(bank.backbone)
    with bank.base_only():
        base = bank.backbone.embed(batch)
    slot = bank.add_slot(seed=1)
    with bank.use_slot(slot):
        assert torch.equal(bank.backbone.embed(batch), base)


def test_placement_picks_the_right_output_projections(make_backbone):
    ffn = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    attention = ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    assert sorted(_adapter_bank(make_backbone, "pfeiffer").sites) == ffn
    assert sorted(_adapter_bank(make_backbone, "houlsby").sites) == sorted(ffn + attention)
    site = _adapter_bank(make_backbone, "pfeiffer").sites[ffn[0]]
    assert site.stack.adapter_down.shape == (0, 2, 32)  # hidden 32 // reduction_factor 16
    site = _adapter_bank(make_backbone, "pfeiffer", bottleneck=5).sites[ffn[0]]
    assert site.stack.adapter_up.shape == (0, 32, 5)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@torch.no_grad()
def test_adapter_mixed_batch_equals_each_row_alone(make_backbone, placement):
    bank = _adapter_bank(make_backbone, placement)
    first, second = _add_random_slot(bank, 1), _add_random_slot(bank, 2)
    slots = [second, -1, first, second]
    mixed = _routed(bank, slots)
    assert_close(mixed, _each_row_alone(bank, slots))
    with bank.base_only():
        base = bank.backbone.embed(_batch(bank.backbone))
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)  # the slots really do something


def _adapter_site(activation: torch.nn.Module) -> LowRankSite:
    torch.manual_seed(0)
    site = LowRankSite(
        base_layer=torch.nn.Linear(6, 5),
        routing=Routing(),
        rank=3,
        names=adapter.NAMES,
        init=None,
        on_output=True,
        activation=activation,
    )
    for _ in range(3):
        shapes = {"adapter_down": (3, 5), "adapter_up": (5, 3)}
        shapes |= {"adapter_down_bias": (3,), "adapter_up_bias": (5,), "scale": ()}
        site.load_slot({name: torch.randn(shape) for name, shape in shapes.items()})
    return site


@pytest.mark.parametrize("activation", [torch.nn.ReLU(), torch.nn.GELU(), torch.nn.Tanh()])
@torch.no_grad()
def test_adapter_soft_mixing_is_the_weighted_sum_of_deltas(activation):
    site = _adapter_site(activation)
    x = torch.randn(2, 4, 6)
    base = site.base_layer(x)
    d0 = run_routed(site, x, [[0], [0]]) - base
    d2 = run_routed(site, x, [[2], [2]]) - base
    t = site.stack.slot(2)
    by_hand = activation(base @ t["adapter_down"].T + t["adapter_down_bias"]) @ t["adapter_up"].T
    torch.testing.assert_close(d2, (by_hand + t["adapter_up_bias"]) * t["scale"])
    mixed = run_routed(site, x, [[0, 2], [2, -1]], [[0.3, 0.7], [0.5, 0.5]])
    torch.testing.assert_close(mixed[0], base[0] + 0.3 * d0[0] + 0.7 * d2[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], base[1] + 0.5 * d2[1], atol=1e-6, rtol=0)
    assert torch.equal(run_routed(site, x, [[-1], [-1]]), base)


def test_adapter_gradients_reach_only_the_trainable_slot(make_backbone):
    bank = _adapter_bank(make_backbone, "houlsby")
    _add_random_slot(bank, 1)
    slot = bank.add_slot(seed=2)
    with bank.use_slot(slot):
        bank.backbone.embed(_batch(bank.backbone)).sum().backward()
    assert all(p.grad is None for p in bank.backbone.model.parameters() if not p.requires_grad)
    trainable = {id(p) for p in bank.trainable_parameters()}
    assert {id(p) for p in bank.backbone.parameters() if p.requires_grad} == trainable
    assert len(trainable) == 4 * len(bank.sites)
    # The up-projection starts at zero, so at step 0 only it (and its bias) gets a gradient.
    assert all(s.stack.trainable["adapter_up"].grad.abs().sum() > 0 for s in bank.sites.values())


def test_adapter_config_errors_name_the_valid_choices(make_backbone, tokenizer):
    with pytest.raises(ContinualPeftError, match="activation 'swishy'; valid names: gelu, "):
        AdapterConfig(activation="swishy")
    with pytest.raises(ContinualPeftError, match="placement 'middle'; valid: houlsby, pfeiffer"):
        AdapterConfig(placement="middle")
    distil = DistilBertModel(
        DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64
        )
    )
    with pytest.raises(ContinualPeftError, match="placement 'pfeiffer' needs.*DistilBertModel"):
        ModuleBank(Backbone(distil, tokenizer, device=DEVICE), "adapter")


# --- prefix --------------------------------------------------------------------------------------


def _prefix_bank(make_backbone, slots: int = 2, attention: str = "sdpa") -> ModuleBank:
    backbone = make_backbone().eval()
    backbone.model.set_attn_implementation(attention)  # sdpa passes a bool mask, eager a float one
    bank = ModuleBank(backbone, "prefix", PrefixConfig(num_virtual_tokens=3))
    for seed in range(slots):
        _add_random_slot(bank, seed + 1)
    return bank


@torch.no_grad()
def test_prefix_routing_off_is_the_unwrapped_model(make_backbone):
    plain = make_backbone().eval()
    bank = _prefix_bank(make_backbone)
    assert sorted(bank.sites) == [
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    ]
    with bank.base_only():
        assert torch.equal(bank.backbone.embed(_batch(plain)), plain.embed(_batch(plain)))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_prefix_mixed_batch_equals_each_row_alone_and_minus_one_is_the_base(
    make_backbone, attention
):
    bank = _prefix_bank(make_backbone, attention=attention)
    slots = [1, -1, 0, 1]
    mixed = _routed(bank, slots)
    assert_close(mixed, _each_row_alone(bank, slots))
    with bank.base_only():
        base = bank.backbone.embed(_batch(bank.backbone))
    assert_close(mixed[1], base[1])
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)
    # weight 0 means no prefix, like -1
    zero = _routed(bank, [[0], [0], [0], [0]], [[1.0], [0.0], [1.0], [1.0]])
    assert_close(zero[1], base[1])


def test_every_mask_format_extends_to_the_same_mask():
    padding = torch.tensor([[1, 1, 0], [1, 1, 1]])  # flash attention gets this (B, L) mask
    allowed = padding.bool()[:, None, None, :].expand(2, 1, 3, 3)  # sdpa: True = attend
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)  # eager
    keep = torch.tensor([False, True])  # row 0 has no prefix
    expected = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()  # 2 prefix + 3 real
    for mask in (padding, allowed, additive):
        attends = extend_mask(mask, keep, prefix=2, length=3, dtype=torch.float32) == 0
        assert torch.equal(attends.expand(2, 1, 3, 5), expected[:, None, None].expand(2, 1, 3, 5))
    # no padding anywhere
    no_mask = extend_mask(None, keep, prefix=2, length=3, dtype=torch.bfloat16)
    assert no_mask.dtype == torch.bfloat16
    assert torch.equal((no_mask == 0)[:, 0, 0], torch.tensor([[0, 0, 1, 1, 1], [1] * 5]).bool())


@torch.no_grad()
def test_prefix_soft_mixing_equals_the_average_prefix(make_backbone):
    bank = _prefix_bank(make_backbone)
    first, second = bank.slot_state(0), bank.slot_state(1)
    average = bank.load_slot({k: (first[k] + second[k]) / 2 for k in first})
    mixed = _routed(bank, [[0, 1]] * len(TEXTS), [[0.5, 0.5]] * len(TEXTS))
    with bank.use_slot(average):
        expected = bank.backbone.embed(_batch(bank.backbone))
    assert_close(mixed, expected)


@torch.no_grad()
def test_fresh_prefix_changes_the_output(make_backbone):
    bank = ModuleBank(make_backbone().eval(), "prefix")
    batch = _batch(bank.backbone)
    with bank.base_only():
        base = bank.backbone.embed(batch)
    with bank.use_slot(bank.add_slot(seed=0)):
        assert not torch.allclose(bank.backbone.embed(batch), base, atol=1e-4)


def _gpt2_backbone(tokenizer) -> Backbone:
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2)
    return Backbone(GPT2Model(config), tokenizer, device=DEVICE)


def test_prefix_refuses_a_non_bert_attention(tokenizer):
    with pytest.raises(
        ContinualPeftError, match="BERT-family .*self-attention.*GPT2Model has none"
    ):
        ModuleBank(_gpt2_backbone(tokenizer), "prefix")
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2)
    distil = Backbone(DistilBertModel(config), tokenizer, device=DEVICE)  # q_lin/k_lin/v_lin
    with pytest.raises(ContinualPeftError, match="DistilBertModel has none"):
        ModuleBank(distil, "prefix")


def test_training_moves_only_the_prefix_and_the_head(make_backbone):
    bank = ModuleBank(make_backbone(), "prefix", PrefixConfig(num_virtual_tokens=4))
    slot = bank.add_slot(seed=0)
    head = torch.nn.Linear(32, 2)
    start = {k: v.clone() for k, v in bank.slot_state(slot).items()}
    optimizer = torch.optim.Adam([*bank.trainable_parameters(), *head.parameters()], lr=1e-2)
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        with bank.use_slot(slot):
            logits = head(bank.backbone.embed(_batch(bank.backbone)))
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert all(p.grad is None for p in bank.backbone.model.parameters() if not p.requires_grad)
    assert {id(p) for p in bank.backbone.parameters() if p.requires_grad} == {
        id(p) for p in bank.trainable_parameters()
    }
    assert all(not torch.equal(v, start[k]) for k, v in bank.slot_state(slot).items())


# --- all kinds in one bank -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adapter", "prefix"])
@torch.no_grad()
def test_slot_state_round_trips_into_a_fresh_bank(make_backbone, kind):
    bank = ModuleBank(make_backbone().eval(), kind)
    slot = _add_random_slot(bank, 3)
    other = ModuleBank(make_backbone().eval(), kind)
    loaded = other.load_slot(bank.slot_state(slot))
    with bank.use_slot(slot), other.use_slot(loaded):
        assert torch.equal(
            bank.backbone.embed(_batch(bank.backbone)), other.backbone.embed(_batch(other.backbone))
        )


@torch.no_grad()
def test_lora_adapter_and_prefix_rows_in_one_forward(make_backbone):
    bank = ModuleBank(make_backbone().eval(), "lora", configs={"adapter": AdapterConfig("houlsby")})
    slots = [_add_random_slot(bank, 1), _add_random_slot(bank, 2, "adapter")]
    slots += [_add_random_slot(bank, 3, "prefix"), -1]
    assert bank.slot_kinds == ["lora", "adapter", "prefix"]
    mixed = _routed(bank, slots)
    assert_close(mixed, _each_row_alone(bank, slots))
    with bank.base_only():
        base = bank.backbone.embed(_batch(bank.backbone))
    assert_close(mixed[3], base[3])
    assert all(not torch.allclose(mixed[i], base[i], atol=1e-3) for i in range(3))


@pytest.mark.parametrize("targets", [["query", "value"], ["c_attn"], ["all-linear"]])
def test_lora_on_gpt2_wraps_its_conv1d_layers(tokenizer, targets):
    """GPT-2 projects with transformers' Conv1D: every spelling of its targets reaches them
    (the default query/value through the fused c_attn)."""
    from continual_peft.modules.lora import LoRAConfig

    bank = ModuleBank(_gpt2_backbone(tokenizer), "lora", LoRAConfig(targets=targets))
    ends = {name.rsplit(".", 1)[-1] for name in bank.sites}
    assert "c_attn" in ends and "lm_head" not in ends
