"""Bottleneck adapters: down-projection, nonlinearity, up-projection and a residual connection.

For a wrapped layer's output `y`, slot s adds `act(y D_s^T + d_s) U_s^T + u_s` to it (the residual
connection is the `y +`), computed by the shared `lowrank` engine with `on_output=True`.

Placement in the BERT family (BERT, RoBERTa, MiniLM, ...). `BertSelfOutput` and `BertOutput` both
compute `LayerNorm(dropout(dense(h)) + input)`; the adapter wraps `dense`, so it acts on the
projection's output before that dropout, residual and LayerNorm, which is Houlsby's placement
"after the projection, before adding the skip connection and the layer norm".

- `"houlsby"`: after the attention output projection (`layer.N.attention.output.dense`) AND after
  the feed-forward output (`layer.N.output.dense`): two adapters per layer.
- `"pfeiffer"`: after the feed-forward output only: one adapter per layer.

The other families are pre-norm, `h + attention_output(...)` and `h + mlp_output(...)` (some with
a dropout between), so wrapping those two projections is the same placement: after the
projection, before the skip connection. Their names (`PLACEMENTS` holds the regexes):

- ViT family (transformers 5: ViT, DeiT, BEiT, DINOv2): `layers.N.attention.o_proj`, `.mlp.fc2`;
- Llama, Qwen2: `layers.N.self_attn.o_proj`, `layers.N.mlp.down_proj`;
- GPT-2: `h.N.attn.c_proj`, `h.N.mlp.c_proj` (both `Conv1D`, both named `c_proj`: the full name
  tells them apart);
- T5: `block.N.layer.M.SelfAttention.o` (encoder and decoder) and, in the decoder,
  `EncDecAttention.o` (cross-attention; houlsby wraps it too), `block.N.layer.M.DenseReluDense.wo`.

The up-projection and its bias start at zero, so a fresh slot leaves the backbone's output
bit-identical; the down-projection starts small and random, so gradients reach the up-projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import MODULE_KINDS, layer_endings, wrap_linear_layers
from continual_peft.modules.lowrank import LowRankSite, StackNames, layer_sizes
from continual_peft.modules.routing import Routing

NAMES = StackNames(
    down="adapter_down", up="adapter_up", down_bias="adapter_down_bias", up_bias="adapter_up_bias"
)
INIT_STD = 1e-2  # Houlsby et al.: near-identity initialisation

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

# Full-name regular expressions by family; BERT's `layer.N.output.dense` must not catch
# `attention.output.dense`, nor GPT-2's `mlp.c_proj` its `attn.c_proj`.
ATTENTION_OUTPUTS = {
    "BERT family": r"(.*\.)?layer\.\d+\.attention\.output\.dense",
    "ViT family": r"(.*\.)?layers?\.\d+\.attention\.o_proj",
    "Llama/Qwen2": r"(.*\.)?layers\.\d+\.self_attn\.o_proj",
    "GPT-2": r"(.*\.)?h\.\d+\.attn\.c_proj",
    "T5": r"(.*\.)?block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
}
FFN_OUTPUTS = {
    "BERT family": r"(.*\.)?layer\.\d+\.output\.dense",
    "ViT family": r"(.*\.)?layers?\.\d+\.mlp\.fc2",
    "Llama/Qwen2": r"(.*\.)?layers\.\d+\.mlp\.down_proj",
    "GPT-2": r"(.*\.)?h\.\d+\.mlp\.c_proj",
    "T5": r"(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
}
ATTENTION_OUTPUT = "|".join(ATTENTION_OUTPUTS.values())
FFN_OUTPUT = "|".join(FFN_OUTPUTS.values())
# How the error names each family's layers (N: layer index).
LAYER_NAMES = {
    "BERT family": "'layer.N.attention.output.dense' / 'layer.N.output.dense'",
    "ViT family": "'layers.N.attention.o_proj' / 'layers.N.mlp.fc2'",
    "Llama/Qwen2": "'layers.N.self_attn.o_proj' / 'layers.N.mlp.down_proj'",
    "GPT-2": "'h.N.attn.c_proj' / 'h.N.mlp.c_proj'",
    "T5": "'SelfAttention.o' (and 'EncDecAttention.o') / 'DenseReluDense.wo'",
}
PLACEMENTS: dict[str, list[str]] = {
    "houlsby": [ATTENTION_OUTPUT, FFN_OUTPUT],
    "pfeiffer": [FFN_OUTPUT],
}


@dataclass
class AdapterConfig:
    """Bottleneck adapter settings."""

    placement: str = "pfeiffer"  # "houlsby" (after attention and FFN) or "pfeiffer" (FFN only)
    reduction_factor: int = 16  # bottleneck = hidden size // reduction_factor
    bottleneck: int = 0  # explicit bottleneck size; wins over reduction_factor if > 0
    activation: str = "relu"  # nonlinearity between down and up projection (see ACTIVATIONS)
    dropout: float = 0.0  # on the adapter's input only, while training

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ContinualPeftError(
                f"unknown adapter placement {self.placement!r}; valid: {', '.join(PLACEMENTS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ContinualPeftError(
                f"unknown adapter activation {self.activation!r}; valid names: "
                f"{', '.join(sorted(ACTIVATIONS))}"
            )
        if self.reduction_factor < 1 or self.bottleneck < 0:
            raise ContinualPeftError(
                f"adapter needs reduction_factor >= 1 and bottleneck >= 0, got "
                f"{self.reduction_factor} and {self.bottleneck}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ContinualPeftError(f"adapter dropout must be in [0, 1), got {self.dropout}")

    def width(self, hidden: int) -> int:
        """The bottleneck size for a layer of output size `hidden`."""
        return self.bottleneck if self.bottleneck > 0 else max(1, hidden // self.reduction_factor)


def _init(rank: int) -> callable:
    def init(generator: torch.Generator, site: LowRankSite) -> dict[str, torch.Tensor]:
        d_out = site.d_out
        return {
            "adapter_down": torch.randn(rank, d_out, generator=generator, device=CPU) * INIT_STD,
            "adapter_up": torch.zeros(d_out, rank, device=CPU),
            "adapter_down_bias": torch.zeros(rank, device=CPU),
            "adapter_up_bias": torch.zeros(d_out, device=CPU),
            "scale": torch.tensor(1.0, device=CPU),
        }

    return init


@MODULE_KINDS.register("adapter", options=AdapterConfig)
class Adapter:
    """The `adapter` module kind: wraps the output projections chosen by `placement`."""

    def __init__(self, **options: Any) -> None:
        config = AdapterConfig(**options)
        self.config = config

    def _site(self, layer: nn.Module, routing: Routing, dtype: torch.dtype) -> LowRankSite:
        rank = self.config.width(layer_sizes(layer)[0])
        return LowRankSite(
            base_layer=layer,
            routing=routing,
            rank=rank,
            names=NAMES,
            init=_init(rank),
            on_output=True,
            activation=ACTIVATIONS[self.config.activation](),
            dropout=self.config.dropout,
            dtype=dtype,
        )

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the placement's layers of `backbone.model` in place and return the new sites."""
        placement = self.config.placement
        try:
            return wrap_linear_layers(
                backbone.model,
                PLACEMENTS[placement],
                lambda layer: self._site(layer, routing, backbone.dtype),
            )
        except ContinualPeftError:
            families = "; ".join(f"{k} {v}" for k, v in LAYER_NAMES.items())
            raise ContinualPeftError(
                f"adapter placement {placement!r} needs the output projections of a known "
                f"family, named as in: {families}; {type(backbone.model).__name__} has none "
                f"(its layers' names end in: {layer_endings(backbone.model)})"
            ) from None
