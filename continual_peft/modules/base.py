"""The module-kind registry and the layer wrapping every low-rank kind shares.

The low-rank kinds (LoRA, adapters) wrap `nn.Linear` layers and transformers' `Conv1D` layers
(GPT-2's projections), chosen by name: a name suffix, an alias of one (`ALIASES`), a full regular
expression, or `"all-linear"` (every such layer but the model's head).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from continual_peft.errors import ContinualPeftError
from continual_peft.modules.lowrank import LowRankSite, conv1d_type
from continual_peft.registry import Registry

MODULE_KINDS: Registry = Registry("module kind")

ALL_LINEAR = "all-linear"


# One attention projection, several spellings; a plain target name matches all of them, so the
# default LoRA targets ["query", "value"] work on every family below:
# - BERT family: query / key / value (the name itself);
# - ViT family (transformers 5), Llama, Qwen2: q_proj / k_proj / v_proj;
# - GPT-2: c_attn, one fused Conv1D computing query, key and value (wrapped once, whole);
# - T5: q / k / v of every attention: the encoder's and decoder's SelfAttention and the
#   decoder's cross-attention (EncDecAttention). peft's default targets are the same per family.
ALIASES: dict[str, list[str]] = {
    "query": ["q_proj", "c_attn", "q"],
    "key": ["k_proj", "c_attn", "k"],
    "value": ["v_proj", "c_attn", "v"],
}
HEAD_NAMES = ("lm_head",)  # all-linear skips these, any pooler and get_output_embeddings()


def _matches(name: str, targets: list[str]) -> bool:
    suffixes = [*targets, *(alias for t in targets for alias in ALIASES.get(t, ()))]
    return any(name == t or name.endswith("." + t) for t in suffixes) or any(
        re.fullmatch(t, name) for t in targets
    )


def _is_head(name: str, module: nn.Module, output_embeddings: nn.Module | None) -> bool:
    """The LM head (tied to the vocabulary, not a transformer layer) or a pooler (not on the
    mean-pooled path): `all-linear` leaves them alone, as peft's does."""
    return module is output_embeddings or name.rsplit(".", 1)[-1] in HEAD_NAMES or "pooler" in name


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    from transformers import PreTrainedModel

    return model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer a site can wrap, by name: `nn.Linear`, `Conv1D`, and sites (two kinds on one
    layer: the new site wraps the old one, never the layer inside it)."""
    kinds = (nn.Linear, conv1d_type(), LowRankSite)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds) and not name.endswith(".base_layer")
    ]


def layer_endings(model: nn.Module) -> str:
    """The name endings of the layers a site can wrap, by kind, for error messages:
    `"lm_head (nn.Linear); c_attn, c_fc, c_proj (Conv1D)"`."""
    endings: dict[str, set[str]] = {"nn.Linear": set(), "Conv1D": set()}
    for name, module in _candidates(model):
        while isinstance(module, LowRankSite):
            module = module.base_layer
        kind = "Conv1D" if isinstance(module, conv1d_type()) else "nn.Linear"
        endings[kind].add(original_name(name).rsplit(".", 1)[-1])
    listed = "; ".join(f"{', '.join(sorted(e))} ({kind})" for kind, e in endings.items() if e)
    return listed or "nothing (it has no nn.Linear or Conv1D layer)"


def wrap_linear_layers(
    model: nn.Module, targets: list[str], make_site: Callable[[nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each `nn.Linear` or `Conv1D` whose name matches `targets` by `make_site(layer)`.

    Args:
        model: The backbone's Hugging Face model, changed in place.
        targets: Name suffixes (`"query"` matches `encoder.layer.0.attention.self.query`, and
            through `ALIASES` Llama's `layers.0.self_attn.q_proj`, GPT-2's `h.0.attn.c_attn`
            and T5's `block.0.layer.0.SelfAttention.q`), full regular expressions, or
            `["all-linear"]`: every such layer but the LM head (`lm_head`, or whatever
            `model.get_output_embeddings()` is) and any pooler.
        make_site: Builds the wrapper around one original layer (or around another kind's site).

    Returns:
        The new sites by the wrapped layer's name, as in the unwrapped model (without the
        `.base_layer` hops that other kinds' wrappers add), so names do not depend on the order
        in which kinds were injected.
    """
    candidates = _candidates(model)
    if targets == [ALL_LINEAR]:
        head = _output_embeddings(model)
        found = [(n, m) for n, m in candidates if not _is_head(original_name(n), m, head)]
    else:
        found = [(n, m) for n, m in candidates if _matches(original_name(n), targets)]
    if not found:
        hint = "" if targets == [ALL_LINEAR] else f" (or use ['{ALL_LINEAR}'])"
        raise ContinualPeftError(
            f"no nn.Linear layer matches targets {targets} (nor any Conv1D layer) in "
            f"{type(model).__name__}; its layers' names end in: {layer_endings(model)}{hint}"
        )
    sites = {}
    for name, layer in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        site = make_site(layer)
        setattr(parent, child, site)
        sites[original_name(name)] = site
    return sites


def original_name(name: str) -> str:
    """A module's name in the unwrapped model."""
    return name.replace(".base_layer.", ".")
