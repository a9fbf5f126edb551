"""Decoder-only language models (Llama, Qwen2, Mistral, Gemma, Phi, GPT-2, ...) as frozen backbones.

Padding side: LEFT, for every batch (training, scoring, generation), so each row's last token
sits in the last column and `generate` continues every row from there. Position ids are numbered
over each row's real tokens (`inputs`), so a row's outputs do not depend on how much padding its
batch needs. Prompt tuning puts its virtual tokens before the padding, positions 0..N-1, and
shifts the real tokens' positions by N (as peft's prompt tuning numbers them without padding).
"""

from __future__ import annotations

import torch

from continual_peft.backbones.lm import LanguageModelBackbone, gather_logprobs, padded_targets


class CausalBackbone(LanguageModelBackbone):
    """A frozen `AutoModelForCausalLM` and its tokenizer (see `backbones.lm`)."""

    kind = "causal"
    padding_side = "left"
    target_delimiter = " "  # "Sentiment:" + " positive", as lm-evaluation-harness joins them

    def prompt_states(self, inputs: dict[str, torch.Tensor]):
        return self.model.base_model(**inputs)

    def target_logprobs(
        self, prompts: list[list[int]], targets: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `LanguageModelBackbone.target_logprobs`: one forward over prompt + target,
        left-padded; only the last `m + 1` positions' logits are computed (m: the longest
        target), since every target ends its row."""
        batch = self.collate([p + t for p, t in zip(prompts, targets, strict=True)])
        inputs = self.inputs(batch)
        inputs.pop("added")  # virtual tokens sit in front, outside the kept window
        inputs.pop("prefix")  # a prefix is in the cache, not in the logits
        width = max(len(t) for t in targets)
        logits = self.lm_logits(inputs, keep=width + 1)[:, :-1]  # (B, m, V): next tokens
        ids, mask = padded_targets(self, targets, right_aligned=True)
        return gather_logprobs(logits, ids, mask)

    def new_tokens(self, out: torch.Tensor, prompt_width: int, from_ids: bool) -> torch.Tensor:
        # from ids, generate returns prompt + continuation; from embeddings, the continuation
        return out[:, prompt_width:] if from_ids else out
