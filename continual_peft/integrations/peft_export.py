"""Export one task of a run: as a peft adapter (LoRA or IA3), or merged into a standalone model.

    export_task("runs/my-run", "agnews", "peft", "export/agnews-peft")
    export_task("runs/my-run", "agnews", "merged", "export/agnews-merged")

`peft` writes what `peft.PeftModel.save_pretrained` writes for the task's LoRA or (IA)^3, so
`PeftModel.from_pretrained(AutoModel.from_pretrained(base), out)` reproduces our hidden states
(`AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` and our logits for a generative backbone, whose
adapter has peft's task type `CAUSAL_LM` / `SEQ_2_SEQ_LM`; the two files are laid out as
multi-LoRA servers such as vLLM, TGI and LoRAX read them, untested here; `vllm_export` writes
every task's adapter, named by its task, with the run's router):

    adapter_config.json         peft's LoraConfig (peft_type "LORA", task_type, r, lora_alpha, ...;
                                fan_in_fan_out true on GPT-2's Conv1D layers)
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight (r, d_in)
                                base_model.model.<layer>.lora_B.weight (d_out, r)

and for an (IA)^3 task (`modules.ia3`):

    adapter_config.json         peft's IA3Config (peft_type "IA3", task_type, target_modules,
                                feedforward_modules, fan_in_fan_out true on Conv1D layers)
    adapter_model.safetensors   base_model.model.<layer>.ia3_l: l = 1 + δ, (1, d_in) on a
                                feed-forward layer (its input scaled), else (d_out, 1)

Each kind's form is a row of `ADAPTERS` (peft's tensors and config fields) and `MERGES`.

`merged` writes a plain Hugging Face model folder (config, model.safetensors, tokenizer) whose
wrapped layers' weights already hold the LoRA's delta (`W + scale · B @ A` for nn.Linear, its
transpose for Conv1D's (d_in, d_out) weight), or the (IA)^3 vectors (each output row and its bias
entry scaled, or each input column); `AutoModel.from_pretrained(out)` (or the LM Auto class)
needs neither peft nor this package.

Both formats add what neither peft nor transformers reads:

    head.safetensors     encoders only: nn.Linear state (weight (C, d), bias (C,)):
                         logits = head(pooled), pooled = mean of last_hidden_state over the mask
                         (a generative backbone has none: its own LM head answers every task)
    labels.json          the C label strings, in logit (score) order; classification tasks
    continual_peft.json  task, format, source run, slot, backbone fingerprint; for a generative
                         backbone the prompt template and how answers are read
    README.md            the above, in words

The peft package is not imported here (it is a test-only dependency); the tests check the files
against peft itself. Nothing is written to `out` unless the whole export succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from continual_peft.backbones.causal import CausalBackbone
from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.load import AUTO_CLASSES
from continual_peft.backbones.quantization import Quantization
from continual_peft.backbones.seq2seq import Seq2SeqBackbone
from continual_peft.backbones.text import model_name
from continual_peft.config import BackboneConfig
from continual_peft.engine.state import build_backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.integrations.export_source import (
    FORMATS,
    SERVER_FORMAT,
    ExportSource,
    read_task,
)
from continual_peft.integrations.lora_layers import Layout, merge_ia3, merge_lora, read_layout
from continual_peft.modules import ia3
from continual_peft.store.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

GENERATION = "generation"  # a task kind whose labels are no label set (lm_heads.GENERATION)
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model


def export_task(
    run_dir: str | Path, task: str, format: str, out: str | Path, backbone: str | None = None
) -> Path:
    """Write one task of a run in `format` ("peft" or "merged") into the folder `out`.

    Args:
        run_dir: A run directory (config.json, tasks/<task>/...).
        task: The task to export.
        format: "peft" (an adapter for peft.PeftModel) or "merged" (a standalone model).
        out: The folder to create; it must not exist yet or be empty.
        backbone: The run's backbone from another folder (a moved model), instead of the one
            the run recorded; `merged` checks its fingerprint.

    Returns:
        `out`.

    Raises:
        ContinualPeftError: An unknown format or task, a task whose module kind the format cannot
            express, a non-empty `out`, a missing file, a backbone whose config cannot be read
            (the layers' kinds and the peft task type come from it) or that lacks a layer the
            LoRA wraps.
        CorruptFileError: A run file that cannot be read back.
    """
    if format == SERVER_FORMAT:
        raise ContinualPeftError(
            f"format {SERVER_FORMAT!r} exports every task of a run at once, with its router: "
            "call continual_peft.integrations.vllm_export.export_adapters(run_dir, out)"
        )
    if format not in FORMATS:
        raise ContinualPeftError(
            f"unknown export format {format!r}; valid formats: {FORMATS} for one task, or "
            f"{SERVER_FORMAT!r} for every task of a run"
        )
    out = check_out(Path(run_dir), Path(out))
    source = read_task(Path(run_dir), task)
    quantization = Quantization.of(source.config.backbone)
    if format == "merged" and quantization is not None:
        raise ContinualPeftError(
            f"run {run_dir} was trained on a backbone quantized {quantization.describe()}: a "
            "merged export is refused. Added into quantized weights, a LoRA's delta is mostly "
            "lost (it is far smaller than the quantization step), and merged into the "
            "full-precision weights it meets other weights than it was trained against. Export "
            "--format peft instead and load it onto the same quantized base (its README says "
            "how); merge it yourself with peft's merge_and_unload if you accept the change."
        )
    if backbone is not None:
        source.moved_backbone = model_name(backbone)
        if format == "peft":  # `merged` loads and checks it anyway
            check_moved_backbone(source, backbone)
    source.layout = read_layout(source.backbone_path, source.fingerprint.get("model_class", ""))
    source.layout.check(list(source.sites), task)
    with staged(out) as folder:
        write_task(source, folder, format)
    return out


def check_out(run_dir: Path, out: Path) -> Path:
    """`out`, checked to be a new or empty folder outside the run directory; its parent made.

    Raises:
        ContinualPeftError: `out` is inside `run_dir`, holds something, or cannot be made.
    """
    if out.resolve().is_relative_to(run_dir.resolve()):
        raise ContinualPeftError(
            f"export folder {out} is inside the run directory {run_dir}, whose files only the "
            "run writes; choose a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise ContinualPeftError(
            f"export folder {out} is a file; give a folder that does not exist yet or is empty "
            "(nothing was overwritten)."
        )
    if out.exists() and any(out.iterdir()):
        raise ContinualPeftError(
            f"export folder {out} already exists and is not empty; choose a new --out folder "
            "(nothing was overwritten)."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ContinualPeftError(f"cannot create {out.parent}: {err}") from None
    return out


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging folder beside `out` to write into; renamed to `out` when the block succeeds,
    removed when it fails, so nothing is left at `out` unless the whole export succeeds."""
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked by `check_out`; rename cannot replace a folder everywhere
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_moved_backbone(source: ExportSource, backbone: str) -> None:
    """Refuse a moved backbone (`--backbone`) that is not the model the run was trained on."""
    moved = build_backbone(on_cpu(source.config.backbone), name=backbone)
    check_fingerprint(source.fingerprint, moved, f"run {source.run_dir}")


def write_task(source: ExportSource, folder: Path, format: str) -> None:
    """The task's files in `format` ("peft" or "merged") into the existing folder `folder`;
    `source.layout` must be read and checked."""
    (_write_peft if format == "peft" else _write_merged)(source, folder)
    _write_extras(source, folder, format)


def _write_peft(source: ExportSource, out: Path) -> None:
    """adapter_model.safetensors and adapter_config.json, keyed and spelled as peft saves them."""
    state, fields = ADAPTERS[source.kind](source)
    atomic_save_safetensors(state, out / "adapter_model.safetensors", {"format": "pt"})
    config = {**_peft_common(source), **fields}
    atomic_write_json(out / "adapter_config.json", dict(sorted(config.items())))  # as peft


def on_cpu(settings: BackboneConfig) -> BackboneConfig:
    """The run's backbone settings, on the CPU in float32: where exports load and merge it."""
    return dataclasses.replace(settings, device="cpu", dtype="float32")


def _peft_common(source: ExportSource) -> dict:
    """The fields of peft's adapter config that every kind writes alike."""
    layout, model_class = source.layout, source.fingerprint.get("model_class", "")
    return {
        "task_type": layout.task_type,  # None: a bare encoder, no peft task head
        "auto_mapping": None if layout.task_type else _auto_mapping(model_class),  # as peft
        "base_model_name_or_path": source.backbone_path,
        "revision": None,
        "inference_mode": True,  # peft sets this when saving
        # the vectors or A and B act alike on both layer kinds; the flag tells peft how to merge
        # into a Conv1D's (d_in, d_out) weight, and peft sets it itself on meeting one
        "fan_in_fan_out": layout.fan_in_fan_out(list(source.sites)),
        "modules_to_save": None,  # an encoder's head is no peft module: see head.safetensors
    }


def _lora_adapter(source: ExportSource) -> tuple[dict[str, torch.Tensor], dict]:
    """peft's LoRA tensors and LoraConfig fields; fields left out read as peft's defaults."""
    state = {}
    for layer, parts in sorted(source.sites.items()):
        state[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = parts["lora_A"]
        state[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = parts["lora_B"]
    r, alpha = _rank_and_alpha(source)
    lora, layers = source.config.kind_config("lora"), list(source.sites)
    return state, {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(lora.dropout),
        "target_modules": _target_modules(layers, source.layout, list(lora.targets)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,  # ours: A Kaiming-uniform, B zero, as peft's default
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _ia3_adapter(source: ExportSource) -> tuple[dict[str, torch.Tensor], dict]:
    """peft's IA3 tensors (`ia3_l` = 1 + δ, in peft's shapes) and IA3Config fields."""
    state = {}
    for layer, parts in sorted(source.sites.items()):
        ((side, delta),) = parts.items()
        shape = (1, -1) if side == ia3.IN else (-1, 1)  # peft's: (1, d_in) or (d_out, 1)
        state[f"{PEFT_PREFIX}{layer}.ia3_l"] = (1 + delta).reshape(shape).contiguous()
    targets, feedforward = _ia3_modules(source)
    return state, {
        "peft_type": "IA3",
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "exclude_modules": None,
        "init_ia3_weights": True,  # ours: l = 1 (δ = 0), as peft's default
    }


def _ia3_modules(source: ExportSource) -> tuple[list[str], list[str]]:
    """peft's target_modules and feedforward_modules for the task's layers: the name endings of
    the fewest dot-separated parts with which peft, matching as it does, picks exactly these
    layers as targets and exactly the input-scaled ones among them as feed-forward (a target's
    name ends with an entry, dot or no dot). Full names (which peft matches exactly) when the
    model's layers are not at hand to check endings against."""
    layers, layout = sorted(source.sites), source.layout
    inputs = {layer for layer, parts in source.sites.items() if ia3.IN in parts}
    longest = max(len(layer.split(".")) for layer in layers)
    for depth in range(1 if layout.kinds is not None else longest, longest + 1):
        ends = {layer: ".".join(layer.split(".")[-depth:]) for layer in layers}
        targets, feedforward = set(ends.values()), {ends[layer] for layer in inputs}
        picked = {layer for layer in layers if any(layer.endswith(f) for f in feedforward)}
        if picked == inputs and (layout.kinds is None or layout.suffixes_select(layers, targets)):
            return sorted(targets), sorted(feedforward)
    raise ContinualPeftError(
        f"task {source.task!r}: peft cannot name the layers {layers} apart from the backbone's "
        "others (one layer's full name ends another's)"
    )


def _rank_and_alpha(source: ExportSource) -> tuple[int, int | float]:
    """One rank and one scale for every site (peft's plain form); alpha = scale · r."""
    ranks = {int(p["lora_A"].shape[0]) for p in source.sites.values()}
    scales = {float(p["scale"]) for p in source.sites.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ContinualPeftError(
            f"task {source.task!r} mixes ranks {sorted(ranks)} or scales {sorted(scales)}; "
            "the peft format needs one of each"
        )
    r, scale = ranks.pop(), scales.pop()
    alpha = float(source.config.kind_config("lora").alpha)
    if not math.isclose(alpha / r, scale, rel_tol=1e-6):
        alpha = scale * r  # the file wins over the config (and a sum of slots has rank Σr)
    return r, int(alpha) if alpha.is_integer() else alpha


def _target_modules(layers: list[str], layout: Layout, targets: list[str]) -> list[str]:
    """The layers' name suffixes, as peft writes them (`["q_proj", "v_proj"]`), when peft matching
    them would wrap these layers and no others; else the full names, which peft matches exactly
    (say, "all-linear" on BERT: the pooler's `dense` is left alone here, not in peft). Without
    the model at hand, suffixes when the run targeted plain names (peft matches them alike)."""
    suffixes = {layer.rsplit(".", 1)[-1] for layer in layers}
    if layout.kinds is None:
        plain = bool(targets) and all(re.fullmatch(r"\w+", t) for t in targets)
    else:
        plain = layout.suffixes_select(layers, suffixes)
    return sorted(suffixes) if plain else sorted(layers)


def _auto_mapping(model_class: str) -> dict | None:
    """What peft records for a model without a task type, so AutoPeftModel can rebuild it."""
    import transformers

    model_type = getattr(transformers, model_class, None) if model_class else None
    if model_type is None:
        return None
    return {"base_model_class": model_class, "parent_library": model_type.__module__}


def _write_merged(source: ExportSource, out: Path) -> None:
    """The run's backbone with the task's module merged into its layers' weights (nn.Linear or
    Conv1D), plus its tokenizer; a language model keeps its LM head (and Auto class)."""
    # merged on the CPU in float32, with the run's own max_length (only checked, never used)
    backbone = build_backbone(on_cpu(source.config.backbone), name=source.backbone_path)
    check_fingerprint(source.fingerprint, backbone, f"run {source.run_dir}")
    MERGES[source.kind](backbone.model, source.sites)
    backbone.model.save_pretrained(out)  # safetensors by default
    backbone.tokenizer.save_pretrained(out)


def _write_extras(source: ExportSource, out: Path, format: str) -> None:
    """The task's head (encoders), labels and provenance, which peft and transformers ignore."""
    info = {
        "task": source.task,
        "format": format,
        "source_run": str(source.run_dir.resolve()),
        "slots": source.record.get("slots"),  # summed into this one LoRA, with weights
        "weights": source.record.get("weights"),
        "module": source.record.get("module", "lora"),
        "base_model_name_or_path": source.backbone_path,
        "backbone": source.fingerprint,
        "quantization": _quantization_info(source),
    }
    if source.record.get("merged"):  # a slot budget merged other tasks' slots into this one
        info["merged"] = source.record["merged"]
    if source.layout.generative:  # no head file: an empty one would only puzzle
        info["head"] = "none (no head file): the model's own LM head answers every task"
        info["answers"] = _lm_answers(source)
    else:
        atomic_save_safetensors(source.head, out / "head.safetensors", {"task": source.task})
        info["head"] = "logits = head(mean of last_hidden_state over the attention mask)"
    if source.record.get("kind", "classification") != GENERATION:
        atomic_write_json(out / "labels.json", source.record["labels"])
    atomic_write_json(out / "continual_peft.json", info)
    atomic_write_text(out / "README.md", _readme(source, format, info))


def _lm_answers(source: ExportSource) -> dict:
    """How the run read a generative task's answers off the model's own LM head."""
    generation = dataclasses.asdict(source.config.generation)
    family = {CausalBackbone.kind: CausalBackbone, Seq2SeqBackbone.kind: Seq2SeqBackbone}
    return {
        "task_kind": source.record.get("kind", "classification"),
        "prompt_template": source.record.get("template"),  # "{text}" = the input; None: as is
        "target_delimiter": family[source.layout.family].target_delimiter,
        "target": "target_delimiter + label (or answer), then EOS; no special tokens",
        **{key: generation[key] for key in ("decode", "label_score", "max_new_tokens")},
    }


def _quantization_info(source: ExportSource) -> dict | str:
    """How the run's backbone was quantized (`BitsAndBytesConfig`'s keyword arguments, the
    4-bit compute dtype the run's), or "none"."""
    quantization = Quantization.of(source.config.backbone)
    if quantization is None:
        return "none"
    return {"describe": quantization.describe(), "bitsandbytes_config": _bnb_arguments(source)}


def _bnb_arguments(source: ExportSource) -> dict:
    """The run's `BitsAndBytesConfig` arguments, a 4-bit layer computing in the run's dtype."""
    backbone = source.config.backbone
    return Quantization.of(backbone).bnb_arguments(backbone.dtype)


def _readme(source: ExportSource, format: str, info: dict) -> str:
    auto = AUTO_CLASSES.get(source.layout.family, "AutoModel")
    base = repr(source.backbone_path)
    quantized = Quantization.of(source.config.backbone) is not None
    if quantized:  # the run's own quantized base, in the run's dtype
        arguments = ", ".join(f"{k}={v!r}" for k, v in _bnb_arguments(source).items())
        base += f", quantization_config=BitsAndBytesConfig({arguments})"
        base += f", dtype=torch.{source.config.backbone.dtype}"
    load = {
        "peft": f"PeftModel.from_pretrained({auto}.from_pretrained({base}), this_folder)",
        "merged": f"{auto}.from_pretrained(this_folder)",
    }[format]
    return (
        f"---\nlibrary_name: {'peft' if format == 'peft' else 'transformers'}\n"
        f"base_model: {source.backbone_path}\n---\n\n"
        f"# {source.task} ({format} export of continual-peft run {source.run_dir.name})\n\n"
        f"Load: `{load}`.\n\n"
        + (_merged_words(info["merged"]) if info.get("merged") else "")
        + (_pooler_words() if quantized and not source.layout.generative else "")
        + (_lm_words(info["answers"]) if source.layout.generative else _head_words())
    )


def _merged_words(merged: dict) -> str:
    energy = merged.get("kept_energy")
    kept = f" (the rank-r merge kept {100 * energy:.1f} % of their mean update)" if energy else ""
    return (
        "This LoRA is shared: the run's slot budget (`max_slots`) merged it with the slots of "
        f"{', '.join(merged['with_tasks'])}{kept}, so it is not the task's own trained "
        "update; `continual_peft.json` records the merge.\n\n"
    )


def _pooler_words() -> str:
    return (
        "A model folder saved without its pooler's weights (this package never uses the "
        "pooler) gets a random pooler from transformers, which bitsandbytes cannot run: pass "
        "`add_pooling_layer=False` to `from_pretrained` for such a folder.\n\n"
    )


def _head_words() -> str:
    return (
        "Extras that peft and transformers ignore: `head.safetensors` is the task's classifier "
        "(an `nn.Linear` state: `weight`, `bias`) applied to the mean of `last_hidden_state` over "
        "the attention mask; `labels.json` lists the labels in logit order; "
        "`continual_peft.json` records the task, source run and backbone fingerprint.\n"
    )


def _lm_words(answers: dict) -> str:
    template, delimiter = answers["prompt_template"], answers["target_delimiter"]
    prompt = "the input itself (no template)"
    if template:
        prompt = f"the template `{template}` with `{{text}}` replaced by the input"
    if answers["task_kind"] == GENERATION:
        answer = f"greedy generation after the prompt, up to EOS ({answers['max_new_tokens']} new "
        answer += "tokens at most)"
    elif answers["decode"] == "score":
        answer = (
            f"the label of `labels.json` whose tokens ({delimiter!r} + label, then EOS) are the "
            f"likeliest after the prompt (the {answers['label_score']} of their log-probabilities)"
        )
    else:
        answer = "greedy generation after the prompt, compared with the labels of `labels.json`"
    return (
        "There is no head file: the model's own LM head answers every task. "
        f"Prompt: {prompt}. Answer: {answer}. `continual_peft.json` records this, the task, "
        "source run and backbone fingerprint.\n"
    )


# each exportable kind (export_source.EXPORTABLE_KINDS): its peft tensors and config fields, and
# how it merges into the layers' weights
ADAPTERS = {"lora": _lora_adapter, "ia3": _ia3_adapter}
MERGES = {"lora": merge_lora, "ia3": merge_ia3}
