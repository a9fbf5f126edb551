"""Prefix tuning on decoder-only language models, through the model's key/value cache.

A causal LM's attention reads earlier keys and values from its cache (`transformers`'
`DynamicCache`), so a prefix is a cache filled before the prompt: per layer, N key and N value
vectors per row. One site holds every slot's prefixes, `prefix: (T, layers, 2, N, kv_width)`
(kv_width = key/value heads x head size), and serves them as a cache hook of the backbone
(`LanguageModelBackbone.add_cache_hook`), which puts the cache, the prefix's attention-mask
columns and the shifted position ids into the model's inputs. A row's prefix is the weighted
sum of its k prefix slots; a row without one gets its prefix columns masked and its positions
unshifted, so its outputs equal the bare model's. The prompt's tokens take positions N, N+1, ...
after a prefix, as in peft's prefix tuning (which leaves position ids to the model), so a slot
holding peft's prefix gives peft's logits (tested). Generation continues from the same cache.

Other families refuse the prefix kind with an error naming the family (`Prefix.inject`):
encoder-decoder models keep separate self- and cross-attention caches.
"""

from __future__ import annotations

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config (Llama, Qwen2, GPT-2, ...)."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "model_type", "") == "falcon":  # its cache holds what its attention does
        new_layout, multi_query = config.new_decoder_architecture, config.multi_query
        kv_heads = heads if new_layout else (1 if multi_query else config.num_kv_heads)
    kv_heads = int(kv_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


class CachePrefixSite(StackedSite):
    """Every prefix slot of a causal LM, served as a key/value cache.

    Args:
        model: The causal LM (its config gives the cache's geometry; its weights the dtype).
        routing: The bank's routing state for the prefix kind.
        num_virtual_tokens: N, the prefix length.
        init_std: A fresh prefix is N(0, init_std²).
    """

    def __init__(
        self, *, model: nn.Module, routing: Routing, num_virtual_tokens: int, init_std: float
    ) -> None:
        super().__init__()
        self.routing = routing
        self.layers, self.kv_heads, self.head_dim = cache_geometry(model.config)
        self.num_virtual_tokens, self.init_std = num_virtual_tokens, init_std
        shape = (self.layers, 2, num_virtual_tokens, self.kv_heads * self.head_dim)
        like = model.get_input_embeddings().weight
        self.stack = SlotStack({"prefix": shape}, like)

    def add_slot(self, generator: torch.Generator) -> None:
        shape = (self.layers, 2, self.num_virtual_tokens, self.kv_heads * self.head_dim)
        noise = torch.randn(shape, generator=generator, device=CPU) * self.init_std
        self.stack.open({"prefix": noise})

    def forward(self, rows: int, dtype: torch.dtype):
        """The cache hook: `(cache, present (B,) bool, N)`, or None with routing off.

        `cache` is a `DynamicCache` of N positions per layer, (B, kv_heads, N, head size)."""
        from transformers import DynamicCache

        if self.routing.off:
            return None
        if self.routing.single is not None:
            prefix = self.stack.slot(self.routing.single)["prefix"].to(dtype)
            prefixes = prefix.expand(rows, *prefix.shape)  # (B, layers, 2, N, width)
            present = torch.ones(rows, dtype=torch.bool, device=prefix.device)
        else:
            idx, w = self.routing.for_rows(rows)  # (B, k)
            stacked = self.stack.stacked()["prefix"]  # (T, layers, 2, N, width)
            prefixes = torch.einsum("bk,bklcnw->blcnw", w.to(dtype), stacked[idx].to(dtype))
            present = w.sum(dim=1) > 0
        n = self.num_virtual_tokens
        split = prefixes.reshape(rows, self.layers, 2, n, self.kv_heads, self.head_dim)
        split = split.permute(1, 2, 0, 4, 3, 5)  # (layers, 2, B, kv_heads, N, head size)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(split[layer, 0], split[layer, 1], layer)
        return cache, present, n


def inject_cache_prefix(backbone, routing: Routing, config) -> dict[str, nn.Module]:
    """Register one `CachePrefixSite` on a causal backbone; returns `{"prefix": site}`."""
    site = CachePrefixSite(
        model=backbone.model,
        routing=routing,
        num_virtual_tokens=config.num_virtual_tokens,
        init_std=config.init_std,
    )
    backbone.add_module("prefix", site)  # follows backbone.to(); its slot is a parameter
    backbone.add_cache_hook(site)
    return {"prefix": site}
