"""LoRA: a low-rank delta `x A^T B^T · alpha/r` beside each wrapped `nn.Linear` or `Conv1D`.

Each site stacks all slots: `lora_A: (T, r, d_in)`, `lora_B: (T, d_out, r)` (see `lowrank`), for
GPT-2's `Conv1D` too: peft's layout (with `fan_in_fan_out=True` there), so weights copy across.
A starts as peft initialises it (Kaiming-uniform) and B at zero, so a fresh slot leaves the
backbone's output bit-identical.

The default targets, `["query", "value"]`, are the query and value projections of every family
`base.ALIASES` knows: BERT's `query`/`value`, ViT's, Llama's and Qwen2's `q_proj`/`v_proj`,
GPT-2's fused `c_attn`, and T5's `q`/`v` (encoder, decoder and cross-attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.modules.base import MODULE_KINDS, check_targets, wrap_linear_layers
from continual_peft.modules.lowrank import LowRankSite, StackNames
from continual_peft.modules.routing import Routing

NAMES = StackNames(down="lora_A", up="lora_B")


@dataclass
class LoRAConfig:
    """LoRA settings; peft's names where they match."""

    r: int = 8  # rank
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.1  # on the LoRA input only, while training
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # or ["all-linear"]

    def __post_init__(self) -> None:
        check_targets(self.targets, "lora targets")


def _init(config: LoRAConfig) -> callable:
    def init(generator: torch.Generator, site: LowRankSite) -> dict[str, torch.Tensor]:
        a = torch.empty(config.r, site.d_in, device=CPU)  # drawn on the CPU; the stack moves it
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        return {
            "lora_A": a,
            "lora_B": torch.zeros(site.d_out, config.r, device=CPU),
            "scale": torch.tensor(config.alpha / config.r, device=CPU),
        }

    return init


@MODULE_KINDS.register("lora", options=LoRAConfig)
class LoRA:
    """The `lora` module kind: wraps the target `nn.Linear` and `Conv1D` layers."""

    def __init__(self, **options: Any) -> None:
        config = LoRAConfig(**options)
        self.config = config

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the matching layers of `backbone.model` in place and return the new sites."""
        init = _init(self.config)
        return wrap_linear_layers(
            backbone.model,
            self.config.targets,
            lambda layer: LowRankSite(
                base_layer=layer,
                routing=routing,
                rank=self.config.r,
                names=NAMES,
                init=init,
                dropout=self.config.dropout,
                dtype=backbone.dtype,
            ),
        )
