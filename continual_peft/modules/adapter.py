"""Bottleneck adapters: down-projection, nonlinearity, up-projection and a residual connection.

For a wrapped layer's output `y`, slot s adds `act(y D_s^T + d_s) U_s^T + u_s` to it (the residual
connection is the `y +`), computed by the shared `_lowrank` engine with `on_output=True`.

Placement in the BERT family (BERT, RoBERTa, MiniLM, ...). `BertSelfOutput` and `BertOutput` both
compute `LayerNorm(dropout(dense(h)) + input)`; the adapter wraps `dense`, so it acts on the
projection's output before that dropout, residual and LayerNorm, which is Houlsby's placement
"after the projection, before adding the skip connection and the layer norm".

- `"houlsby"`: after the attention output projection (`layer.N.attention.output.dense`) AND after
  the feed-forward output (`layer.N.output.dense`): two adapters per layer.
- `"pfeiffer"`: after the feed-forward output only: one adapter per layer.

Placement in the ViT family (transformers 5: ViT, DeiT, BEiT, DINOv2). The layers are pre-norm,
`h + dropout(attention.o_proj(...))` and `h + dropout(mlp.fc2(...))`, so wrapping `o_proj` and
`fc2` is the same placement: after the projection, before the skip connection.

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
from continual_peft.modules._lowrank import LowRankSite
from continual_peft.modules._routing import Routing
from continual_peft.modules.base import MODULE_KINDS, wrap_linear_layers

NAMES = ("adapter_down", "adapter_up", "adapter_down_bias", "adapter_up_bias")
INIT_STD = 1e-2  # Houlsby et al.: near-identity initialisation

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

# Full-name regular expressions; `layer.N.output.dense` must not catch `attention.output.dense`.
# First alternative: BERT family; second: the ViT family of transformers 5 (ViT, DeiT, BEiT,
# DINOv2), whose pre-norm layers add the residual right after `attention.o_proj` and `mlp.fc2`.
ATTENTION_OUTPUT = (
    r"(.*\.)?layer\.\d+\.attention\.output\.dense|(.*\.)?layers?\.\d+\.attention\.o_proj"
)
FFN_OUTPUT = r"(.*\.)?layer\.\d+\.output\.dense|(.*\.)?layers?\.\d+\.mlp\.fc2"
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
        d_out = site.base_layer.weight.shape[0]
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

    def _site(self, layer: nn.Linear, routing: Routing) -> LowRankSite:
        rank = self.config.width(layer.weight.shape[0])
        return LowRankSite(
            layer,
            routing,
            rank,
            NAMES,
            _init(rank),
            on_output=True,
            activation=ACTIVATIONS[self.config.activation](),
            dropout=self.config.dropout,
        )

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the placement's layers of `backbone.model` in place and return the new sites."""
        placement = self.config.placement
        try:
            return wrap_linear_layers(
                backbone.model, PLACEMENTS[placement], lambda layer: self._site(layer, routing)
            )
        except ContinualPeftError as err:
            raise ContinualPeftError(
                f"adapter placement {placement!r} needs BERT-family layers named "
                f"'layer.N.attention.output.dense' / 'layer.N.output.dense' (or ViT-family "
                f"'layers.N.attention.o_proj' / 'layers.N.mlp.fc2'), which "
                f"{type(backbone.model).__name__} lacks ({err})"
            ) from None
