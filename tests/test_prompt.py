"""The prompt kind: virtual tokens prepended per row, masked for rows without a prompt, and peft's
prompt tuning reproduced from its weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, assert_close, tiny_bert

from continual_peft import Backbone, ContinualPeftError, ModuleBank
from continual_peft.modules.lora import LoRAConfig
from continual_peft.modules.prompt import PromptConfig

N = 4
TEXTS = ("red apple car", "a dog sleeps at home today", "sad", "the blue bird")


def _batch(backbone, texts=TEXTS):
    return backbone.collate(backbone.encode(list(texts)).items)


def _prompt_bank(backbone, slots: int = 3, seed: int = 0) -> ModuleBank:
    """A bank of frozen prompt slots at the scale of the word embeddings (so they act)."""
    bank = ModuleBank(backbone, "prompt", PromptConfig(num_virtual_tokens=N))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(slots):
        bank.load_slot({"prompt.embedding": 0.05 * torch.randn(N, 32, generator=generator)})
    return bank


def _alone(backbone, bank, text: str, slot: int) -> torch.Tensor:
    """Hidden states of one text run by itself on `slot` (-1 = bare backbone), shape (L, d)."""
    context = bank.base_only() if slot < 0 else bank.use_slot(slot)
    with torch.no_grad(), context:
        return backbone(**_batch(backbone, [text]))[0]


def _assert_rows_equal_alone(backbone, bank, out, batch, slots) -> None:
    for row, slot in enumerate(slots):
        length = int(batch["attention_mask"][row].sum())
        alone = _alone(backbone, bank, TEXTS[row], slot)
        assert_close(out[row, :length], alone)


def test_routing_off_is_bit_identical_to_the_bare_backbone(make_backbone):
    backbone = make_backbone()
    batch = _batch(backbone)
    with torch.no_grad():
        bare = backbone(**batch)  # no hook yet: the input_ids path
    bank = _prompt_bank(backbone)
    site = bank.sites["prompt"]
    embeds, mask = torch.randn(4, 7, 32), torch.ones(4, 7, dtype=torch.long)
    positions = torch.arange(7).expand(4, 7)
    with bank.base_only():
        out_embeds, out_mask, out_positions, added = site(embeds, mask, positions)
        assert added == 0 and out_embeds is embeds and out_mask is mask
        assert out_positions is positions
        with torch.no_grad():
            hooked = backbone(**batch)  # the inputs_embeds path, hook adding nothing
    assert torch.equal(hooked, bare)


def test_one_hot_mixed_batch_equals_each_row_alone(make_backbone):
    backbone = make_backbone()
    bank = _prompt_bank(backbone)
    batch = _batch(backbone)
    slots = [2, 0, -1, 1]
    with torch.no_grad(), bank.route(torch.tensor(slots)):
        out = backbone(**batch)
    _assert_rows_equal_alone(backbone, bank, out, batch, slots)
    with torch.no_grad():
        base = backbone.model(**_batch(backbone, [TEXTS[2]])).last_hidden_state[0]
    assert_close(out[2, : len(base)], base)
    bare = _alone(backbone, bank, TEXTS[0], -1)
    assert not torch.allclose(out[0, : len(bare)], bare, atol=1e-3)  # the prompt did act


def test_lora_and_prompt_rows_share_one_forward(make_backbone):
    backbone = make_backbone()
    prompt_config = {"prompt": PromptConfig(num_virtual_tokens=N)}
    bank = ModuleBank(backbone, "lora", LoRAConfig(dropout=0.0), configs=prompt_config)
    lora_slot = bank.add_slot(seed=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for site in bank.sites.values():
            site.stack.trainable["lora_B"].copy_(torch.randn_like(site.stack.trainable["lora_B"]))
    bank.freeze_slot()
    prompt_slot = bank.add_slot(seed=2, kind="prompt")
    bank.freeze_slot()
    batch = _batch(backbone, TEXTS[:2])
    slots = [lora_slot, prompt_slot]
    with torch.no_grad(), bank.route(torch.tensor(slots)):
        out = backbone(**batch)
    _assert_rows_equal_alone(backbone, bank, out, batch, slots)

    # The LoRA row equals that LoRA on a backbone where the prompt kind was never injected.
    other = make_backbone()
    lora_only = ModuleBank(other, "lora", LoRAConfig(dropout=0.0))
    lora_only.load_slot(bank.slot_state(lora_slot))
    assert other.input_hooks == []
    with torch.no_grad(), lora_only.use_slot(0):
        expected = other(**_batch(other, [TEXTS[0]]))[0]
    assert_close(out[0, : len(expected)], expected)
    for row in range(2):  # both modules did act
        bare = _alone(backbone, bank, TEXTS[row], -1)
        assert not torch.allclose(out[row, : len(bare)], bare, atol=1e-3)


def test_soft_mixing_is_the_weight_normalised_average_of_prompts(make_backbone):
    backbone = make_backbone()
    bank = _prompt_bank(backbone, slots=2)
    p1, p2 = (bank.slot_state(s)["prompt.embedding"] for s in (0, 1))
    mixed_slot = bank.load_slot({"prompt.embedding": 0.3 * p1 + 0.7 * p2})
    batch = _batch(backbone, TEXTS[:2])
    indices = torch.tensor([[0, 1], [0, -1]])
    weights = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    with torch.no_grad(), bank.route(indices, weights):
        out = backbone(**batch)
    # Row 1: half its weight on "no module" does not dilute slot 0's prompt.
    _assert_rows_equal_alone(backbone, bank, out, batch, [mixed_slot, 0])


def test_prompt_matches_peft_prompt_tuning(tokenizer):
    peft = pytest.importorskip("peft")
    base = tiny_bert(tokenizer)
    peft_config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    weight = peft_model.prompt_encoder["default"].embedding.weight.detach()  # (N, d)
    with torch.no_grad():
        weight.mul_(0.05)  # peft's RANDOM init is N(0, 1); bring it to the embeddings' scale

    backbone = Backbone(base, tokenizer, max_length=32, device=DEVICE)
    bank = ModuleBank(backbone, "prompt", PromptConfig(num_virtual_tokens=N))
    slot = bank.load_slot({"prompt.embedding": weight})
    batch = _batch(backbone, TEXTS[:2])
    with torch.no_grad(), bank.use_slot(slot):
        ours = backbone(**batch)
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state
    assert theirs.shape[1] == N + batch["input_ids"].shape[1]
    assert_close(ours, theirs[:, N:])
    assert not torch.allclose(ours, base(**batch).last_hidden_state, atol=1e-3)  # prompt acted


def test_only_the_trainable_prompt_gets_gradients(make_backbone):
    backbone = make_backbone()
    bank = _prompt_bank(backbone, slots=1)
    slot = bank.add_slot(seed=3)
    batch = _batch(backbone, TEXTS[:2])
    with bank.route(torch.tensor([[slot, 0], [slot, -1]]), torch.tensor([[0.5, 0.5], [1, 0]])):
        backbone.embed(batch).sum().backward()
    (prompt,) = bank.trainable_parameters()
    assert prompt.shape == (N, 32) and prompt.grad.abs().sum() > 0
    requiring = [p for p in backbone.parameters() if p.requires_grad]
    assert [id(p) for p in requiring] == [id(prompt)]
    assert all(p.grad is None for p in backbone.model.parameters())


@pytest.mark.parametrize("init", ["vocab", "normal"])
def test_fresh_slot_init_is_seeded_and_at_the_embeddings_scale(make_backbone, init):
    def fresh(seed: int) -> torch.Tensor:
        bank = ModuleBank(make_backbone(), "prompt", PromptConfig(num_virtual_tokens=N, init=init))
        return bank.slot_state(bank.add_slot(seed=seed))["prompt.embedding"]

    vocab = make_backbone().model.get_input_embeddings().weight
    first = fresh(5)
    assert torch.equal(first, fresh(5)) and not torch.equal(first, fresh(6))
    assert first.std() < 3 * vocab.std()
    if init == "vocab":  # every row is some token's embedding
        assert all((vocab == row).all(dim=1).any() for row in first)


def test_bad_settings_are_refused(make_backbone):
    with pytest.raises(ContinualPeftError, match="unknown prompt init 'zeros'; valid names"):
        ModuleBank(make_backbone(), "prompt", PromptConfig(init="zeros"))
    with pytest.raises(ContinualPeftError, match="exceed the backbone's 64 positions"):
        ModuleBank(make_backbone(max_length=60), "prompt", PromptConfig(num_virtual_tokens=10))
    bank = ModuleBank(make_backbone(), "prompt", PromptConfig(num_virtual_tokens=N))
    with pytest.raises(ContinualPeftError, match=r"has shape \(5, 32\), this bank needs \(4, 32\)"):
        bank.load_slot({"prompt.embedding": torch.zeros(5, 32)})
