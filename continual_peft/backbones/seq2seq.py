"""Encoder-decoder language models (T5, Flan-T5, BART, ...) as frozen backbones.

The prompt goes to the encoder, right-padded; the target is the decoder's sequence, started by
the model's `decoder_start_token_id` and teacher-forced in training and scoring. Prompt tuning
puts its virtual tokens in front of the ENCODER's input (as peft does for SEQ_2_SEQ_LM); the
routers' frozen features are the mean of the encoder's last hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from continual_peft.backbones.features import find_blocks
from continual_peft.backbones.lm import LanguageModelBackbone, gather_logprobs, padded_targets
from continual_peft.errors import ContinualPeftError


class Seq2SeqBackbone(LanguageModelBackbone):
    """A frozen `AutoModelForSeq2SeqLM` and its tokenizer (see `backbones.lm`)."""

    kind = "seq2seq"
    padding_side = "right"
    target_delimiter = ""

    def __init__(self, model, tokenizer, *args, **kwargs) -> None:
        start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            raise ContinualPeftError(
                f"encoder-decoder backbone {type(model).__name__}: its config has no "
                "decoder_start_token_id, the token every answer starts from; set it in "
                "config.json (T5: the pad id, BART: the EOS id) and load it again"
            )
        super().__init__(model, tokenizer, *args, **kwargs)

    @property
    def blocks(self) -> nn.ModuleList | None:
        """The encoder's blocks (`Backbone.blocks`): the features pass reads the encoder."""
        return find_blocks(self.model.get_encoder(), self.block_count)

    def prompt_states(self, inputs: dict[str, torch.Tensor]):
        inputs.pop("position_ids")  # T5's relative positions, BART's own: not taken here
        return self.model.get_encoder()(**inputs)

    def target_logprobs(
        self, prompts: list[list[int]], targets: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `LanguageModelBackbone.target_logprobs`: teacher-forced decoder over each
        target, started by `decoder_start_token_id`."""
        inputs = self.inputs(self.collate(prompts))
        inputs.pop("added")
        inputs.pop("position_ids")
        inputs.pop("prefix")  # never set: the prefix kind refuses encoder-decoder models
        ids, mask = padded_targets(self, targets, right_aligned=False)
        start = torch.full_like(ids[:, :1], self.model.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, ids[:, :-1]], dim=1)  # (B, m): shifted right
        decoder_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        logits = self.model(
            **inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
        ).logits  # (B, m, V)
        return gather_logprobs(logits, ids, mask)

    def new_tokens(self, out: torch.Tensor, prompt_width: int, from_ids: bool) -> torch.Tensor:
        return out[:, 1:]  # after the decoder start token
