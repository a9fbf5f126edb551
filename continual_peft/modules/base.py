"""The module-kind registry and the layer wrapping every low-rank kind shares."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from continual_peft.errors import ContinualPeftError
from continual_peft.modules._lowrank import LowRankSite
from continual_peft.registry import Registry

MODULE_KINDS: Registry = Registry("module kind")

ALL_LINEAR = "all-linear"


# One attention projection, two spellings: BERT-family models name them query/key/value, the ViT
# family in transformers 5 (and Llama-style models) q_proj/k_proj/v_proj. A plain target name
# matches both, so the default LoRA targets ["query", "value"] work on either.
ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def _matches(name: str, targets: list[str]) -> bool:
    if targets == [ALL_LINEAR]:
        return "pooler" not in name  # the pooler is not on the mean-pooled path
    suffixes = [*targets, *(ALIASES[t] for t in targets if t in ALIASES)]
    return any(name == t or name.endswith("." + t) for t in suffixes) or any(
        re.fullmatch(t, name) for t in targets
    )


def wrap_linear_layers(
    model: nn.Module, targets: list[str], make_site: Callable[[nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each `nn.Linear` whose name matches `targets` by `make_site(layer)`.

    Args:
        model: The backbone's Hugging Face model, changed in place.
        targets: Name suffixes (`"query"` matches `encoder.layer.0.attention.self.query`, and
            ViT's `layers.0.attention.q_proj` through `ALIASES`), full regular expressions, or
            `["all-linear"]`.
        make_site: Builds the wrapper around one original layer.

    Returns:
        The new sites by the wrapped layer's name, as in the unwrapped model (without the
        `.base_layer` hops that other kinds' wrappers add), so names do not depend on the order
        in which kinds were injected.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | LowRankSite)
        and not name.endswith(".base_layer")  # already wrapped: wrap the wrapper instead
        and _matches(original_name(name), targets)
    ]
    if not found:
        suffixes = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        conv = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
        )
        if conv and targets == [ALL_LINEAR] or conv and not suffixes:
            raise ContinualPeftError(
                f"no nn.Linear layer matches targets {targets}: this backbone "
                f"({type(model).__name__}) projects with transformers' Conv1D layers "
                f"({', '.join(conv)}), GPT-2 style, which these module kinds cannot wrap yet; "
                "use an encoder backbone (BERT family, ViT), or the prompt kind"
            )
        raise ContinualPeftError(
            f"no nn.Linear layer matches targets {targets}; this backbone's linear layers end in: "
            f"{', '.join(suffixes)} (or use ['{ALL_LINEAR}'])"
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
