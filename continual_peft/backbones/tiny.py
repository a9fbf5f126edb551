"""Tiny generative models and word-level tokenizers built from configs: no download, no weights.

For the tests, `examples/generative.py` and the CPU benchmarks: a decoder-only (Llama, Qwen2,
GPT-2) or encoder-decoder (T5) model with random weights a few layers deep, and a tokenizer whose
vocabulary is a given word list (one token per word, punctuation split off). Saved to a folder
with `save_tiny` (Llama, GPT-2, T5), they load like any local model
(`Backbone.from_pretrained(folder)`).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
ARCHITECTURES = ("llama", "qwen2", "gpt2", "t5")
PUNCTUATION = (":", ",", ".", "?", "!", "-", "=", ">")


def word_tokenizer(words: list[str]):
    """A fast tokenizer with one token per word of `words` (plus `SPECIAL` and `PUNCTUATION`),
    splitting on whitespace and punctuation; any other word is `<unk>`. Pad `<pad>` (id 0),
    BOS `<s>`, EOS `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL, *PUNCTUATION, *words]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def tiny_config(architecture: str, vocab_size: int, hidden_size: int = 64, layers: int = 2):
    """A `transformers` config of `architecture` ("llama", "qwen2", "gpt2", "t5"), tiny."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, T5Config

    heads, ffn = 4, 2 * hidden_size
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if architecture in ("llama", "qwen2"):
        kind = LlamaConfig if architecture == "llama" else Qwen2Config
        return kind(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **ids,
        )
    if architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            **ids,
        )
    if architecture == "t5":
        return T5Config(
            vocab_size=vocab_size,
            d_model=hidden_size,
            d_kv=hidden_size // heads,
            d_ff=ffn,
            num_layers=layers,
            num_heads=heads,
            decoder_start_token_id=0,
            **ids,
        )
    raise ValueError(f"unknown tiny architecture {architecture!r}; one of {ARCHITECTURES}")


def tiny_model(architecture: str, vocab_size: int, seed: int = 0, **sizes: int):
    """A randomly initialised tiny language model (`AutoModelForCausalLM` for the decoder
    families, `AutoModelForSeq2SeqLM` for T5), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_config(architecture, vocab_size, **sizes)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if architecture == "t5" else AutoModelForCausalLM
    return auto.from_config(config).eval()


def save_tiny(folder: str | Path, architecture: str, words: list[str], seed: int = 0) -> Path:
    """Build a tiny model and its word tokenizer, save both to `folder`; returns the folder.

    Not for "qwen2": transformers 5 loads a Qwen2 folder's tokenizer as its own BPE
    `Qwen2Tokenizer`, which cannot read the word-level vocabulary; build a tiny Qwen2 in
    memory instead (`tiny_model` + `word_tokenizer`, then `CausalBackbone(model, tokenizer)`).

    Raises:
        ValueError: For "qwen2" (above) or an unknown architecture.
    """
    if architecture == "qwen2":
        raise ValueError(
            "save_tiny cannot save a usable qwen2 folder (transformers loads its tokenizer as "
            "Qwen2Tokenizer); build it in memory: CausalBackbone(tiny_model('qwen2', ...), "
            "word_tokenizer(words))"
        )
    folder = Path(folder)
    tokenizer = word_tokenizer(words)
    model = tiny_model(architecture, len(tokenizer), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
