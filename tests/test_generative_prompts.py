"""Prompt tuning on generative backbones against peft, under left padding, and the module kinds
a generative backbone refuses."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, generated_together_and_alone

from continual_peft import CausalBackbone, ContinualPeftError, ModuleBank, Seq2SeqBackbone
from continual_peft.backbones.tiny import tiny_model, word_tokenizer
from continual_peft.modules.prompt import PromptConfig

WORDS = ["red", "blue", "green", "apple", "plum", "fox", "crow", "of", "Input", "Output"]
N = 4  # virtual tokens


def lm_backbone(architecture: str):
    tokenizer = word_tokenizer(WORDS)
    model = tiny_model(architecture, len(tokenizer))
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone
    return kind(model, tokenizer, max_length=32, device=DEVICE, dtype="float32")


def peft_prompt_model(architecture: str, seed: int = 1):
    """peft's prompt tuning on a copy of the same tiny model, with a random prompt."""
    from peft import PromptTuningConfig, get_peft_model

    task_type = "SEQ_2_SEQ_LM" if architecture == "t5" else "CAUSAL_LM"
    model = tiny_model(architecture, len(word_tokenizer(WORDS))).to(DEVICE)
    # on T5, virtual tokens before the encoder's input only (peft's default adds N more to
    # the decoder's: num_transformer_submodules=2)
    config = PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=N, num_transformer_submodules=1
    )
    peft_model = get_peft_model(model, config).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    return peft_model, table.detach().clone()


def ours_with(backbone, prompt: torch.Tensor) -> ModuleBank:
    bank = ModuleBank(backbone, "prompt", configs={"prompt": PromptConfig(num_virtual_tokens=N)})
    bank.load_slot({"prompt.embedding": prompt.cpu()}, "prompt")
    return bank


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_causal_prompt_tuning_gives_pefts_logits_even_under_left_padding(architecture):
    backbone = lm_backbone(architecture)
    peft_model, prompt = peft_prompt_model(architecture)
    bank = ours_with(backbone, prompt)
    texts = ["Input: red of apple Output:", "blue", "fox of crow"]
    items = backbone.encode(texts).items
    batch = backbone.collate(items)  # left-padded: rows 1 and 2 are shorter
    with torch.no_grad(), bank.use_slot(0):
        inputs = backbone.inputs(batch)
        added = inputs.pop("added")
        ours = backbone.model(**inputs).logits[:, added:]  # (B, L, V) on the real columns
    for row, ids in enumerate(items):  # peft, one row at a time: no padding at all
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.tensor([ids], device=DEVICE)).logits[0, N:]
        torch.testing.assert_close(ours[row, -len(ids) :], theirs, atol=1e-5, rtol=1e-5)


def test_seq2seq_prompt_tuning_gives_pefts_logits():
    backbone = lm_backbone("t5")
    peft_model, prompt = peft_prompt_model("t5")
    bank = ours_with(backbone, prompt)
    items = backbone.encode(["Input: red of apple Output:"]).items
    targets = backbone.encode_targets(["plum fox"])
    with torch.no_grad(), bank.use_slot(0):
        summed, _ = backbone.target_logprobs(items, targets)
        labels = torch.tensor(targets, device=DEVICE)
        out = peft_model(input_ids=torch.tensor(items, device=DEVICE), labels=labels)
    # peft's loss is the mean token cross-entropy of the same target: -summed / tokens
    torch.testing.assert_close(
        -summed / len(targets[0]), out.loss.float().reshape(1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_prompted_generation_keeps_each_rows_prompt(architecture):
    """Rows with and without a prompt slot in one generate call equal each row alone."""
    backbone = lm_backbone(architecture)
    _, prompt = peft_prompt_model("llama" if architecture != "t5" else "t5")
    bank = ours_with(backbone, prompt * 3)
    items = backbone.encode(["red of apple", "Input: blue Output:", "fox"]).items
    slots = torch.tensor([[0], [-1], [0]], device="cpu")
    weights = torch.ones(3, 1, device="cpu")
    together, alone = generated_together_and_alone(backbone, bank, items, slots, weights, 5)
    assert together == alone


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_prompt_pool_refuses_a_generative_backbone_and_prefix_a_seq2seq_one(architecture):
    backbone = lm_backbone(architecture)
    if architecture == "t5":
        with pytest.raises(ContinualPeftError, match="prefix.*seq2seq.*T5ForConditionalGeneration"):
            ModuleBank(backbone, "prefix")
    with pytest.raises(ContinualPeftError, match=f"{backbone.kind}"):
        ModuleBank(lm_backbone(architecture), "prompt_pool")


def peft_prefix(architecture: str, seed: int = 1):
    """peft's prefix tuning (CAUSAL_LM) on a copy of the tiny model, random prefix; and that
    prefix in our layout (layers, 2, N, kv width)."""
    from peft import PrefixTuningConfig, get_peft_model

    model = tiny_model(architecture, len(word_tokenizer(WORDS))).to(DEVICE)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    peft_model = get_peft_model(model, config).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight  # (N, layers·2·kv width)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    layers = model.config.num_hidden_layers
    return peft_model, table.detach().view(N, layers, 2, -1).permute(1, 2, 0, 3).clone()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_causal_prefix_tuning_gives_pefts_logits_and_generates_per_row(architecture):
    from continual_peft.modules.prefix import PrefixConfig

    backbone = lm_backbone(architecture)
    peft_model, prefix = peft_prefix(architecture)
    bank = ModuleBank(backbone, "prefix", configs={"prefix": PrefixConfig(num_virtual_tokens=N)})
    bank.load_slot({"prefix.prefix": prefix.cpu()}, "prefix")
    items = backbone.encode(["Input: red of apple Output:", "blue", "fox of crow"]).items
    with torch.no_grad(), bank.use_slot(0):
        inputs = backbone.inputs(backbone.collate(items))  # left-padded
        inputs.pop("added"), inputs.pop("prefix")
        ours = backbone.model(**inputs).logits
    for row, ids in enumerate(items):  # peft, one row at a time: no padding
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.tensor([ids], device=DEVICE)).logits[0]
        torch.testing.assert_close(ours[row, -len(ids) :], theirs, atol=1e-5, rtol=1e-5)
    slots, weights = torch.tensor([[0], [-1], [0]], device="cpu"), torch.ones(3, 1, device="cpu")
    together, alone = generated_together_and_alone(backbone, bank, items, slots, weights, 4)
    with bank.base_only():
        bare = backbone.generate(items[1:2], 4)
    assert together == alone and together[1] == bare[0]  # no prefix: the bare model's text
