"""The layers an exported LoRA or (IA)^3 sits on, as peft and transformers see them.

`read_layout` builds the run's model from its config on the meta device (no weights read) to
learn its family (peft's task type: `CAUSAL_LM`, `SEQ_2_SEQ_LM`, none for an encoder) and the kind
of each wrapped layer: an `nn.Linear` (weight (d_out, d_in): `x W^T`) or transformers' `Conv1D`
(GPT-2; weight (d_in, d_out): `x W`, which peft marks with `fan_in_fan_out`). `merge_lora` adds a
LoRA's delta `scale · B A` (d_out, d_in) into each layer's weight in the layer's own layout;
`merge_ia3` scales each layer's weight (and bias) by an (IA)^3 vector, likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from continual_peft.backbones.load import AUTO_CLASSES, family
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.ia3 import OUT

TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}  # peft's; other families: none
LINEAR, CONV1D = "nn.Linear", "Conv1D"


def _conv1d() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return LINEAR
    return CONV1D if isinstance(module, _conv1d()) else type(module).__name__


@dataclass
class Layout:
    """A model's family and every module's kind, by name (as `named_modules` names them)."""

    path: str  # where the model was read from, for messages
    family: str  # `backbones.load.family` of its config
    # module name -> LINEAR, CONV1D or the module's class name; None: an encoder whose config
    # is not at hand (built in memory, or moved), whose LoRA exports onto nn.Linear layers
    kinds: dict[str, str] | None

    @property
    def task_type(self) -> str | None:
        return TASK_TYPES.get(self.family)

    @property
    def generative(self) -> bool:
        """The model's own LM head answers every task (no head of ours)."""
        return self.family in TASK_TYPES

    def check(self, layers: list[str], task: str) -> None:
        """Refuse a module on a layer the model lacks or that is no Linear or Conv1D layer."""
        if self.kinds is None:
            return
        bad = [name for name in layers if self.kinds.get(name) not in (LINEAR, CONV1D)]
        if bad:
            found = ", ".join(f"{n!r} ({self.kinds.get(n, 'no such layer')})" for n in bad[:3])
            raise ContinualPeftError(
                f"task {task!r}: its module wraps layer(s) that backbone {self.path} has no "
                f"nn.Linear or Conv1D layer of: {found}; is this the run's backbone?"
            )

    def fan_in_fan_out(self, layers: list[str]) -> bool:
        """peft's flag for LoRA on Conv1D layers (GPT-2): their weight is (d_in, d_out)."""
        return self.kinds is not None and any(self.kinds[name] == CONV1D for name in layers)

    def suffixes_select(self, layers: list[str], suffixes: set[str]) -> bool:
        """Whether peft, matching module names by these suffixes, would wrap `layers` only."""
        assert self.kinds is not None, "no model to match names against"
        matched = {
            name
            for name in self.kinds
            if any(name == s or name.endswith("." + s) for s in suffixes)
        }
        return matched == set(layers)


def read_layout(path: str, model_class: str) -> Layout:
    """The layout of the model at `path` (a folder or a cached model's name), built from its
    config on the meta device.

    Args:
        path: Where the run's backbone is.
        model_class: Its class name, as the run's fingerprint records it (for a config that
            cannot be read: an encoder's is assumed to hold nn.Linear layers only).

    Raises:
        ContinualPeftError: A language model whose config cannot be read (moved, missing or
            built in memory): only its config tells Conv1D layers from nn.Linear ones.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto as auto_names

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        lm_classes = {
            *auto_names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
            *auto_names.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values(),
        }
        if model_class not in lm_classes:
            return Layout(path, "encoder", None)
        raise ContinualPeftError(
            f"cannot read the config of backbone {path!r} ({model_class}): {err}. The export "
            "reads it to tell the LoRA's layers apart (nn.Linear or Conv1D) as peft does; if "
            "the model moved, pass its folder as --backbone (backbone=...)."
        ) from err
    kind = family(config)
    auto = getattr(transformers, AUTO_CLASSES.get(kind, "AutoModel"))
    with torch.device("meta"):  # shapes and names only: nothing allocated, nothing read
        model = auto.from_config(config)
    return Layout(path, kind, {name: _kind(m) for name, m in model.named_modules()})


def merge_lora(model: nn.Module, sites: dict[str, dict[str, torch.Tensor]]) -> None:
    """Add each site's `scale · B @ A` into its layer's weight, in place: as it is into an
    `nn.Linear`'s (d_out, d_in) weight, transposed into a `Conv1D`'s (d_in, d_out) one.

    Args:
        model: The Hugging Face model, its layers unwrapped.
        sites: Layer name -> `lora_A` (r, d_in), `lora_B` (d_out, r), `scale` (a 0-dim tensor).

    Raises:
        ContinualPeftError: A layer the model lacks or of another kind, or a LoRA whose sizes
            are not the layer's.
    """
    with torch.no_grad():
        for layer, parts in sites.items():
            module, kind = _merge_target(model, layer, "a LoRA")
            delta = parts["scale"] * (parts["lora_B"] @ parts["lora_A"])  # (d_out, d_in)
            if kind == CONV1D:
                delta = delta.T  # (d_in, d_out), as Conv1D computes x W + b
            if delta.shape != module.weight.shape:
                raise ContinualPeftError(_shape_message(layer, kind, parts, module.weight))
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))


def merge_ia3(model: nn.Module, sites: dict[str, dict[str, torch.Tensor]]) -> None:
    """Scale each layer by its (IA)^3 vector l = 1 + δ, in place, exactly as the vector acts:
    on the output (`ia3_out`, (d_out,)): the weight's output rows and the bias; on the input
    (`ia3_in`, (d_in,)): the weight's input columns (`(x * l) W^T + b` leaves the bias). An
    `nn.Linear`'s weight is (d_out, d_in), a `Conv1D`'s (d_in, d_out).

    Args:
        model: The Hugging Face model, its layers unwrapped.
        sites: Layer name -> `ia3_in` or `ia3_out`: δ (a vector).

    Raises:
        ContinualPeftError: A layer the model lacks or of another kind, or a vector whose size
            is not the layer's.
    """
    with torch.no_grad():
        for layer, parts in sites.items():
            module, kind = _merge_target(model, layer, "an (IA)^3 vector")
            ((side, delta),) = parts.items()
            on_output = side == OUT
            out_dim = 0 if kind == LINEAR else 1  # where the weight keeps the layer's outputs
            dim = out_dim if on_output else 1 - out_dim
            weight = module.weight
            if weight.shape[dim] != delta.numel():
                raise ContinualPeftError(
                    f"the (IA)^3 vector of {layer!r} scales {delta.numel()} "
                    f"{'outputs' if on_output else 'inputs'}, but the {kind} layer's weight is "
                    f"{tuple(weight.shape)}; it cannot be merged"
                )
            scale = (1 + delta.float()).reshape([-1 if d == dim else 1 for d in range(2)])
            weight.copy_((weight.float() * scale).to(weight.dtype))
            if on_output and module.bias is not None:
                module.bias.copy_((module.bias.float() * scale.flatten()).to(module.bias.dtype))


def _merge_target(model: nn.Module, layer: str, what: str) -> tuple[nn.Module, str]:
    """The layer named `layer` and its kind (LINEAR or CONV1D), refused if it is neither."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    kind = "no such layer" if module is None else _kind(module)
    if kind not in (LINEAR, CONV1D):
        raise ContinualPeftError(
            f"the backbone has no nn.Linear or Conv1D layer {layer!r} to merge {what} into ({kind})"
        )
    return module, kind


def _shape_message(layer: str, kind: str, parts: dict, weight: torch.Tensor) -> str:
    d_out, d_in = parts["lora_B"].shape[0], parts["lora_A"].shape[1]
    stored = "(d_in, d_out)" if kind == CONV1D else "(d_out, d_in)"
    return (
        f"the LoRA of {layer!r} maps d_in {d_in} to d_out {d_out} (lora_A "
        f"{tuple(parts['lora_A'].shape)}, lora_B {tuple(parts['lora_B'].shape)}), but the "
        f"{kind} layer's weight is {tuple(weight.shape)}, stored {stored}; it cannot be merged"
    )
