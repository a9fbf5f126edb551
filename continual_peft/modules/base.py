"""The module-kind registry and the layer wrapping every layer-wrapping kind shares.

The low-rank kinds (LoRA, adapters) wrap `nn.Linear` layers and transformers' `Conv1D` layers
(GPT-2's projections), chosen by name: a name suffix, an alias of one (`ALIASES`), a full regular
expression, or `"all-linear"` (every such layer but the model's head). BitFit picks its layers
itself (those with a bias) and wraps them with the same `wrap_layers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from continual_peft.errors import ContinualPeftError
from continual_peft.modules.lowrank import conv1d_type
from continual_peft.modules.stack import wrapped_layer
from continual_peft.registry import Registry

MODULE_KINDS: Registry = Registry("module kind")

ALL_LINEAR = "all-linear"
HYBRID = "+"  # joins the kinds of a hybrid slot: "lora+prompt"
# kinds that are a strategy's whole method, never one part of a hybrid slot (L2P's pool picks
# its prompts per input by its own keys)
WHOLE_METHOD_KINDS = ("prompt_pool",)


def kind_parts(kind: str, where: str = "module") -> tuple[str, ...]:
    """The registered kinds a slot of `kind` holds: `("lora",)` for `"lora"`, and for a hybrid
    slot, `"lora+prompt"` (UniPELT, He et al. 2022's MAM adapter: several kinds trained, routed
    and saved together as one task's slot), each part in the order written.

    Raises:
        ContinualPeftError: naming `where`, an unknown part, a part written twice, an empty part,
            or a kind that cannot be one part of several (`WHOLE_METHOD_KINDS`).
    """
    parts = tuple(kind.split(HYBRID))
    valid = ", ".join(MODULE_KINDS.names())
    for part in parts:
        if part not in MODULE_KINDS:
            what = "an empty part" if not part else f"unknown module kind {part!r}"
            hybrid = f" in {kind!r}" if len(parts) > 1 else ""
            raise ContinualPeftError(
                f"{where}: {what}{hybrid}; valid names: {valid}, or several joined by "
                f"'{HYBRID}' for a hybrid slot (e.g. 'lora{HYBRID}prompt')"
            )
    if len(parts) > 1:
        twice = sorted({part for part in parts if parts.count(part) > 1})
        if twice:
            raise ContinualPeftError(
                f"{where}: hybrid slot {kind!r} names {twice} twice; each kind is one part of "
                "a slot once (its size is set in its own section, e.g. [lora] r)"
            )
        whole = [part for part in parts if part in WHOLE_METHOD_KINDS]
        if whole:
            parts_ok = [k for k in MODULE_KINDS.names() if k not in WHOLE_METHOD_KINDS]
            raise ContinualPeftError(
                f"{where}: {whole[0]!r} cannot be one part of hybrid slot {kind!r}: its prompts "
                "are chosen per input by its own keys (the l2p strategy's whole method); "
                f"combine any of {', '.join(parts_ok)}"
            )
    return parts


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


def check_targets(targets: object, what: str) -> None:
    """Refuse `targets` that are not a list of names, or hold a name that is no valid regular
    expression (a target may be one: it is matched as a suffix and as a full expression).

    Raises:
        ContinualPeftError: `<what> = <targets> is invalid; ...`, naming the bad entry.
    """
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ContinualPeftError(
            f"{what} = {targets!r} is invalid; it must be a non-empty list of layer name endings "
            f'or regular expressions, e.g. ["query", "value"] or ["{ALL_LINEAR}"]'
        )
    for target in targets:
        try:
            re.compile(target)
        except re.error as err:
            raise ContinualPeftError(
                f"{what} = {targets!r} is invalid: {target!r} is not a valid regular expression "
                f"({err}); a target is a layer name's ending ('query') or a full regular "
                "expression ('.*attention.*')"
            ) from None


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
    """Every layer a low-rank site can wrap, by name: `nn.Linear`, `Conv1D`, and other kinds'
    sites on them."""
    kinds = (nn.Linear, conv1d_type())
    return layers_where(model, lambda layer: isinstance(layer, kinds))


def layers_where(
    model: nn.Module, accept: Callable[[nn.Module], bool]
) -> list[tuple[str, nn.Module]]:
    """The layers of `model` that `accept` (given the original layer under any sites), by
    name, each once: another kind's site on a layer stands for it (two kinds on one layer: the
    new site wraps the old one, never the layer inside it)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if accept(wrapped_layer(module)) and not name.endswith(".base_layer")
    ]


def without_heads(
    model: nn.Module, layers: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """`layers` (name, module) but the LM head (`lm_head`, or whatever
    `model.get_output_embeddings()` is) and any pooler: what `all-linear` wraps."""
    head = _output_embeddings(model)
    return [(n, m) for n, m in layers if not _is_head(original_name(n), wrapped_layer(m), head)]


def layer_endings(model: nn.Module) -> str:
    """The name endings of the layers a site can wrap, by kind, for error messages:
    `"lm_head (nn.Linear); c_attn, c_fc, c_proj (Conv1D)"`."""
    endings: dict[str, set[str]] = {"nn.Linear": set(), "Conv1D": set()}
    for name, module in _candidates(model):
        kind = "Conv1D" if isinstance(wrapped_layer(module), conv1d_type()) else "nn.Linear"
        endings[kind].add(original_name(name).rsplit(".", 1)[-1])
    listed = "; ".join(f"{', '.join(sorted(e))} ({kind})" for kind, e in endings.items() if e)
    return listed or "nothing (it has no nn.Linear or Conv1D layer)"


def wrap_linear_layers(
    model: nn.Module, targets: list[str], make_site: Callable[[nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each `nn.Linear` or `Conv1D` whose name matches `targets` by `make_site(layer)`.

    Args:
        model: The backbone's Hugging Face model, changed in place.
        targets: As `target_layers` takes them.
        make_site: Builds the wrapper around one original layer (or around another kind's site).

    Returns:
        The new sites by the wrapped layer's name, as in the unwrapped model (without the
        `.base_layer` hops that other kinds' wrappers add), so names do not depend on the order
        in which kinds were injected.
    """
    return wrap_layers(model, target_layers(model, targets), make_site)


def target_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The `nn.Linear` and `Conv1D` layers (or other kinds' sites on them) whose names match
    `targets`, as (name in `model` now, module), without changing anything.

    Args:
        model: The backbone's Hugging Face model.
        targets: Name suffixes (`"query"` matches `encoder.layer.0.attention.self.query`, and
            through `ALIASES` Llama's `layers.0.self_attn.q_proj`, GPT-2's `h.0.attn.c_attn`
            and T5's `block.0.layer.0.SelfAttention.q`), full regular expressions, or
            `["all-linear"]`: every such layer but the LM head (`lm_head`, or whatever
            `model.get_output_embeddings()` is) and any pooler.

    Raises:
        ContinualPeftError: no layer matches, naming the model's layer name endings.
    """
    candidates = _candidates(model)
    if targets == [ALL_LINEAR]:
        found = without_heads(model, candidates)
    else:
        found = [(n, m) for n, m in candidates if _matches(original_name(n), targets)]
    if not found:
        hint = "" if targets == [ALL_LINEAR] else f" (or use ['{ALL_LINEAR}'])"
        raise ContinualPeftError(
            f"no nn.Linear layer matches targets {targets} (nor any Conv1D layer) in "
            f"{type(model).__name__}; its layers' names end in: {layer_endings(model)}{hint}"
        )
    return found


def wrap_layers(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    make_site: Callable[[nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Replace each (name, layer) of `layers`, named as in `model` now, by `make_site(layer)`.

    Returns:
        The new sites by the wrapped layer's name in the unwrapped model (`original_name`).
    """
    sites = {}
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        site = make_site(layer)
        setattr(parent, child, site)
        sites[original_name(name)] = site
    return sites


def original_name(name: str) -> str:
    """A module's name in the unwrapped model."""
    return name.replace(".base_layer.", ".")
