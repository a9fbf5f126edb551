"""An L2P prompt pool (Wang et al. 2022, "Learning to Prompt for Continual Learning").

A slot is a pool of M prompts, each L virtual tokens, and one key per prompt: `prompts:
(T, M, L, d)` and `prompt_keys: (T, M, d)` in a SlotStack. The `l2p` strategy keeps ONE such slot
and trains it on every task (so, as in L2P, prompts can be overwritten: it can forget).

The kind's input hook (`Backbone.add_input_hook`, like the `prompt` kind) does, per row:

1. query = the frozen backbone's mean-pooled feature of the row, the same vector routers see
   (`ContinualLearner.features`). It comes from a second forward of the hook's own inputs straight
   through `backbone.model`, so no input hook runs (no recursion), without gradient and in eval
   mode (no dropout), as L2P queries its frozen ViT. Not cached across batches: one extra frozen
   forward per batch, as in L2P.
2. the N keys of the row's pool most cosine-similar to the query are picked (`select_prompts`,
   most similar first, by `torch.topk`);
3. their N prompts are concatenated in that order and prepended: N·L virtual tokens, with the
   `prompt` kind's masks and position ids (`prepend_virtual_tokens`), so pooling never sees
   them and a row without a pool keeps its bare output.

The hook keeps the last batch's choice (`PromptPoolSite.last`, a `Selection`) for the `l2p`
strategy's key-pull loss, `1 − cos(query, key)` summed over the N selected keys (the only path
by which keys learn: the top-N choice itself has no gradient).

Routing: `base_only` adds nothing; `use_slot` sends every row to that pool; with per-row (or
`use_slots`) routing a row uses the pool of its highest-weight pool entry (a pool has no
"mixture": keys choose the prompts), and a row with no pool entry gets no virtual tokens. The
query is exact when a row's only module is its pool (the usual case: under `use_slot`, and rows
of other kinds are -1 for them); a row routed (k > 1) to a pool AND another kind's slot gets a
query that includes that other slot's delta. Text backbones only: the hook needs the whole token
sequence to recompute the frozen feature, and an image backbone's hook only sees the patches.

Left out of L2P on purpose: the train-time key-frequency penalty ("diversified prompt
selection", optional in the paper) and batch-wise prompt voting at test time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.distributed import shared_mean
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import MODULE_KINDS
from continual_peft.modules.prompt import (
    INITS,
    PromptConfig,
    check_position_room,
    prepend_virtual_tokens,
    prompt_init,
)
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite

# (embeds, mask, position ids) -> (B, d) frozen pooled features of those rows
FrozenFeatures = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PromptPoolConfig:
    """L2P prompt-pool settings; defaults are the paper's M, L and N."""

    pool_size: int = 10  # M prompts (and keys) in the pool
    prompt_length: int = 5  # L virtual tokens per prompt
    top_n: int = 5  # N prompts picked per input (N <= M); N·L virtual tokens are prepended
    init: str = "vocab"  # prompts: "vocab" (random tokens' embeddings) or "normal"; see `prompt`


@dataclass(kw_only=True)
class Selection:
    """The pool's choice for the last batch through the hook: what the key-pull loss needs."""

    query: torch.Tensor  # (B, d) frozen pooled features, no gradient
    keys: torch.Tensor  # (B, N, d) the selected keys; with gradient while the slot trains
    indices: torch.Tensor  # (B, N) selected prompt ids within the row's pool, most similar first
    present: torch.Tensor  # (B,) whether the row went through a pool at all

    def pull(self) -> torch.Tensor:
        """Key-pull distance: Σ_n (1 − cos(query, key_n)), averaged over rows with a pool;
        under torchrun this rank's part of the mean over the whole batch (`shared_mean`)."""
        cos = nn.functional.cosine_similarity(self.query[:, None], self.keys.float(), dim=-1)
        per_row = (1 - cos).sum(dim=1)  # (B,)
        present = self.present.to(per_row.dtype)
        return shared_mean((per_row * present).sum(), present.sum())


def select_prompts(query: torch.Tensor, keys: torch.Tensor, top_n: int) -> torch.Tensor:
    """(B, N) ids of the `top_n` keys most cosine-similar to each query, most similar first.

    Args:
        query: (B, d) queries.
        keys: (M, d) one pool's keys, or (B, M, d) each row's pool's keys.
        top_n: N.
    """
    sim = nn.functional.cosine_similarity(query.float()[:, None], keys.float(), dim=-1)  # (B, M)
    return sim.topk(top_n, dim=1).indices


def _pool_init(config: PromptPoolConfig, table: torch.Tensor) -> Callable[[torch.Generator], dict]:
    """Prompts as `prompt` kind's init of M·L tokens; keys N(0, σ of the vocab) (cosine only
    sees their direction; the scale keeps AdamW steps in proportion)."""
    m, length = config.pool_size, config.prompt_length
    tokens = prompt_init(PromptConfig(num_virtual_tokens=m * length, init=config.init), table)
    scale = table.detach().float().std().cpu()

    def init(generator: torch.Generator) -> dict[str, torch.Tensor]:
        prompts = tokens(generator)["embedding"].reshape(m, length, -1)  # (M, L, d)
        keys = torch.randn(m, table.shape[1], generator=generator, device=CPU) * scale  # (M, d)
        return {"prompts": prompts, "prompt_keys": keys}

    return init


class PromptPoolSite(StackedSite):
    """Every pool slot, and the input hook that prepends each row's top-N prompts.

    Args:
        vocab: The backbone's token table ((V, d)): its dtype, device and width.
        routing: The bank's routing state for this kind.
        config: Pool size, prompt length, N.
        frozen_features: The query of each row of the hook's inputs (see the module docstring).
    """

    def __init__(
        self,
        *,
        vocab: torch.Tensor,
        routing: Routing,
        config: PromptPoolConfig,
        frozen_features: FrozenFeatures,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.config = config
        self.init = _pool_init(config, vocab)
        self.frozen_features = frozen_features
        m, length, d = config.pool_size, config.prompt_length, vocab.shape[1]
        self.stack = SlotStack({"prompts": (m, length, d), "prompt_keys": (m, d)}, vocab)
        self.last: Selection | None = None

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open(self.init(generator))

    def load_slot(self, tensors: dict[str, torch.Tensor], trainable: bool = False) -> None:
        for name in self.stack.names:
            expected = tuple(getattr(self.stack, name).shape[1:])
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != expected:
                raise ContinualPeftError(
                    f"prompt_pool slot tensor {name!r} has shape {got}, this bank needs "
                    f"{expected} (pool_size and prompt_length are one setting for all pools)"
                )
        super().load_slot(tensors, trainable)

    def choose(self, query: torch.Tensor, slot: int) -> torch.Tensor:
        """(B, N) prompt ids that pool `slot` (local index) picks for frozen features `query`."""
        keys = self.stack.slot(slot)["prompt_keys"]
        return select_prompts(query.to(keys.device), keys.detach(), self.config.top_n)

    def forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The input hook (see the module docstring)."""
        self.last = None
        if self.routing.off:
            return embeds, mask, positions, 0
        stacked = self.stack.stacked()
        pool, present = self._row_pools(embeds.shape[0], len(stacked["prompt_keys"]), embeds.device)
        keys = stacked["prompt_keys"][pool]  # (B, M, d)
        query = self.frozen_features(embeds, mask, positions)  # (B, d)
        indices = select_prompts(query, keys, self.config.top_n)  # (B, N)
        chosen = stacked["prompts"][pool[:, None], indices]  # (B, N, L, d)
        rows = torch.arange(len(pool), device=pool.device)[:, None]
        self.last = Selection(
            query=query, keys=keys[rows, indices], indices=indices, present=present
        )
        prompts = chosen.flatten(1, 2).to(embeds.dtype)  # (B, N·L, d)
        return prepend_virtual_tokens(embeds, mask, positions, prompts=prompts, present=present)

    def _row_pools(
        self, rows: int, slots: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's pool (B,) (local slot id; 0 where none) and whether it has one (B,)."""
        if self.routing.single is not None:
            pool = torch.full((rows,), self.routing.single, dtype=torch.long, device=device)
            return pool, torch.ones(rows, dtype=torch.bool, device=device)
        idx, w = self.routing.for_rows(rows)  # (B, k), resolved by the bank
        best = w.argmax(dim=1, keepdim=True)  # (B, 1): the highest-weight pool entry
        return idx.gather(1, best)[:, 0], w.max(dim=1).values > 0


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout); every submodule's own mode comes back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _frozen_features(backbone) -> FrozenFeatures:
    """The query function of a text backbone: the hook's inputs through the bare model."""

    def features(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        with torch.no_grad(), _eval_mode(backbone.model):
            out = backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return backbone.pool(out.last_hidden_state.float(), mask)  # (B, d)

    return features


@MODULE_KINDS.register("prompt_pool", options=PromptPoolConfig)
class PromptPool:
    """The `prompt_pool` kind: an L2P pool of keyed prompts, top-N prepended per input."""

    def __init__(self, **options: Any) -> None:
        config = PromptPoolConfig(**options)
        if config.init not in INITS:
            raise ContinualPeftError(
                f"unknown prompt_pool init {config.init!r}; valid names: {', '.join(INITS)}"
            )
        for name in ("pool_size", "prompt_length", "top_n"):
            if getattr(config, name) < 1:
                raise ContinualPeftError(
                    f"prompt_pool {name} must be at least 1, got {getattr(config, name)}"
                )
        if config.top_n > config.pool_size:
            raise ContinualPeftError(
                f"prompt_pool top_n ({config.top_n}) cannot exceed pool_size ({config.pool_size})"
            )
        self.config = config

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Register the pool's hook on `backbone` and return `{"prompt_pool": site}`."""
        if backbone.kind != "encoder":
            raise ContinualPeftError(
                f"the prompt_pool kind needs a text backbone; {backbone.name} is a "
                f"{backbone.kind} backbone (use the prompt kind there)"
            )
        virtual = self.config.top_n * self.config.prompt_length
        check_position_room(backbone, virtual, "top_n × prompt_length")
        if "prompt_pool" in dict(backbone.named_children()):
            raise ContinualPeftError("this backbone already has a prompt_pool kind injected")
        site = PromptPoolSite(
            vocab=backbone.token_table(),
            routing=routing,
            config=self.config,
            frozen_features=_frozen_features(backbone),
        )
        backbone.add_module("prompt_pool", site)  # follows backbone.to(), as the prompt kind
        backbone.add_input_hook(site)
        return {"prompt_pool": site}
