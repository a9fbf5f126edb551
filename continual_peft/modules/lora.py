"""LoRA: a low-rank delta `x A^T B^T · alpha/r` beside each wrapped `nn.Linear`.

All tasks' LoRA weights for one site are stacked: frozen slots in buffers `A: (T, r, d_in)`,
`B: (T, d_out, r)`, the slot being trained (if any) as two Parameters appended at index T. A mixed
batch gathers each row's slots and runs two batched matmuls, so its cost does not grow with T.
Mixing k slots with weights w is itself a LoRA of rank k·r: `[A_1; …; A_k]` and `[w_1 B_1, …]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from continual_peft.modules import MODULE_KINDS, wrap_linear_layers
from continual_peft.modules._routing import Routing, gather_weights


@dataclass
class LoRAConfig:
    """LoRA settings; peft's names where they match."""

    r: int = 8  # rank
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.1  # on the LoRA input only, while training
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # or ["all-linear"]


class LoRALinear(nn.Module):
    """An `nn.Linear` kept as `base_layer`, plus every slot's LoRA delta.

    Args:
        base_layer: The frozen original layer.
        routing: The bank's shared routing state.
        config: Rank, alpha and dropout.
    """

    def __init__(self, base_layer: nn.Linear, routing: Routing, config: LoRAConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        d_out, d_in = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.register_buffer("A", torch.zeros(0, self.r, d_in, **factory))  # (T, r, d_in)
        self.register_buffer("B", torch.zeros(0, d_out, self.r, **factory))  # (T, d_out, r)
        self.register_buffer("scale", torch.zeros(0, **factory))  # (T,)
        self.train_A: nn.Parameter | None = None
        self.train_B: nn.Parameter | None = None

    def add_slot(self, generator: torch.Generator) -> None:
        """Open a trainable slot: A as peft initialises it, B zero so the output is unchanged."""
        d_out, d_in = self.base_layer.weight.shape
        a = torch.empty(self.r, d_in, dtype=self.A.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.train_A = nn.Parameter(a.to(self.A.device))
        self.train_B = nn.Parameter(
            torch.zeros(d_out, self.r, dtype=self.B.dtype, device=self.B.device)
        )

    def freeze_slot(self) -> None:
        """Move the trainable slot onto the frozen stack."""
        self.load_slot({"lora_A": self.train_A.detach(), "lora_B": self.train_B.detach()})
        self.train_A = self.train_B = None

    def load_slot(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append a frozen slot from saved tensors."""
        self.A = torch.cat([self.A, tensors["lora_A"].to(self.A)[None]])
        self.B = torch.cat([self.B, tensors["lora_B"].to(self.B)[None]])
        scale = tensors.get("scale", torch.tensor(self.scaling))
        self.scale = torch.cat([self.scale, scale.reshape(1).to(self.scale)])

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's tensors, for saving and export."""
        a, b, scale = self._slot(slot)
        scale = torch.as_tensor(scale)
        return {"lora_A": a.detach(), "lora_B": b.detach(), "scale": scale.detach()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.train_A, self.train_B) if p is not None]

    def _slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        if self.train_A is not None and slot == len(self.A):
            return self.train_A, self.train_B, self.scaling
        return self.A[slot], self.B[slot], self.scale[slot]

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.train_A is None:
            return self.A, self.B, self.scale
        scale = torch.cat([self.scale, self.scale.new_tensor([self.scaling])])
        return (
            torch.cat([self.A, self.train_A[None]]),
            torch.cat([self.B, self.train_B[None]]),
            scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.routing
        if routing.off:
            return out
        x = self.dropout(x)
        if routing.single is not None:
            a, b, scale = self._slot(routing.single)
            return out + (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype) * scale
        a, b, scale = self._stacks()
        return out + self._mixed_delta(x, a, b, scale, routing).to(out.dtype)

    def _mixed_delta(self, x, a, b, scale, routing: Routing) -> torch.Tensor:
        rows, k = routing.indices.shape
        idx, w = gather_weights(routing.indices, routing.weights, scale)  # (B, k) each
        a_rows = a[idx].reshape(rows, k * self.r, -1)  # (B, k·r, d_in)
        b_rows = (b[idx] * w[:, :, None, None]).permute(0, 2, 1, 3).reshape(rows, -1, k * self.r)
        h = x.reshape(rows, -1, x.shape[-1])  # (B, L, d_in)
        delta = torch.bmm(
            torch.bmm(h, a_rows.transpose(1, 2).to(h.dtype)), b_rows.transpose(1, 2).to(h.dtype)
        )
        return delta.reshape(*x.shape[:-1], -1)  # (..., d_out)


@MODULE_KINDS.register("lora")
class LoRA:
    """The `lora` module kind: wraps the target linear layers with `LoRALinear`."""

    config_class = LoRAConfig

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config

    def inject(self, model: nn.Module, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the matching layers in place and return the new sites."""
        return wrap_linear_layers(
            model, self.config.targets, lambda layer: LoRALinear(layer, routing, self.config)
        )
