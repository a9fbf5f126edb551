"""Prompt tuning: N trainable virtual-token embeddings prepended to a row's input embeddings.

Each slot is one `(N, d)` tensor in a SlotStack (`embedding: (T, N, d)`); N is a kind-level
setting, so every prompt slot of a bank has the same length (loading another length is refused).
The kind registers one input hook on the backbone (`Backbone.add_input_hook`), which edits the
word embeddings, attention mask and position ids of the whole batch before the encoder runs.

- Pooling never sees the virtual tokens: the hook reports the N positions it prepended and
  `Backbone.forward` cuts them from the last hidden states, so `Backbone.pool` averages over the
  caller's own mask of real tokens. The virtual tokens act only through attention.
- Position ids follow peft. peft's `PeftModelForFeatureExtraction` concatenates the prompts to
  `inputs_embeds` and lets the model number positions itself, so the virtual tokens get 0..N-1
  and the real tokens N..N+L-1 (token type 0 everywhere). We pass exactly those ids, so a slot
  holding peft's prompt weights gives peft's hidden states on the real tokens.
- A mixed batch always gets N extra positions (one tensor for the batch), but a row with no
  prompt slot (-1, weight 0, or a slot of another kind) gets mask 0 there and keeps its real
  tokens' position ids unshifted: its real tokens attend to nothing new and sit where they would
  without prompts, so its output equals a run without the prompt kind (up to float rounding).
- Soft mixing: a row's prompt is the weight-normalised average of its k prompt entries,
  `sum_i w_i P_i / sum_i w_i` over its prompt slots. Unlike a LoRA delta, a prompt has no
  "half strength" (a scaled-down embedding is just another prompt), so weight on another kind does
  not dilute it: any positive prompt weight gives the row the full N virtual tokens.
- Routing off (`base_only`) returns the inputs untouched with 0 added positions; for BERT the
  `inputs_embeds` path the backbone then takes is bit-identical to the `input_ids` path.

On an image backbone (`ImageBackbone`) the hook receives the patch tokens after the leading
CLS token(s), with their position embeddings already added, and the virtual tokens go between CLS
and the patches (visual prompt tuning, VPT-shallow); position ids do not apply there. Init
"vocab" draws the tokens of a blank image.

Differences from peft, on purpose: peft cannot mix slots or kinds per row (the masking above is
ours), and peft's "RANDOM" init draws N(0, 1), about 50x the scale of BERT's word embeddings,
which swamps the position and token-type embeddings it is added to; our "normal" init uses the
vocabulary embeddings' own standard deviation instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import MODULE_KINDS
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite

INITS = ("vocab", "normal")


@dataclass
class PromptConfig:
    """Prompt-tuning settings; peft's names where they match."""

    num_virtual_tokens: int = 10  # N virtual tokens per prompt slot (same for every slot)
    init: str = "vocab"  # "vocab": N random tokens' embeddings; "normal": N(0, σ of the vocab)


def prompt_init(config: PromptConfig, table: torch.Tensor) -> Callable[[torch.Generator], dict]:
    """A slot initialiser: `config.init` applied to the token table `table` (V, d)."""

    def init(generator: torch.Generator) -> dict[str, torch.Tensor]:
        weight = table.detach()  # (V, d)
        n = config.num_virtual_tokens
        if config.init == "vocab":  # as peft's SAMPLE_VOCAB
            ids = torch.randint(0, weight.shape[0], (n,), generator=generator, device=CPU)
            return {"embedding": weight[ids.to(weight.device)].float().clone()}
        noise = torch.randn(n, weight.shape[1], generator=generator, device=CPU)
        return {"embedding": noise * weight.float().std().cpu()}

    return init


def prepend_virtual_tokens(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    prompts: torch.Tensor,
    present: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Prepend `prompts` (B, N, d) to a batch, as the input hook returns it (module docstring).

    Rows where `present` (B,) is False get mask 0 on the N virtual tokens and keep their real
    tokens' position ids, so their output equals a run without prompts.
    """
    rows, n = prompts.shape[:2]
    virtual_mask = present[:, None].expand(rows, n).to(mask.dtype)  # (B, N); 0 = no prompt
    virtual_positions = torch.arange(n, device=positions.device).expand(rows, n)  # (B, N)
    shifted = positions + n * present[:, None].to(positions.dtype)  # rows w/o prompt: as-is
    return (
        torch.cat([prompts, embeds], dim=1),  # (B, N + L, d)
        torch.cat([virtual_mask, mask], dim=1),  # (B, N + L)
        torch.cat([virtual_positions, shifted], dim=1),  # (B, N + L)
        n,
    )


def check_position_room(backbone, n: int, setting: str) -> None:
    """Refuse `n` virtual tokens that would push a text backbone past its position embeddings."""
    limit = getattr(backbone.model.config, "max_position_embeddings", None)
    if limit is not None and backbone.max_length + n > limit:
        raise ContinualPeftError(
            f"{n} virtual tokens + max_length {backbone.max_length} exceed the backbone's "
            f"{limit} positions; lower {setting} or max_length"
        )


class PromptSite(StackedSite):
    """Every prompt slot, and the backbone input hook that prepends the routed rows' prompts.

    Args:
        vocab: The backbone's token table (`Backbone.token_table`, (V, d)): its dtype, device
            and width.
        routing: The bank's routing state for the prompt kind.
        num_virtual_tokens: N, the length of every slot's prompt.
        init: Builds a fresh slot's tensors from a generator.
    """

    def __init__(
        self,
        *,
        vocab: torch.Tensor,
        routing: Routing,
        num_virtual_tokens: int,
        init: Callable[[torch.Generator], dict[str, torch.Tensor]],
    ) -> None:
        super().__init__()
        self.routing = routing
        self.num_virtual_tokens = num_virtual_tokens
        self.init = init
        shape = (num_virtual_tokens, vocab.shape[1])
        self.stack = SlotStack({"embedding": shape}, vocab)

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open(self.init(generator))

    def load_slot(self, tensors: dict[str, torch.Tensor], trainable: bool = False) -> None:
        expected = tuple(self.stack.embedding.shape[1:])
        got = tuple(tensors["embedding"].shape) if "embedding" in tensors else None
        if got != expected:
            raise ContinualPeftError(
                f"prompt slot tensor 'embedding' has shape {got}, this bank needs {expected} "
                "(num_virtual_tokens is one setting for all prompt slots of a bank)"
            )
        super().load_slot(tensors, trainable)

    def forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The input hook: prepend each routed row's prompt (see the module docstring)."""
        if self.routing.off:
            return embeds, mask, positions, 0
        rows = embeds.shape[0]
        if self.routing.single is not None:
            prompt = self.stack.slot(self.routing.single)["embedding"].to(embeds.dtype)  # (N, d)
            prompts = prompt.expand(rows, *prompt.shape)  # (B, N, d)
            present = torch.ones(rows, dtype=torch.bool, device=embeds.device)
        else:
            prompts, present = self._mixed(embeds.dtype, rows)
        return prepend_virtual_tokens(embeds, mask, positions, prompts=prompts, present=present)

    def _mixed(self, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's weight-normalised prompt (B, N, d) and whether it has one (B,)."""
        stacked = self.stack.stacked()["embedding"]  # (T, N, d)
        idx, w = self.routing.for_rows(rows)  # (B, k), resolved by the bank
        total = w.sum(dim=1)  # (B,)
        present = total > 0
        w = w / torch.where(present, total, torch.ones_like(total))[:, None]
        prompts = torch.einsum("bk,bknd->bnd", w.to(dtype), stacked[idx].to(dtype))
        return prompts, present


@MODULE_KINDS.register("prompt", options=PromptConfig)
class Prompt:
    """The `prompt` module kind: an input hook on the backbone that prepends virtual tokens."""

    def __init__(self, **options: Any) -> None:
        config = PromptConfig(**options)
        if config.init not in INITS:
            raise ContinualPeftError(
                f"unknown prompt init {config.init!r}; valid names: {', '.join(INITS)}"
            )
        if config.num_virtual_tokens < 1:
            raise ContinualPeftError(
                f"num_virtual_tokens must be at least 1, got {config.num_virtual_tokens}"
            )
        self.config = config

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Register the prompt hook on `backbone` and return `{"prompt": site}`."""
        n = self.config.num_virtual_tokens
        check_position_room(backbone, n, "num_virtual_tokens")
        if "prompt" in dict(backbone.named_children()):
            raise ContinualPeftError("this backbone already has a prompt kind injected")
        table = backbone.token_table()  # word embeddings; for images, a blank image's tokens
        site = PromptSite(
            vocab=table, routing=routing, num_virtual_tokens=n, init=prompt_init(self.config, table)
        )
        # A child of the backbone, like the wrapped-layer sites of other kinds: it follows
        # `backbone.to()` and its trainable slot shows in `backbone.parameters()`.
        backbone.add_module("prompt", site)
        backbone.add_input_hook(site)
        return {"prompt": site}
