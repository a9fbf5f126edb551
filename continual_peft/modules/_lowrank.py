"""A wrapped `nn.Linear` plus every slot's low-rank delta: the shared engine of LoRA and adapters.

For a slot s, with `h` the layer's input (LoRA) or output (adapter):

    delta_s(h) = scale_s · (act(h D_s^T + d_s) U_s^T + u_s)

LoRA is `D = A`, `U = B`, identity act, no biases; a bottleneck adapter is a down-projection, a
nonlinearity and an up-projection, added to the layer's output (the residual connection).
A mixed batch gathers each row's slots; since `act` works per hidden unit, mixing k slots with
weights w is one delta of width k·r with `[D_1; …; D_k]` and `[w_1 U_1, …, w_k U_k]`, so every
row of the batch is served by two batched matmuls whatever the number of slots. When every row
shares one mix (`bank.use_slots`), the same width-k·r delta needs no per-row gather at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from continual_peft.modules._routing import Routing, gather_weights
from continual_peft.modules._stack import SlotStack, StackedSite


class LowRankSite(StackedSite):
    """`base_layer(x) + delta(x or base_layer(x))`, with per-row slots from `routing`.

    Args:
        base_layer: The frozen original layer.
        routing: The bank's routing state for this module kind.
        rank: Width r of the delta's bottleneck.
        names: Stack names for (down, up, down bias, up bias); None for an absent bias.
        init: Builds a fresh slot's tensors (given a generator and this site).
        on_output: Apply the delta to the layer's output (adapter) rather than its input (LoRA).
        activation: Nonlinearity between down and up projection.
        dropout: Dropout on the delta's input, active in training only.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        routing: Routing,
        rank: int,
        names: tuple[str, str, str | None, str | None],
        init: Callable[[torch.Generator, LowRankSite], dict[str, torch.Tensor]],
        on_output: bool = False,
        activation: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.names = names
        self.init = init
        self.on_output = on_output
        self.activation = activation or nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_out, d_in = base_layer.weight.shape
        width = d_out if on_output else d_in
        down, up, down_bias, up_bias = names
        shapes = {down: (rank, width), up: (d_out, rank), "scale": ()}
        if down_bias:
            shapes[down_bias] = (rank,)
        if up_bias:
            shapes[up_bias] = (d_out,)
        self.stack = SlotStack(shapes, base_layer.weight, fixed=("scale",))

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, so another kind can wrap this site like a Linear."""
        return self.base_layer.weight

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open(self.init(generator, self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.routing.off:
            return out
        h = self.dropout(out if self.on_output else x)
        if self.routing.single is not None:
            delta = self._single(h, self.stack.slot(self.routing.single))
        elif self.routing.shared:
            delta = self._shared(h, self.stack.stacked())
        else:
            delta = self._mixed(h, self.stack.stacked())
        return out + delta.to(out.dtype)

    def _single(self, h: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        down, up, down_bias, up_bias = self.names
        z = h @ t[down].T.to(h.dtype)  # (..., r)
        if down_bias:
            z = z + t[down_bias].to(h.dtype)
        delta = self.activation(z) @ t[up].T.to(h.dtype)  # (..., d_out)
        if up_bias:
            delta = delta + t[up_bias].to(h.dtype)
        return delta * t["scale"].to(h.dtype)

    def _shared(self, h: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every row on the same k slots: one delta of width k·r, no per-row gather."""
        down, up, down_bias, up_bias = self.names
        shared = self.routing.indices[0], self.routing.weights[0]  # (k,) each
        idx, w = gather_weights(*shared, t["scale"])
        w = w.to(h.dtype)
        z = h @ t[down][idx].reshape(-1, h.shape[-1]).T.to(h.dtype)  # (..., k·r)
        if down_bias:
            z = z + t[down_bias][idx].reshape(-1).to(h.dtype)
        u = (t[up][idx].to(h.dtype) * w[:, None, None]).permute(1, 0, 2)  # (d_out, k, r)
        delta = self.activation(z) @ u.reshape(u.shape[0], -1).T  # (..., d_out)
        if up_bias:
            delta = delta + w @ t[up_bias][idx].to(h.dtype)
        return delta

    def _mixed(self, h: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        down, up, down_bias, up_bias = self.names
        rows, k = self.routing.indices.shape
        idx, w = gather_weights(self.routing.indices, self.routing.weights, t["scale"])  # (B, k)
        w = w.to(h.dtype)
        flat = h.reshape(rows, -1, h.shape[-1])  # (B, L, width)
        d_rows = t[down][idx].reshape(rows, -1, flat.shape[-1]).to(h.dtype)  # (B, k·r, width)
        z = torch.bmm(flat, d_rows.transpose(1, 2))  # (B, L, k·r)
        if down_bias:
            z = z + t[down_bias][idx].reshape(rows, 1, -1).to(h.dtype)
        u_rows = (t[up][idx].to(h.dtype) * w[:, :, None, None]).permute(0, 2, 1, 3)
        u_rows = u_rows.reshape(rows, u_rows.shape[1], -1)  # (B, d_out, k·r)
        delta = torch.bmm(self.activation(z), u_rows.transpose(1, 2))  # (B, L, d_out)
        if up_bias:
            delta = delta + torch.einsum("bk,bkd->bd", w, t[up_bias][idx].to(h.dtype))[:, None]
        return delta.reshape(*h.shape[:-1], -1)
