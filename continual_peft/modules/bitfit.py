"""BitFit: a task tunes only the backbone's bias terms (Ben Zaken, Ravfogel & Goldberg, ACL 2022,
"BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models").

The backbone stays frozen; each slot holds, per layer with a bias, a bias DELTA `δ: (d_out,)`,
so a layer `f` (whose bias is b) computes `f(x) + δ`, which is `f` with bias `b + δ`. Each site
stacks every slot's delta, `bias_delta: (T, d_out)`; a row routed to slots `idx` with weights
`w` (per row, or one mix for the whole batch) gets `f(x) + Σ_k w_k δ_{idx_k}`, the same (B, d_out)
vector added at every position, for every row of a mixed batch in one gather. Deltas start at
zero, so a fresh slot leaves the backbone's output bit-identical.

Which layers get a site (`BitFitConfig`): every `nn.Linear` and GPT-2 `Conv1D` with a bias, and
(`layer_norm`, the paper's choice) every LayerNorm with a bias (its β), never the LM head
(`lm_head`, `get_output_embeddings()`) nor a pooler. Per family, by default:

- BERT family (BERT, RoBERTa, MiniLM): query/key/value, attention output, intermediate and
  output dense layers, and the embedding, attention and output LayerNorms;
- ViT family: q/k/v/o projections, fc1/fc2 and every LayerNorm (not the Conv2d patch
  embedding);
- GPT-2: `c_attn`, `c_proj`, `c_fc` (`Conv1D`) and `ln_1`, `ln_2`, `ln_f`;
- Qwen2: the q/k/v projections only, its only biases (its RMSNorms have none);
- Llama, T5: no bias anywhere (linear layers built with `bias=False`, RMSNorm / T5LayerNorm with
  a scale only), so the kind is refused by the model's name unless `bias_free = "add"`, which
  gives every linear layer a site: a bias learnt from zero, on a layer whose own bias is zero.

`bias_free = "add"` does the same to the bias-free linear layers of any model (Qwen2's o_proj
and MLP, say); norms without a bias never get one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.backbones.quantization import compute_dtype
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import MODULE_KINDS, layers_where, without_heads, wrap_layers
from continual_peft.modules.lowrank import conv1d_type, layer_sizes
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite, wrapped_layer

NAME = "bias_delta"  # the stacked tensor, and a slot file's key `<site>.bias_delta`
BIAS_FREE = ("skip", "add")


@dataclass
class BitFitConfig:
    """BitFit settings."""

    layer_norm: bool = True  # tune the LayerNorm biases (β) too, as the paper does
    bias_free: str = "skip"  # linear layers without a bias: "skip" them or "add" a bias to tune

    def __post_init__(self) -> None:
        if self.bias_free not in BIAS_FREE:
            raise ContinualPeftError(
                f'bitfit bias_free = {self.bias_free!r} is invalid; use "skip" (tune the '
                'biases the model has) or "add" (also learn a new bias on each linear layer '
                "without one)"
            )
        if not isinstance(self.layer_norm, bool):
            raise ContinualPeftError(
                f"bitfit layer_norm = {self.layer_norm!r} is invalid; use true (tune the "
                "LayerNorm biases too) or false (linear layers only)"
            )


def _is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear | conv1d_type())


def has_norm_bias(layer: nn.Module) -> bool:
    """A LayerNorm (torch's, or any class named like one) with a bias over its normalized
    size, the last dimension of its output."""
    bias = getattr(layer, "bias", None)
    named = isinstance(layer, nn.LayerNorm) or "layernorm" in type(layer).__name__.lower()
    if not named or not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        return False
    shape = getattr(layer, "normalized_shape", None)
    return shape is None or tuple(shape) == tuple(bias.shape)


class BitFitSite(StackedSite):
    """`base_layer(x) + Σ_k w_k δ_k`, with per-row slots from `routing`.

    Args:
        base_layer: The frozen original layer (`nn.Linear`, `Conv1D`, a LayerNorm) or another
            kind's site on one.
        routing: The bank's routing state for this kind.
        dtype: The frozen slots' dtype where the layer's weight does not tell it (an 8-bit
            layer's int8 weight): the backbone's compute dtype.
    """

    def __init__(self, *, base_layer: nn.Module, routing: Routing, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        layer = wrapped_layer(base_layer)
        bias = getattr(layer, "bias", None)
        self.size = bias.shape[0] if bias is not None else layer_sizes(layer)[0]  # d_out
        anchor = bias if bias is not None else layer.weight  # for its device
        like = torch.empty(0, dtype=compute_dtype(layer, dtype), device=anchor.device)
        self.stack = SlotStack({NAME: (self.size,)}, like)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen slots are stored in (another kind's site on this one reads it)."""
        return getattr(self.stack, NAME).dtype

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, for its device (another kind's site on this one reads it)."""
        return self.base_layer.weight

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open({NAME: torch.zeros(self.size, device=CPU)})  # nothing to draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d_out)
        routing = self.routing
        if routing.off:
            return out
        if routing.single is not None:
            return out + self.stack.slot(routing.single)[NAME].to(out.dtype)
        delta = self._delta(out.dtype)  # (B, d_out); (1, d_out) when every row shares a mix
        rows = delta.shape[0]
        return (out.reshape(rows, -1, self.size) + delta[:, None]).reshape(out.shape)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        """Each row's `Σ_k w_k δ_k`, (B, d_out) (for a shared routing (1, d_out)), summed in
        float32. Without gradients and without a trainable slot it cannot change while the
        routing holds, so it is made once per routing (every decoding step of a `generate`)."""

        def make() -> torch.Tensor:
            deltas = self.stack.stacked()[NAME]  # (T, d_out)
            idx, w = self.routing.indices, self.routing.weights  # (B, k) each, resolved
            return torch.einsum("bk,bkd->bd", w, deltas[idx].float()).to(dtype)

        if torch.is_grad_enabled() or len(self.stack.trainable):
            return make()
        return self.routing.derive(("bias_delta", id(self), dtype), make)


@MODULE_KINDS.register("bitfit", options=BitFitConfig)
class BitFit:
    """The `bitfit` module kind: wraps every layer with a bias (see the module docstring)."""

    def __init__(self, **options: Any) -> None:
        config = BitFitConfig(**options)
        self.config = config

    def _takes(self, layer: nn.Module) -> bool:
        if _is_linear(layer):
            return layer.bias is not None or self.config.bias_free == "add"
        return self.config.layer_norm and has_norm_bias(layer)

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the layers of `backbone.model` that get a site, in place; return the sites.

        Raises:
            ContinualPeftError: the model has no layer to tune (no bias at all, by default).
        """
        model = backbone.model
        layers = without_heads(model, layers_where(model, self._takes))
        if not layers:
            raise ContinualPeftError(self._nothing_to_tune(model))
        return wrap_layers(
            model,
            layers,
            lambda layer: BitFitSite(base_layer=layer, routing=routing, dtype=backbone.dtype),
        )

    def _nothing_to_tune(self, model: nn.Module) -> str:
        name = type(model).__name__
        if self.config.bias_free == "add":
            return f"bitfit found no nn.Linear or Conv1D layer in {name} to add a bias to"
        norms = not self.config.layer_norm and layers_where(model, has_norm_bias)
        why = (
            "its linear layers have no bias, and layer_norm = false leaves out its LayerNorm "
            "biases (set layer_norm = true in [bitfit] to tune those)"
            if norms
            else "its linear layers are built with bias=False and its norms have no bias"
        )
        return (
            f"bitfit tunes a model's bias terms, and {name} has none to tune: {why}; set "
            'bias_free = "add" in [bitfit] to learn a new bias, from zero, on each linear layer, '
            "or use the ia3 or lora module kind"
        )
