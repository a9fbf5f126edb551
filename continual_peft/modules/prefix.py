"""Prefix tuning: per layer, trainable key and value vectors that every real token attends to.

Each BERT-family self-attention module (`layer.N.attention.self`, with `query`, `key`, `value`
linear layers) is wrapped by a `PrefixSite` that stacks every slot's prefix for that layer:
`prefix_key: (T, N, d)` and `prefix_value: (T, N, d)`, with N virtual tokens and d the
attention width (split into heads like the real keys). With routing on, the site computes the
attention itself: queries from the real tokens, keys `[prefix_key; K]` and values
`[prefix_value; V]` per row. With routing off it calls the original module unchanged.

Mixing: a row's prefix is the weighted sum of its k slots' prefixes. A row with no prefix slot
(all entries -1 or weight 0) gets its prefix columns masked, so its output is the bare backbone's.

The ViT family of transformers 5 (ViT, DeiT, BEiT, DINOv2) keeps all of attention in one module,
`layers.N.attention` with `q_proj`, `k_proj`, `v_proj` and the output projection `o_proj`; there
the site wraps that module and applies `o_proj` after attending (see `LAYOUTS`).

Unlike LoRA and adapters, a fresh slot is NOT bit-identical to the backbone: any prefix, even a
small one, takes a share of every token's attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from continual_peft.backbones.placement import CPU
from continual_peft.backbones.quantization import compute_dtype
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import MODULE_KINDS
from continual_peft.modules.cache_prefix import inject_cache_prefix
from continual_peft.modules.lowrank import layer_sizes
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite, wrapped_layer


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where one model family keeps its attention's parts (attribute names on the module)."""

    where: re.Pattern  # full module name of a self-attention module
    query: str
    key: str
    value: str
    output: str | None  # output projection inside the module; None if outside (BERT)
    head_size: str  # per-head width
    dropout: str  # attention-probability dropout: an nn.Dropout or a float


LAYOUTS = (
    Layout(
        where=re.compile(r"(.*\.)?layer\.\d+\.attention\.self"),
        query="query",
        key="key",
        value="value",
        output=None,
        head_size="attention_head_size",
        dropout="dropout",
    ),
    Layout(
        where=re.compile(r"(.*\.)?layers?\.\d+\.attention"),
        query="q_proj",
        key="k_proj",
        value="v_proj",
        output="o_proj",
        head_size="head_dim",
        dropout="attention_dropout",
    ),
)


@dataclass
class PrefixConfig:
    """Prefix tuning settings."""

    num_virtual_tokens: int = 10  # prefix length N, per layer
    init_std: float = 0.02  # a fresh prefix is N(0, init_std²): keys and values near zero

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ContinualPeftError(
                f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}"
            )


class PrefixSite(StackedSite):
    """A wrapped self-attention module plus every slot's prefix for its layer.

    Args:
        base_layer: The frozen original attention module (BertSelfAttention or alike).
        routing: The bank's routing state for the prefix kind.
        config: Prefix length and initialisation.
        layout: Where the attention module keeps its projections (`LAYOUTS`).
        dtype: The frozen slots' dtype where the key projection's weight does not tell it (a
            bitsandbytes 8-bit layer's int8 weight): the backbone's compute dtype.
    """

    def __init__(
        self,
        *,
        base_layer: nn.Module,
        routing: Routing,
        config: PrefixConfig,
        layout: Layout = LAYOUTS[0],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.config = config
        self.layout = layout
        # sizes from the key projection's kind and dtype from what it computes in: a quantized
        # layer's weight is packed (4-bit: (d_out · d_in / 2, 1) bytes) or int8
        key = self._part("key")
        like = torch.empty(0, dtype=compute_dtype(key, dtype), device=key.weight.device)
        shape = self._shape()
        self.stack = SlotStack({"prefix_key": shape, "prefix_value": shape}, like)

    def _shape(self) -> tuple[int, int]:
        """(N, d) one slot's prefix keys (or values): d is the key projection's output."""
        return self.config.num_virtual_tokens, layer_sizes(self._part("key"))[0]

    def add_slot(self, generator: torch.Generator) -> None:
        shape = self._shape()
        self.stack.open(
            {
                name: torch.randn(shape, generator=generator, device=CPU) * self.config.init_std
                for name in ("prefix_key", "prefix_value")
            }
        )

    def _part(self, part: str) -> nn.Module:
        return getattr(self.base_layer, getattr(self.layout, part))

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        if self.routing.off:
            return self.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ContinualPeftError("prefix tuning does not support a key/value cache")
        keys, values, keep = self._prefixes(hidden_states.shape[0])
        out = self._attend(
            hidden_states, attention_mask, prefix_keys=keys, prefix_values=values, keep=keep
        )
        return out, None

    def _prefixes(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's prefix keys and values (B, N, d), and whether the row has one (B,)."""
        if self.routing.single is not None:
            t = self.stack.slot(self.routing.single)
            keep = torch.ones(rows, dtype=torch.bool, device=t["prefix_key"].device)
            keys, values = t["prefix_key"], t["prefix_value"]  # (N, d) each
            return keys.expand(rows, -1, -1), values.expand(rows, -1, -1), keep
        t = self.stack.stacked()  # (T, N, d) each
        idx, w = self.routing.for_rows(rows)  # (B, k), resolved by the bank
        w = w.to(t["prefix_key"].dtype)
        keys = torch.einsum("bk,bknd->bnd", w, t["prefix_key"][idx])  # (B, N, d)
        values = torch.einsum("bk,bknd->bnd", w, t["prefix_value"][idx])  # (B, N, d)
        return keys, values, (w != 0).any(dim=1)

    def _attend(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        attn, layout = self.base_layer, self.layout
        rows, length, _ = hidden.shape
        head_size = getattr(attn, layout.head_size)
        dropout = getattr(attn, layout.dropout)
        dropout = dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, H, L, d/H)
            return x.view(rows, x.shape[1], -1, head_size).transpose(1, 2)

        query = heads(self._part("query")(hidden))  # (B, H, L, dh)
        real_keys, real_values = self._part("key")(hidden), self._part("value")(hidden)
        keys = heads(torch.cat([prefix_keys.to(real_keys.dtype), real_keys], dim=1))
        values = heads(torch.cat([prefix_values.to(real_values.dtype), real_values], dim=1))
        bias = extend_mask(
            mask, keep, prefix=prefix_keys.shape[1], length=length, dtype=query.dtype
        )
        out = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=bias,
            dropout_p=dropout if attn.training else 0.0,
            scale=attn.scaling,
        )  # (B, H, L, dh)
        out = out.transpose(1, 2).reshape(rows, length, -1)  # (B, L, d)
        return out if layout.output is None else self._part("output")(out)


def extend_mask(
    mask: torch.Tensor | None, keep: torch.Tensor, *, prefix: int, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """An additive mask (B, 1, Lq, N + L) over prefix and real keys, from what BERT passes in.

    Args:
        mask: None (attend everywhere), a bool 4D mask (True = attend, sdpa), an additive float
            4D mask (0 or very negative, eager), or a 2D (B, L) 0/1 padding mask (flash).
        keep: (B,) whether each row attends to its prefix at all.
        prefix: Number of virtual tokens N.
        length: Number of real tokens L.
        dtype: The attention's dtype.
    """
    lowest = torch.finfo(dtype).min
    if mask is None:
        real = torch.zeros(1, 1, 1, length, dtype=dtype, device=keep.device)
    elif mask.dtype == torch.bool or mask.dim() == 2:
        allowed = mask.bool() if mask.dim() == 4 else mask.bool()[:, None, None, :]
        real = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
            ~allowed, lowest
        )
    else:
        real = mask.to(dtype).clamp(min=lowest)
    cols = torch.zeros(len(keep), 1, 1, prefix, dtype=dtype, device=keep.device)
    cols = cols.masked_fill(~keep[:, None, None, None], lowest)  # (B, 1, 1, N)
    rows = max(real.shape[0], len(keep))
    real = real.expand(rows, real.shape[1], real.shape[2], length)
    cols = cols.expand(rows, real.shape[1], real.shape[2], prefix)
    return torch.cat([cols, real], dim=-1)


def _layout(name: str, module: nn.Module) -> Layout | None:
    """The layout of a self-attention module, None if `module` is none."""
    for layout in LAYOUTS:
        parts = [layout.query, layout.key, layout.value] + [layout.output] * bool(layout.output)
        # the projections may already carry other kinds' sites (LoRA, adapters, BitFit)
        if layout.where.fullmatch(name) and all(
            isinstance(wrapped_layer(getattr(module, part, None)), nn.Linear) for part in parts
        ):
            return layout
    return None


@MODULE_KINDS.register("prefix", options=PrefixConfig)
class Prefix:
    """The `prefix` kind: wraps every BERT- or ViT-family self-attention module."""

    def __init__(self, **options: Any) -> None:
        config = PrefixConfig(**options)
        self.config = config

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap each self-attention module of `backbone.model` in place; return the new sites."""
        model = backbone.model
        if backbone.kind == "causal":  # decoder-only LMs: a prefix is a key/value cache
            return inject_cache_prefix(backbone, routing, self.config)
        if backbone.kind == "seq2seq":
            raise ContinualPeftError(
                f"prefix tuning is not supported on the seq2seq family ({type(model).__name__}: "
                "separate self- and cross-attention caches); use lora, adapter, prompt, ia3 or "
                "bitfit there, or a decoder-only model"
            )
        found = [(n, m, _layout(n, m)) for n, m in model.named_modules()]
        found = [(n, m, layout) for n, m, layout in found if layout is not None]
        causal = [n for n, m, _ in found if getattr(m, "is_causal", False)]
        if not found or causal:
            raise ContinualPeftError(
                "prefix tuning needs a BERT-family bidirectional self-attention "
                "('layer.N.attention.self' with query/key/value nn.Linear layers) or a ViT-family "
                "one ('layers.N.attention' with q_proj/k_proj/v_proj/o_proj); "
                f"{type(model).__name__} has {'causal ones' if causal else 'none'}"
            )
        sites = {}
        for name, module, layout in found:
            parent_name, _, child = name.rpartition(".")
            site = PrefixSite(
                base_layer=module,
                routing=routing,
                config=self.config,
                layout=layout,
                dtype=backbone.dtype,
            )
            setattr(model.get_submodule(parent_name) if parent_name else model, child, site)
            sites[name] = site
        return sites
