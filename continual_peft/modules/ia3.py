"""(IA)^3: learned vectors that rescale the keys, the values and the feed-forward activation.

Liu et al., NeurIPS 2022 ("Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"), as peft's `IA3Model` implements it, so the same vectors give peft's outputs.
For each target layer f a slot holds one vector l:

- on a feed-forward target, the layer's input is scaled: `f(x * l)`, l: (d_in,);
- on any other target (keys, values), the layer's output is: `f(x) * l`, l: (d_out,).

A slot stores the delta δ = l − 1, named by where it acts: `ia3_in` (d_in,) or `ia3_out`
(d_out,). A fresh slot (δ = 0) leaves the output bit-identical, and a bfloat16 frozen stack keeps a
small δ exactly, where 1 + δ would round it away. Per row, slots mix as the multiplier
`m = 1 + Σ_k w_k δ_k` (a row with no slot has weight 0: m = 1), applied as `h + h · (m − 1)` so
the sum never passes through a rounded 1 + δ either; one gather and one multiply serve the whole
batch, whatever its slots.

Default targets (`"auto"`) are peft's for the backbone's model type (`DEFAULTS`), matched as peft
matches them: a target is a name suffix (`key` matches `encoder.layer.0.attention.self.key`), and
a target layer is feed-forward when its name ENDS WITH a feed-forward entry, dot or no dot. So on
BERT, peft's `"output.dense"` matches both `layer.N.attention.output.dense` and
`layer.N.output.dense`, and both have their input scaled: four sites per layer (key, value and
both output projections), as in peft. GPT-2's fused `c_attn` (query, key and value in one Conv1D)
is scaled as a whole, as peft does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from continual_peft.backbones.placement import CPU
from continual_peft.backbones.quantization import compute_dtype
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.base import (
    MODULE_KINDS,
    check_targets,
    layer_endings,
    original_name,
    target_layers,
    wrap_layers,
)
from continual_peft.modules.lowrank import layer_sizes
from continual_peft.modules.routing import Routing
from continual_peft.modules.stack import SlotStack, StackedSite

AUTO = "auto"
IN, OUT = "ia3_in", "ia3_out"  # a slot's δ on the layer's input (feed-forward) or output

# (targets, feed-forward targets) by model type: peft 0.22's
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING for the
# families this package runs (Qwen2's queries, not keys, are peft's choice). peft has none for the
# ViT family (transformers 5 names: ViT, DeiT, BEiT, DINOv2); ours follows the paper there: keys,
# values, and the input of the MLP's second layer (its activation).
_VIT = (["k_proj", "v_proj", "mlp.fc2"], ["mlp.fc2"])
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),  # MiniLM too
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    **{vit: _VIT for vit in ("vit", "deit", "beit", "dinov2")},
}


@dataclass
class IA3Config:
    """(IA)^3 settings; peft's `target_modules` and `feedforward_modules`."""

    # ["auto"]: peft's defaults for the backbone's model type (DEFAULTS); else name suffixes,
    # full regular expressions or ["all-linear"], as LoRA's targets
    targets: list[str] = field(default_factory=lambda: [AUTO])
    # which targets have their input scaled: a target whose name ends with an entry (or matches
    # it as a full regular expression); ["auto"]: peft's for the model type; [] = none
    feedforward: list[str] = field(default_factory=lambda: [AUTO])

    def __post_init__(self) -> None:
        for key, value in (("targets", self.targets), ("feedforward", self.feedforward)):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ContinualPeftError(
                    f"ia3 {key} = {value!r} is invalid; it must be a list of layer name "
                    f'suffixes or regular expressions, e.g. ["key", "value"], or ["{AUTO}"]'
                )
            if AUTO in value and value != [AUTO]:
                raise ContinualPeftError(
                    f'ia3 {key} = {value!r} mixes "{AUTO}" with names; give ["{AUTO}"] alone '
                    "(peft's defaults for the backbone) or names only"
                )
        if not self.targets:
            raise ContinualPeftError(
                f'ia3 targets = [] selects no layer; give layer names or ["{AUTO}"]'
            )
        check_targets(self.targets, "ia3 targets")
        if self.feedforward:  # [] is valid here: no layer has its input scaled
            check_targets(self.feedforward, "ia3 feedforward")


def resolve(config: IA3Config, model: nn.Module) -> tuple[list[str], list[str]]:
    """The (targets, feed-forward entries) `config` means on `model`: "auto" read off DEFAULTS
    for the model's type.

    Raises:
        ContinualPeftError: "auto" on a model type DEFAULTS does not know, naming the types it
            knows and the model's layer name endings.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for key, value in (("targets", config.targets), ("feedforward", config.feedforward)):
        if value == [AUTO] and model_type not in DEFAULTS:
            raise ContinualPeftError(
                f"ia3 {key} = ['{AUTO}'] takes peft's defaults, known here for model types "
                f"{', '.join(sorted(DEFAULTS))}; this backbone is {model_type!r} "
                f"({type(model).__name__}): set [ia3] targets and feedforward ([] for none) to "
                f"name endings of its layers: {layer_endings(model)}"
            )
    targets, feedforward = DEFAULTS.get(model_type, ([], []))
    return (
        list(targets if config.targets == [AUTO] else config.targets),
        list(feedforward if config.feedforward == [AUTO] else config.feedforward),
    )


def is_feedforward(name: str, feedforward: list[str]) -> bool:
    """Whether a target layer's input is scaled: peft's rule (the name ends with an entry, dot
    or no dot), or an entry that matches the whole name as a regular expression."""
    return any(name.endswith(f) or re.fullmatch(f, name) for f in feedforward)


class IA3Site(StackedSite):
    """`base_layer(x * m)` (feed-forward) or `base_layer(x) * m`, m = 1 + Σ w δ per row.

    Args:
        base_layer: The frozen original layer: `nn.Linear`, `Conv1D` or another kind's site.
        routing: The bank's routing state for this module kind.
        feedforward: Scale the layer's input (d_in) rather than its output (d_out).
        dtype: The frozen slots' dtype where the wrapped layer's weight does not tell it (a
            bitsandbytes 8-bit layer's int8 weight): the backbone's compute dtype.
    """

    def __init__(
        self, *, base_layer: nn.Module, routing: Routing, feedforward: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.feedforward = feedforward
        self.d_out, self.d_in = layer_sizes(base_layer)
        self.name = IN if feedforward else OUT
        self.width = self.d_in if feedforward else self.d_out
        weight = base_layer.weight  # for its device; a quantized weight's dtype is no float
        like = torch.empty(0, dtype=compute_dtype(base_layer, dtype), device=weight.device)
        self.stack = SlotStack({self.name: (self.width,)}, like)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen slots are stored in."""
        return getattr(self.stack, self.name).dtype

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (for its dtype and device), as that layer stores it."""
        return self.base_layer.weight

    def add_slot(self, generator: torch.Generator) -> None:
        self.stack.open({self.name: torch.zeros(self.width, device=CPU)})  # l = 1: no change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing.off:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(self._scaled(x))
        return self._scaled(self.base_layer(x))

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        """`h * m` as `h + h · (m − 1)`, with m − 1 = Σ w δ per row (one slot: its δ)."""
        routing = self.routing
        if routing.single is not None:
            delta = self.stack.slot(routing.single)[self.name]  # (d,)
            return torch.addcmul(h, h, delta.to(h.dtype))
        if routing.shared:  # every row on the same mix
            idx, w = routing.indices[0], routing.weights[0]  # (k,) each
            delta = w @ self.stack.stacked()[self.name][idx].float()  # (d,)
            return torch.addcmul(h, h, delta.to(h.dtype))
        delta = self._row_deltas(h.dtype)  # (B, d)
        rows = h.reshape(delta.shape[0], -1, h.shape[-1])  # (B, L, d)
        return torch.addcmul(rows, rows, delta[:, None]).reshape(h.shape)

    def _row_deltas(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, d) each row's Σ_k w_k δ_k. Without gradients and without a trainable slot it
        cannot change while the routing holds, so it is made once per routing and kept for every
        later forward under it (every decoding step of one `generate` call)."""
        routing = self.routing

        def mix() -> torch.Tensor:
            gathered = self.stack.stacked()[self.name][routing.indices].float()  # (B, k, d)
            return torch.einsum("bk,bkd->bd", routing.weights, gathered).to(dtype)

        if torch.is_grad_enabled() or len(self.stack.trainable):
            return mix()
        return routing.derive(("ia3", id(self), dtype), mix)


@MODULE_KINDS.register("ia3", options=IA3Config)
class IA3:
    """The `ia3` module kind: wraps the target `nn.Linear` and `Conv1D` layers."""

    def __init__(self, **options: Any) -> None:
        self.config = IA3Config(**options)

    def inject(self, backbone, routing: Routing) -> dict[str, nn.Module]:
        """Wrap the target layers of `backbone.model` in place and return the new sites.

        Raises:
            ContinualPeftError: targets that select no layer, or a feed-forward entry that
                matches none of the selected layers (both naming the layers' name endings).
        """
        model = backbone.model
        targets, feedforward = resolve(self.config, model)
        chosen = target_layers(model, targets)  # (name, layer), nothing changed yet
        names = [original_name(name) for name, _ in chosen]
        if self.config.feedforward != [AUTO]:
            _check_feedforward(feedforward, names, targets)
        on_input = {
            id(layer): is_feedforward(name, feedforward)
            for name, (_, layer) in zip(names, chosen, strict=True)
        }
        return wrap_layers(
            model,
            chosen,
            lambda layer: IA3Site(
                base_layer=layer,
                routing=routing,
                feedforward=on_input[id(layer)],
                dtype=backbone.dtype,
            ),
        )


def _check_feedforward(feedforward: list[str], layers: list[str], targets: list[str]) -> None:
    """Refuse an explicit feed-forward entry that matches none of the target layers."""
    for entry in feedforward:
        if not any(is_feedforward(name, [entry]) for name in layers):
            endings = sorted({".".join(name.split(".")[-2:]) for name in layers})
            raise ContinualPeftError(
                f"ia3 feedforward entry {entry!r} matches none of the layers targets {targets} "
                f"select; their names end in: {', '.join(endings)}. A feed-forward entry names "
                "the end of a target layer's name (or [] for none)"
            )
