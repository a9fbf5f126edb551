"""Which hidden layers the frozen features read: the `layers` setting of a router.

Frozen features are mean-pooled hidden states of the bare backbone. A router may read the last
layer alone or several depths side by side: earlier layers keep more of what tells domains and
styles apart, which the last layer (tuned to meaning) partly washes out. Measured on the bundled
all-MiniLM-L6-v2 (benchmarks/RESULTS.md, "Routing toward the oracle"): Mahalanobis routing over
layers 2, 4 and 6 side by side sent 99.6 % of the four shared tasks' test inputs to their task,
against 96.1 % on the last layer alone.

A setting is one of:
- "last": the last layer (the encoder's last, for an encoder-decoder);
- "auto": layers at a third, two thirds and all of the depth, side by side, as long as the width
  stays within `AUTO_WIDTH` features; else the middle and last layer; else the last alone;
- a list of depths: 0 is the embeddings, 1..n the blocks, negative numbers count from the end
  (-1 is the last block).

A setting whose deepest depth k is below the last block costs a shallow pass: the embeddings and
blocks 1..k run, the rest of the forward does not (`states_upto`), so `layers = [2]` on a 6-block
backbone costs about 2/6 of a forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from continual_peft.errors import ContinualPeftError

# "auto" keeps the features at most this wide: a router's shared covariance is width² float64
# numbers (4096 features: 134 MB), kept with the run.
AUTO_WIDTH = 4096
LAYER_CHOICES = ("last", "auto")


def check_layers(layers: object, where: str) -> str | list[int]:
    """A valid `layers` setting (see the module docstring), lists as a list of ints.

    Raises:
        ContinualPeftError: anything else, naming the valid forms.
    """
    if isinstance(layers, str) and layers in LAYER_CHOICES:
        return layers
    valid = isinstance(layers, list | tuple) and len(layers) > 0
    valid = valid and all(isinstance(d, int) and not isinstance(d, bool) for d in layers)
    if valid and len(set(layers)) == len(layers):
        return [int(d) for d in layers]
    raise ContinualPeftError(
        f'{where}: layers must be "last", "auto" or a list of distinct layer depths '
        f"(0 = embeddings, 1..n = blocks, -1 = the last), got {layers!r}"
    )


def feature_depths(layers: str | list[int], blocks: int, width: int) -> list[int]:
    """The hidden-state depths a setting reads on a backbone of `blocks` blocks whose states
    are `width` wide, in 0..blocks (0: the embeddings).

    Raises:
        ContinualPeftError: a depth beyond the backbone's blocks, naming how many it has.
    """
    if layers == "last":
        return [blocks]
    if layers == "auto":
        for parts in (3, 2, 1):
            if parts * width <= AUTO_WIDTH or parts == 1:
                picked = [max(1, round(blocks * i / parts)) for i in range(1, parts + 1)]
                return list(dict.fromkeys(picked))
    depths = []
    for depth in layers:
        if not -blocks - 1 <= depth <= blocks:
            raise ContinualPeftError(
                f"layers: depth {depth} is out of range for a backbone with {blocks} blocks "
                f"(0 = embeddings, 1..{blocks}, or -1..-{blocks + 1} from the end)"
            )
        depths.append(depth % (blocks + 1))
    if len(set(depths)) < len(depths):
        raise ContinualPeftError(
            f"layers: {layers} name the same layer twice on a backbone with {blocks} blocks "
            f"(as depths 0..{blocks}: {depths}); give each layer once"
        )
    return depths


class _Reached(Exception):
    """Raised by the pre-hook of the first block past the deepest depth read: the pass stops."""


def find_blocks(root: nn.Module, count: int) -> nn.ModuleList | None:
    """The blocks the hidden states come out of: the one outermost `nn.ModuleList` of `count`
    modules under `root` (BERT's `encoder.layer`, ViT's `layers`, Llama's and Qwen2's
    `model.layers`, GPT-2's `transformer.h`, T5's encoder `block`, BART's encoder `layers`);
    None when there is none, or more than one (a shallow pass then runs the whole forward)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in root.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(module, nn.ModuleList) and len(module) == count and not inside:
            found.append((name, module))
    return found[0][1] if len(found) == 1 else None


def states_upto(
    forward: Callable[[], Any], blocks: nn.ModuleList | None, depth: int
) -> tuple[torch.Tensor, ...]:
    """The hidden states at depths 0..`depth` (embeddings, then blocks 1..depth) of one pass.

    The state at depth j < n is what block j + 1 reads, so below the last block a pre-hook on
    each of blocks 1..depth + 1 keeps its input and the one on block depth + 1 ends the pass:
    only the embeddings and blocks 1..depth run. At the last depth, or without known `blocks`,
    the whole forward runs and its `hidden_states` are taken (the last one is the model's last
    output, after any final norm, which no block reads).

    Args:
        forward: Runs the model on the batch with `output_hidden_states`; returns its output.
        blocks: The model's blocks (`find_blocks`), or None.
        depth: The deepest state wanted, 0..len(blocks).
    """
    if blocks is None or depth >= len(blocks):
        return tuple(forward().hidden_states[: depth + 1])
    kept: list[torch.Tensor] = []

    def keep(block: nn.Module, args: tuple, kwargs: dict) -> None:
        kept.append(args[0] if args else kwargs["hidden_states"])  # (B, L, d)
        if len(kept) > depth:
            raise _Reached

    hooks = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in blocks[: depth + 1]]
    try:
        out = forward()
    except _Reached:
        return tuple(kept)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(out.hidden_states[: depth + 1])  # the blocks were not the ones it ran
