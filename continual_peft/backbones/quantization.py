"""Quantized frozen backbones: 8-bit and 4-bit base weights through bitsandbytes (QLoRA-style).

The backbone is frozen, so its linear layers can hold their weights in 8 bits (LLM.int8,
Dettmers et al. 2022) or 4 bits (NF4 with double quantization, QLoRA, Dettmers et al. 2023)
while every slot (LoRA, adapters, prompts, prefixes) trains in full precision beside them. The
quantizer is bitsandbytes, driven by `transformers`' own `BitsAndBytesConfig` at load time;
nothing here quantizes a tensor by hand.

- `Quantization.of(settings)`: what a `BackboneConfig` asks for (None: full precision);
- `Quantization.hf_config(dtype)`: the `BitsAndBytesConfig` that loads it, computing in the
  precision policy's dtype (`backbones.placement`);
- `saved_quantization(config, path)`: a folder that was saved quantized (bitsandbytes loads as
  it is; GPTQ, AWQ and the like are refused by name);
- `quantized_layers`, `parameter_count`, `memory_bytes`: what a loaded model holds.

Requires the optional extra: `pip install -e ".[quant]"` (bitsandbytes, accelerate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from continual_peft.errors import ContinualPeftError

QUANTIZE = ("none", "8bit", "4bit")
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
EXTRA = 'pip install -e ".[quant]"  (or: pip install "continual-peft[quant]")'
# bitsandbytes logs on every 8-bit matmul that it casts its input to float16: expected, not news
CAST_WARNING = "MatMul8bitLt: inputs will be cast"


@dataclass(frozen=True)
class Quantization:
    """How the frozen linear layers store their weights.

    Attributes:
        bits: 4 (`bnb.nn.Linear4bit`) or 8 (`bnb.nn.Linear8bitLt`).
        quant_type: 4-bit data type: "nf4" (normal float, QLoRA's) or "fp4".
        double_quant: 4-bit: quantize the per-block scales too (QLoRA's double quantization,
            about 0.37 bits per weight saved).
        int8_threshold: 8-bit: LLM.int8's outlier threshold; input features with a larger
            magnitude are multiplied in 16 bits.
        skip: Layer names (suffixes) kept in full precision (`llm_int8_skip_modules`); empty:
            transformers' own choice (the LM head and tied layers stay unquantized).
    """

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    int8_threshold: float = 6.0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """The other setting's details at their defaults, so that equal settings compare equal
        however they were read (a saved 8-bit config also holds 4-bit fields)."""
        if self.bits not in (4, 8):
            raise ContinualPeftError(f"quantization bits must be 4 or 8, got {self.bits!r}")
        unused = ("quant_type", "double_quant") if self.bits == 8 else ("int8_threshold",)
        for name in unused:
            object.__setattr__(self, name, type(self).__dataclass_fields__[name].default)
        object.__setattr__(self, "skip", tuple(self.skip))

    @classmethod
    def of(cls, settings: Any) -> Quantization | None:
        """The quantization a `BackboneConfig` (or anything with its quantization fields)
        asks for; None for `quantize = "none"`."""
        if settings.quantize == "none":
            return None
        return cls(
            bits=int(settings.quantize.removesuffix("bit")),
            quant_type=settings.quant_type,
            double_quant=bool(settings.double_quant),
            int8_threshold=float(settings.int8_threshold),
            skip=tuple(settings.quant_skip),
        )

    @property
    def name(self) -> str:
        """The `quantize` setting: "4bit" or "8bit"."""
        return f"{self.bits}bit"

    def describe(self) -> str:
        """One line for reports and messages, e.g. "4bit (nf4, double quantization)"."""
        if self.bits == 4:
            double = ", double quantization" if self.double_quant else ""
            facts = f"{self.quant_type}{double}"
        else:
            facts = f"LLM.int8, outlier threshold {self.int8_threshold:g}"
        skip = f", {', '.join(self.skip)} kept in full precision" if self.skip else ""
        return f"{self.name} ({facts}{skip})"

    def bnb_arguments(self, compute_dtype: torch.dtype | str) -> dict[str, Any]:
        """`transformers.BitsAndBytesConfig`'s keyword arguments for these settings, a 4-bit
        layer computing in `compute_dtype` (a dtype, or its name as a run records it)."""
        if self.bits == 4:
            arguments = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": compute_dtype,
            }
        else:
            arguments = {"load_in_8bit": True, "llm_int8_threshold": self.int8_threshold}
        if self.skip:
            arguments["llm_int8_skip_modules"] = list(self.skip)
        return arguments

    def hf_config(self, compute_dtype: torch.dtype):
        """`transformers.BitsAndBytesConfig` for these settings, computing in `compute_dtype`.

        Raises:
            ContinualPeftError: bitsandbytes is not installed (naming the extra).
        """
        require_bitsandbytes(self.name)
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**self.bnb_arguments(compute_dtype))


def quiet_expected_warnings() -> None:
    """Silence the warning bitsandbytes logs on every 8-bit matmul, that it casts its input to
    float16: LLM.int8 always does, so it says nothing about this run (`CAST_WARNING`); its
    other messages pass."""
    import logging

    source = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in source.filters):
        source.addFilter(_DropCastWarning())


class _DropCastWarning:
    """A logging filter that drops `CAST_WARNING` records."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(CAST_WARNING)


def require_bitsandbytes(what: str = "a quantized backbone") -> None:
    """Refuse quantization where bitsandbytes (or accelerate, which transformers' loader needs
    for it) is not installed, naming the extra that brings both."""
    missing = [name for name in ("bitsandbytes", "accelerate") if not _importable(name)]
    if missing:
        raise ContinualPeftError(
            f"quantize = {what!r} needs {' and '.join(missing)}, which this installation lacks; "
            f"install the quantization extra: {EXTRA}. Or use quantize = 'none'."
        )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_device(quantization: Quantization, device: torch.device) -> None:
    """Refuse a device this bitsandbytes build cannot quantize on, before any weights load:
    quantizes one small block there and names the failure (a missing bitsandbytes first:
    `require_bitsandbytes`)."""
    require_bitsandbytes(quantization.name)
    import bitsandbytes.functional as bnbf

    probe = torch.linspace(-1.0, 1.0, 64, device=device, dtype=torch.float32)
    try:
        if quantization.bits == 4:
            bnbf.quantize_4bit(probe, quant_type=quantization.quant_type)
        else:
            bnbf.int8_vectorwise_quant(probe.reshape(1, -1).half())
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as err:
        import bitsandbytes

        raise ContinualPeftError(
            f"quantize = {quantization.name!r} is not supported on device {device} by this "
            f"bitsandbytes build ({bitsandbytes.__version__}): {str(err).splitlines()[0][:200]}"
            ". Use another device (the CPU and CUDA GPUs are supported), install a "
            "bitsandbytes build for this device, or use quantize = 'none'."
        ) from None


def saved_quantization(config: Any, path: str) -> Quantization | None:
    """The quantization a model folder was saved with (its config's `quantization_config`).

    A folder saved by bitsandbytes loads as it is (transformers reads its quantized weights);
    this returns its settings. None for a full-precision folder.

    Raises:
        ContinualPeftError: A folder quantized by another method (GPTQ, AWQ, ...), naming it:
            only bitsandbytes-quantized and full-precision folders load here.
    """
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = saved.get("quant_method", "unknown")
    method = str(getattr(method, "value", method)).lower()  # an enum in memory, a str in a file
    if method != "bitsandbytes":
        raise ContinualPeftError(
            f"backbone folder {path!r} holds weights already quantized by {method!r}; this tool "
            "loads full-precision folders (and quantizes them itself with --quantize 8bit|4bit) "
            "or folders saved by bitsandbytes. Give the model's full-precision folder."
        )
    four = bool(saved.get("load_in_4bit") or saved.get("_load_in_4bit"))
    return Quantization(
        bits=4 if four else 8,
        quant_type=str(saved.get("bnb_4bit_quant_type") or "fp4"),  # BitsAndBytesConfig's
        double_quant=bool(saved.get("bnb_4bit_use_double_quant", False)),
        int8_threshold=float(saved.get("llm_int8_threshold") or 6.0),
        skip=tuple(saved.get("llm_int8_skip_modules") or ()),
    )


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's bitsandbytes layers (`Linear4bit`, `Linear8bitLt`); empty without any."""
    if not _importable("bitsandbytes"):
        return []
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [m for m in model.modules() if isinstance(m, kinds)]


def unquantize_missing_in_place(model: nn.Module) -> list[str]:
    """Make each bitsandbytes layer whose weight the folder lacked a plain `nn.Linear` again,
    and return their names. transformers starts such a weight at random, in full precision,
    inside a quantized layer that cannot run it (e.g. the pooler of a BERT or ViT folder saved
    without one, which the model's forward still calls); kept in full precision, it runs."""
    import bitsandbytes as bnb

    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    packed = (bnb.nn.Params4bit, bnb.nn.Int8Params)  # their weights, once quantized
    kept = []
    for name, layer in list(model.named_modules()):
        if isinstance(layer, layers) and not isinstance(layer.weight, packed):
            linear = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            linear.weight, linear.bias = layer.weight, layer.bias
            model.set_submodule(name, linear)
            kept.append(name)
    return kept


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes-quantized layers."""
    return bool(getattr(model, "is_quantized", False)) or bool(quantized_layers(model))


def model_quantization(model: nn.Module) -> Quantization | None:
    """The quantization a loaded model carries (from its config), None for full precision."""
    if not is_quantized(model):
        return None
    return saved_quantization(model.config, getattr(model.config, "_name_or_path", "") or "model")


def parameter_count(model: nn.Module) -> int:
    """How many weights the model has, a packed 4-bit weight counted by its real shape (two
    4-bit values share a byte, so `numel` of the stored tensor is half of it)."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += state.shape.numel() if state is not None else param.numel()
    return total


def memory_bytes(model: nn.Module) -> int:
    """The frozen model's parameters, buffers and quantization scales in memory, in bytes, as
    loaded: `transformers`' `get_memory_footprint` (a packed 4-bit weight counts its real
    bytes) plus what it leaves out, the scales bitsandbytes keeps beside each quantized
    weight (`scale_bytes`)."""
    footprint = getattr(model, "get_memory_footprint", None)
    if footprint is not None:
        held = int(footprint())
    else:
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return held + scale_bytes(model)[0]


def scale_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantization scales beside the quantized weights, how many linear weights
    are quantized): an 8-bit layer's float32 scale per output row (`SCB`); a 4-bit layer's
    block absmax and code book, and with double quantization their own (nested) scales."""
    scales = weights = 0
    seen: set[int] = set()  # a code book may be one tensor shared by every layer
    for layer in quantized_layers(model):
        state = getattr(layer.weight, "quant_state", None)
        if state is None:  # 8-bit: int8 weight, one float32 scale per output row
            tensors = [getattr(layer.weight, "SCB", None)]
            weights += layer.weight.numel()
        else:  # 4-bit: block absmax (nested: quantized, with its own scales) and code book
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            weights += state.shape.numel()
        for tensor in tensors:
            if tensor is not None and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                scales += tensor.numel() * tensor.element_size()
    return scales, weights


def compute_dtype(layer: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype a layer computes in: a 4-bit layer's compute dtype, a floating weight's
    dtype, else (an 8-bit layer, whose output follows its input) `fallback`."""
    dtype = getattr(layer, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return fallback
