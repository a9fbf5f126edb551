"""The frozen generative backbones' shared part: a language model that scores and writes text.

A generative backbone (`CausalBackbone`: decoder-only; `Seq2SeqBackbone`: encoder-decoder) reads
a prompt (a task's template filled with the input, `Task.prompt`) and serves three things, all
through whatever module slots the bank has routed each row to:

- `target_logprobs(prompts, targets)`: the log-likelihood of each row's target tokens after
  its prompt, summed, and the number of target tokens. Label scoring compares these over a
  task's label strings; training minimises `target_loss` (the mean cross-entropy of the gold
  target's tokens; the prompt's tokens are never scored).
- `generate(prompts, max_new_tokens)`: greedy decoding with `transformers`' `generate` and its
  KV cache; every row keeps its routed slots through every decoding step.
- `embed(batch, layers)`: the routers' frozen features, the mean of the hidden states over the
  prompt's real tokens at the depths of a router's `layers` setting (`backbones.features`),
  side by side (for an encoder-decoder, the encoder's).

Targets are tokenized as `target_delimiter + target` without special tokens, then the EOS token
is appended (so a generated answer ends, and label scores tell "yes" from "yes sir"). Prompts
longer than `max_length` tokens are cut from the LEFT (the end of a prompt, where a template puts
its question, is kept) and counted. A tokenizer without a pad token pads with its EOS token
(masks, not pad ids, decide what is read); one with neither is refused.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from continual_peft.backbones.features import states_upto
from continual_peft.backbones.text import Backbone, pad_rows, position_limit
from continual_peft.errors import ContinualPeftError


class LanguageModelBackbone(Backbone):
    """A frozen `transformers` language model with its tokenizer (see the module docstring).

    Args: as `Backbone`; `model` is an `AutoModelForCausalLM` or `AutoModelForSeq2SeqLM`.
    """

    kind = "language model"  # not a family of its own: the subclasses are
    padding_side = "right"
    target_delimiter = ""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = 128,
        name: str = "custom",
        device: str | None = None,
        dtype: str = "auto",
    ) -> None:
        _check_special_tokens(tokenizer, name)
        tokenizer.padding_side = self.padding_side
        tokenizer.truncation_side = "left"  # keep a prompt's end, where its question is
        super().__init__(
            model, tokenizer, max_length=max_length, name=name, device=device, dtype=dtype
        )
        self.cache_hooks: list = []  # (rows, dtype) -> (cache, present (B,), N) or None
        taken = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in taken
        # transformers renamed `past_key_values` to `cache` (5.x); older versions know only it
        self._cache_key = "cache" if "cache" in taken else "past_key_values"

    @property
    def position_limit(self) -> int | None:
        """The most positions the model reads (its position embeddings, or the tokenizer's
        stated maximum when lower; for seq2seq, what the decoder reads); None for relative
        positions (T5)."""
        return position_limit(self.model, self.tokenizer)

    def check_room(self, tokens: int, what: str, fix: str) -> None:
        """Refuse `tokens` positions after a prompt of `max_length` (and any virtual tokens;
        for seq2seq, after the decoder's start token) beyond `position_limit`, naming `what`
        needs them and `fix`."""
        limit = self.position_limit
        hooks = [*self.input_hooks, *self.cache_hooks]
        virtual = sum(getattr(hook, "num_virtual_tokens", 0) for hook in hooks)
        if self.kind == "causal":
            before = self.max_length + virtual
            said = f"a prompt of up to max_length {self.max_length}"
            said += f" + {virtual} virtual tokens" if virtual else ""
        else:
            before, said = 1, "the decoder's start token"
        if limit is not None and before + tokens > limit:
            raise ContinualPeftError(
                f"{what}: {said} + {tokens} tokens exceeds the {limit} positions backbone "
                f"{self.name!r} reads; {fix}"
            )

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def encode_targets(self, targets: list[str], where: str = "label") -> list[list[int]]:
        """Token ids of each target: `target_delimiter + target`, then EOS.

        Raises:
            ContinualPeftError: A target with no tokens of its own (empty, or only characters
                the tokenizer drops).
        """
        ids = self.tokenizer(
            [self.target_delimiter + t for t in targets], add_special_tokens=False
        )["input_ids"]
        empty = next((i for i, row in enumerate(ids) if not row), None)
        if empty is not None:
            raise ContinualPeftError(
                f"{where} {targets[empty]!r} has no tokens for this backbone's tokenizer "
                f"({self.name}): it cannot be scored or generated; give it some text"
            )
        return [[*row, self.eos_id] for row in ids]

    def decode(self, ids: list[int]) -> str:
        """Generated token ids as text, up to (without) the first EOS, stripped."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def add_cache_hook(self, hook) -> None:
        """Let a module kind fill the key/value cache before the prompt (prefix tuning)."""
        self.cache_hooks.append(hook)

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """The model's inputs for a collated prompt batch, after the input hooks (virtual
        tokens) and the cache hooks (a prefix): `input_ids` or `inputs_embeds`,
        `attention_mask` (prefix columns first), `position_ids` (numbered over each row's
        attended positions: left padding does not shift them, a prefix does),
        `past_key_values` with a prefix, `added` (positions the input hooks put in front) and
        `prefix` (cache positions before the prompt)."""
        mask = batch["attention_mask"]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        inputs: dict = {"input_ids": batch["input_ids"], "added": 0, "prefix": 0}
        if self.input_hooks:
            embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))  # (B, L, d)
            for hook in self.input_hooks:
                embeds, mask, positions, extra = hook(embeds, mask, positions)
                inputs["added"] += extra
            inputs["inputs_embeds"] = embeds
        for hook in self.cache_hooks:
            served = hook(mask.shape[0], self.dtype)
            if served is not None:
                cache, present, n = served
                columns = present[:, None].expand(-1, n).to(mask.dtype)  # (B, N)
                mask = torch.cat([columns, mask], dim=1)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, n:]
                inputs |= {self._cache_key: cache, "prefix": n}
        return inputs | {"attention_mask": mask, "position_ids": positions}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) last hidden states of the prompt's tokens (the encoder's, for seq2seq)."""
        inputs = self.inputs({"input_ids": input_ids, "attention_mask": attention_mask})
        added = inputs.pop("added")
        inputs.pop("prefix")
        return self.prompt_states(inputs).last_hidden_state[:, added:]

    def layer_states(
        self, batch: dict[str, torch.Tensor], upto: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The prompt's states (the encoder's, for seq2seq) after the embeddings (0) and each
        block (1..n), each (B, L, d); with `upto`, those at depths 0..upto only, from a pass
        that stops there (`backbones.features.states_upto`)."""
        inputs = self.inputs(batch)
        added = inputs.pop("added")
        inputs.pop("prefix")
        depth = self.block_count if upto is None else upto
        states = states_upto(
            lambda: self.prompt_states(inputs | {"output_hidden_states": True}), self.blocks, depth
        )
        return tuple(h[:, added:] for h in states)

    def prompt_states(self, inputs: dict[str, torch.Tensor]):
        """The model output whose `last_hidden_state` holds the prompt's states."""
        raise NotImplementedError

    def target_logprobs(
        self, prompts: list[list[int]], targets: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the summed log-probability (float32) of its target's tokens after its
        prompt, and how many tokens the target has: two (B,) tensors. Gradients flow when
        enabled."""
        raise NotImplementedError

    def target_loss(self, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean cross-entropy over every target token of the batch (the prompt is masked out),
        as a 0-dim float32 tensor: the training loss of generative tasks."""
        logprobs, counts = self.target_logprobs(prompts, targets)
        return -logprobs.sum() / counts.sum()

    def generation_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`generate`'s inputs for a prompt batch (ids, or embeddings with virtual tokens)."""
        inputs = self.inputs(batch)
        inputs.pop("added")
        inputs.pop("position_ids")  # generate numbers positions from the mask, as `inputs`
        n = inputs.pop("prefix")
        if n:  # generate reads the cache as the first N positions of its input: stand-ins
            if "input_ids" in inputs:
                ids = inputs["input_ids"]
                inputs["input_ids"] = torch.cat([ids.new_full((len(ids), n), self.pad_id), ids], 1)
            else:
                embeds = inputs["inputs_embeds"]
                inputs["inputs_embeds"] = torch.cat(
                    [embeds.new_zeros(len(embeds), n, embeds.shape[2]), embeds], 1
                )
        return inputs

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: at most `max_new_tokens` new token ids per row
        (up to and without EOS), with `transformers`' `generate` and its KV cache."""
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise ContinualPeftError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        batch = self.collate(prompts)
        inputs = self.generation_inputs(batch)
        start = self.model.generation_config.decoder_start_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            decoder_start_token_id=start,
        )
        out = self.model.generate(**inputs, generation_config=config)
        width = inputs["attention_mask"].shape[1] - batch["input_ids"].shape[1]  # + N, + virtual
        new = self.new_tokens(out, batch["input_ids"].shape[1] + width, "input_ids" in inputs)
        rows = []
        for ids in new.tolist():
            rows.append(ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids)
        return rows

    def new_tokens(self, out: torch.Tensor, prompt_width: int, from_ids: bool) -> torch.Tensor:
        """The generated part of `generate`'s output."""
        raise NotImplementedError

    def lm_logits(self, inputs: dict, keep: int) -> torch.Tensor:
        """The last `keep` positions' logits (B, keep, V) of a causal forward on `inputs`."""
        if self._keeps_logits:
            return self.model(**inputs, logits_to_keep=keep).logits[:, -keep:]
        return self.model(**inputs).logits[:, -keep:]


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities (B,) of `targets` (B, m) under `logits` (B, m, V) where `mask`
    (B, m) is 1, in float32, and the counts (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, m)
    weights = mask.to(picked.dtype)
    return (picked * weights).sum(dim=1), weights.sum(dim=1)


def padded_targets(
    backbone: Backbone, targets: list[list[int]], right_aligned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m) target ids (pad 0) and mask, aligned to the right or the left, on the device."""
    ids, mask = pad_rows(targets, 0, left=right_aligned)
    return backbone.placement.put(ids), backbone.placement.put(mask)


def _check_special_tokens(tokenizer, name: str) -> None:
    """Pad with EOS when the tokenizer has no pad token; refuse one without either."""
    if tokenizer.eos_token_id is None:
        raise ContinualPeftError(
            f"backbone {name!r}: its tokenizer has no EOS token, which ends every target and "
            "every generated answer; set one (tokenizer.eos_token = ..., or add it with "
            "tokenizer.add_special_tokens) and save the tokenizer again"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks decide what is read, not pad ids
