"""A shallow features pass: a `layers` setting whose deepest depth k is below the last block runs
the embeddings and blocks 1..k only, and its features equal the full forward's pooled states at
those depths, on every family (BERT, ViT, Llama, Qwen2, GPT-2, T5 and BART's encoders)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import DEVICE, LM_WORDS, assert_close, tiny_lm, tiny_vit

from continual_peft.backbones.features import find_blocks, states_upto
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.seq2seq import Seq2SeqBackbone
from continual_peft.backbones.tiny import word_tokenizer
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.prediction import frozen_features

FAMILIES = ["bert", "vit", "llama", "qwen2", "gpt2", "t5", "bart"]
TEXTS = ["red fox", "blue plum of green crow yes", "apple"]


def _tiny_bart() -> Seq2SeqBackbone:
    """A tiny BART (2 encoder and 2 decoder blocks) over the word tokenizer, built in memory."""
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = word_tokenizer(LM_WORDS)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=3,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    return Seq2SeqBackbone(
        model, tokenizer, max_length=16, name="tiny-bart", device=DEVICE, dtype="float32"
    )


def _family(family: str, make_backbone):
    """A tiny backbone of `family` (two blocks) and a collated batch of three inputs."""
    if family == "bert":
        backbone = make_backbone()
    elif family == "vit":
        backbone = ImageBackbone(tiny_vit(), None, name="tiny-vit", device=DEVICE)
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(8, 8, generator=generator) * 16 for _ in TEXTS]
        return backbone, backbone.collate(backbone.encode(images).items)
    elif family == "bart":
        backbone = _tiny_bart()
    else:
        backbone = tiny_lm(family)
    return backbone, backbone.collate(backbone.encode(TEXTS).items)


def _pooled(backbone, states: tuple[torch.Tensor, ...], depths: list[int], batch) -> torch.Tensor:
    """(B, k·d) the masked means of `states` at `depths`, by hand (images: every token)."""
    mask = batch.get("attention_mask")
    parts = []
    for depth in depths:
        hidden = states[depth].float()  # (B, L, d)
        if mask is None:
            parts.append(hidden.mean(dim=1))
        else:
            weights = mask.unsqueeze(-1).float()  # (B, L, 1)
            parts.append((hidden * weights).sum(dim=1) / weights.sum(dim=1))
    return torch.cat(parts, dim=1)


def _blocks_run(blocks: torch.nn.ModuleList, call) -> list[int]:
    """How often each block finished a forward during `call()`."""
    runs = [0] * len(blocks)
    hooks = [
        block.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        for i, block in enumerate(blocks)
    ]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shallow_pass_equals_the_full_pass_and_runs_only_its_blocks(family, make_backbone):
    backbone, batch = _family(family, make_backbone)
    blocks, n = backbone.blocks, backbone.block_count
    assert blocks is not None and len(blocks) == n == 2
    with torch.no_grad():
        full = backbone.layer_states(batch)
        assert len(full) == n + 1
        for depth in range(n):  # every depth below the last
            found = {}

            def shallow_pass(depth=depth, found=found):
                found["states"] = backbone.layer_states(batch, upto=depth)

            assert _blocks_run(blocks, shallow_pass) == [1] * depth + [0] * (n - depth)
            assert len(found["states"]) == depth + 1
            for d in range(depth + 1):
                assert_close(found["states"][d], full[d])
        for layers in ([0], [1], [0, 1], [1, 0], [-2]):
            depths = backbone.feature_depths(layers)
            assert_close(backbone.embed(batch, layers), _pooled(backbone, full, depths, batch))
        # the last depth runs every block, as before: "auto" (1 and 2 here) and [0, -1]
        assert _blocks_run(blocks, lambda: backbone.embed(batch, "auto")) == [1] * n
        assert_close(backbone.embed(batch, [0, -1]), _pooled(backbone, full, [0, n], batch))


@pytest.mark.parametrize("family", ["bert", "vit"])
@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_a_shallow_pass_sees_the_modules_of_the_full_pass(family, kind, make_backbone):
    """With a slot on (LoRA inside the blocks, or a prompt's virtual tokens in front), the
    shallow pass's states are still the full pass's: the same inputs reach the same blocks."""
    backbone, batch = _family(family, make_backbone)
    bank = ModuleBank(backbone, kind)
    slot = bank.add_slot(seed=1)
    with torch.no_grad():
        for p in bank.trainable_parameters():  # a slot that changes the states
            p.add_(torch.randn_like(p) * 0.5)
        with bank.use_slot(slot):
            full = backbone.layer_states(batch)
            shallow = backbone.layer_states(batch, upto=1)
        with bank.base_only():
            bare = backbone.layer_states(batch, upto=1)
    assert_close(shallow[1], full[1])
    assert not torch.allclose(shallow[1].float(), bare[1].float(), atol=1e-3)


def test_frozen_features_of_a_shallow_setting_are_per_row(make_backbone):
    """The engine's features for `layers = [1]`: each row as if alone, equal to the full pass."""
    backbone = make_backbone()
    bank = ModuleBank(backbone, "lora")
    items = backbone.encode(TEXTS).items
    features = frozen_features(backbone, bank, items, batch_size=3, layers=[1])
    with torch.no_grad():
        for row, item in enumerate(items):
            batch = backbone.collate([item])
            expected = _pooled(backbone, backbone.layer_states(batch), [1], batch)
            assert_close(features[row], expected[0])


def test_blocks_that_cannot_be_told_apart_run_the_whole_forward():
    two = torch.nn.Module()
    two.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    two.norms = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    assert find_blocks(two, 2) is None  # two lists of two: neither is taken
    assert find_blocks(two, 3) is None
    states = tuple(torch.full((1, 1, 1), float(i), device=DEVICE) for i in range(3))
    calls = []

    def forward():
        calls.append(1)
        return SimpleNamespace(hidden_states=states)

    assert states_upto(forward, None, 1) == states[:2] and calls == [1]
