"""A wrapped layer plus every slot's low-rank delta: the shared engine of LoRA and adapters.

The wrapped layer is an `nn.Linear` (`x W^T + b`, weight (d_out, d_in); bitsandbytes' 8-bit and
4-bit layers of a quantized backbone are `nn.Linear`s too), transformers' `Conv1D`
(GPT-2: `x W + b`, weight (d_in, d_out)) or another site (two kinds on one layer); the site reads
its sizes from the layer's kind (`layer_sizes`), never from the weight's shape.

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
from typing import NamedTuple

import torch
from torch import nn

from continual_peft.backbones.quantization import compute_dtype
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite, wrapped_layer


def conv1d_type() -> type[nn.Module]:
    """transformers' `Conv1D`, imported when first needed (the package imports transformers
    lazily)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def layer_sizes(layer: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer a site can wrap: `nn.Linear`, `Conv1D` or another site on one."""
    layer = wrapped_layer(layer)  # another kind's site keeps the layer's sizes
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, conv1d_type()):
        return layer.nf, layer.nx  # its weight is (nx, nf): (d_in, d_out)
    raise TypeError(f"a low-rank site wraps nn.Linear, Conv1D or a site, not {type(layer)}")


class StackNames(NamedTuple):
    """The names a low-rank site gives its stacked tensors (and the keys of a slot's file)."""

    down: str  # (r, d_in) projection into the bottleneck
    up: str  # (d_out, r) projection out of it
    down_bias: str | None = None  # (r,); None: no bias
    up_bias: str | None = None  # (d_out,); None: no bias


class LowRankSite(StackedSite):
    """`base_layer(x) + delta(x or base_layer(x))`, with per-row slots from `routing`.

    Args:
        base_layer: The frozen original layer: `nn.Linear`, `Conv1D` or another site.
        routing: The bank's routing state for this module kind.
        rank: Width r of the delta's bottleneck.
        names: The names of the site's stacks (`StackNames`).
        init: Builds a fresh slot's tensors (given a generator and this site).
        on_output: Apply the delta to the layer's output (adapter) rather than its input (LoRA).
        activation: Nonlinearity between down and up projection.
        dropout: Dropout on the delta's input, active in training only.
        dtype: The frozen slots' dtype where the wrapped layer's weight does not tell it (a
            bitsandbytes 8-bit layer's int8 weight): the backbone's compute dtype. A 4-bit
            layer's compute dtype and a floating weight's dtype come first.
    """

    def __init__(
        self,
        *,
        base_layer: nn.Module,
        routing: Routing,
        rank: int,
        names: StackNames,
        init: Callable[[torch.Generator, LowRankSite], dict[str, torch.Tensor]],
        on_output: bool = False,
        activation: nn.Module | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.names = names
        self.init = init
        self.on_output = on_output
        self.activation = activation or nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_out, d_in = layer_sizes(base_layer)
        self.d_out, self.d_in = d_out, d_in
        width = d_out if on_output else d_in
        down, up, down_bias, up_bias = names
        shapes = {down: (rank, width), up: (d_out, rank), "scale": ()}
        if down_bias:
            shapes[down_bias] = (rank,)
        if up_bias:
            shapes[up_bias] = (d_out,)
        weight = base_layer.weight  # for its device; a quantized weight's dtype is no float
        like = torch.empty(0, dtype=compute_dtype(base_layer, dtype), device=weight.device)
        self.stack = SlotStack(shapes, like, fixed=("scale",))
        # (T,) per-slot multipliers of this site's deltas, recomputed every forward, that a
        # strategy may set (SD-LoRA's magnitude over each direction's norm); None: all 1
        self.gain: Callable[[LowRankSite], torch.Tensor] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen slots are stored and the deltas computed in."""
        return getattr(self.stack, self.stack.names[0]).dtype

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight as that layer stores it (a Linear's is (d_out, d_in), a
        Conv1D's (d_in, d_out)): for its dtype and device; `d_out` and `d_in` give the sizes."""
        return self.base_layer.weight

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open(self.init(generator, self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.routing
        if routing.off:
            return out
        h = self.dropout(out if self.on_output else x)
        gain = None if self.gain is None else self.gain(self)
        if routing.single is not None:
            return self._single(out, h, self.stack.slot(routing.single), gain)
        if routing.shared:
            return self._shared(out, h, self.stack.stacked(), gain)
        return self._mixed(out, h, self.stack.stacked(), gain)

    # Each path scales the r-wide intermediate (never the d_out-wide delta) and adds the delta
    # into the base output inside the up-projection's matmul (addmm / baddbmm with beta 1): one
    # pass over the (B, L, d_out) output instead of three.

    def _single(
        self, out: torch.Tensor, h: torch.Tensor, t: dict, gain: torch.Tensor | None
    ) -> torch.Tensor:
        down, up, down_bias, up_bias = self.names
        z = h @ t[down].to(h.dtype).T  # (..., r)
        if down_bias:
            z = z + t[down_bias].to(h.dtype)
        scale = t["scale"] if gain is None else t["scale"] * gain[self.routing.single]
        z = self.activation(z) * scale.to(h.dtype)
        flat = out.reshape(-1, out.shape[-1])  # (N, d_out)
        result = torch.addmm(flat, z.reshape(-1, z.shape[-1]), t[up].to(h.dtype).T)
        if up_bias:
            result = result + (t[up_bias] * scale).to(h.dtype)
        return result.reshape(out.shape)

    def _shared(
        self, out: torch.Tensor, h: torch.Tensor, t: dict, gain: torch.Tensor | None
    ) -> torch.Tensor:
        """Every row on the same k slots: one delta of width k·r, no per-row gather."""
        down, up, down_bias, up_bias = self.names
        idx, w = self.routing.indices[0], self.routing.weights[0]  # (k,) each
        rank, d_out = t[down].shape[1], out.shape[-1]
        z = h @ t[down][idx].reshape(-1, h.shape[-1]).to(h.dtype).T  # (..., k·r)
        if down_bias:
            z = z + t[down_bias][idx].reshape(-1).to(h.dtype)
        w = w if gain is None else w * gain[idx].to(w)
        z = self.activation(z) * self._rank_weights(w, rank, h.dtype, gain is None)
        u = t[up].transpose(1, 2)[idx].reshape(-1, d_out).to(h.dtype)  # (k·r, d_out)
        result = torch.addmm(out.reshape(-1, d_out), z.reshape(-1, z.shape[-1]), u)
        if up_bias:
            result = result + (w @ t[up_bias][idx].float()).to(h.dtype)
        return result.reshape(out.shape)

    def _mixed(
        self, out: torch.Tensor, h: torch.Tensor, t: dict, gain: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-row slots: gather each row's k slots, two batched matmuls for the whole batch."""
        down, up, down_bias, up_bias = self.names
        idx, w = self.routing.indices, self.routing.weights  # (B, k) each, resolved by the bank
        w = w if gain is None else w * gain[idx].to(w)  # a row's "no slot" keeps weight 0
        rows, rank, d_out = idx.shape[0], t[down].shape[1], out.shape[-1]
        flat = h.reshape(rows, -1, h.shape[-1])  # (B, L, width)
        d_rows, u_rows = self._gathered(t, h.dtype)  # (B, k·r, width), (B, k·r, d_out)
        z = torch.bmm(flat, d_rows.transpose(1, 2))  # (B, L, k·r)
        if down_bias:
            z = z + t[down_bias][idx].reshape(rows, 1, -1).to(h.dtype)
        z = self.activation(z) * self._rank_weights(w, rank, h.dtype, gain is None)[:, None]
        result = torch.baddbmm(out.reshape(rows, -1, d_out), z, u_rows)  # (B, L, d_out)
        if up_bias:
            bias = torch.einsum("bk,bkd->bd", w, t[up_bias][idx].float())  # (B, d_out)
            result = result + bias.to(h.dtype)[:, None]
        return result.reshape(out.shape)

    def _gathered(self, t: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k slots' down and up projections, (B, k·r, width) and (B, k·r, d_out).

        Without gradients and without a trainable slot, they cannot change while the routing
        holds, so they are gathered once per routing and kept for every later forward under it
        (every decoding step of one `generate` call, every label of one scoring batch): memory
        for speed, freed when the routing ends."""
        down, up = self.names.down, self.names.up
        idx = self.routing.indices
        (rows, k), rank = idx.shape, t[down].shape[1]

        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                t[down][idx].reshape(rows, k * rank, -1).to(dtype),
                t[up].transpose(1, 2)[idx].reshape(rows, k * rank, -1).to(dtype),
            )

        if torch.is_grad_enabled() or len(self.stack.trainable):
            return gather()
        return self.routing.derive(("rows", id(self), dtype), gather)

    def _rank_weights(
        self, w: torch.Tensor, rank: int, dtype: torch.dtype, cached: bool = True
    ) -> torch.Tensor:
        """(..., k·r) each slot's weight repeated over its r units, made once per routing
        (`cached`; weights that carry a gain change every forward and are made each time)."""

        def make() -> torch.Tensor:
            return w.repeat_interleave(rank, dim=-1).to(dtype)

        return self.routing.derive(("rank_weights", rank, dtype), make) if cached else make()
