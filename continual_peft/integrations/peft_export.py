"""Export one task of a run: as a peft LoRA adapter, or merged into a standalone model.

    export_task("runs/my-run", "agnews", "peft", "export/agnews-peft")
    export_task("runs/my-run", "agnews", "merged", "export/agnews-merged")

`peft` writes what `peft.PeftModel.save_pretrained` writes for the task's LoRA, so
`PeftModel.from_pretrained(AutoModel.from_pretrained(base), out)` reproduces our hidden states:

    adapter_config.json         peft's LoraConfig (peft_type "LORA", r, lora_alpha, ...)
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight (r, d_in)
                                base_model.model.<layer>.lora_B.weight (d_out, r)

`merged` writes a plain Hugging Face model folder (config, model.safetensors, tokenizer) whose
wrapped Linear weights already hold `W + scale · B @ A`; `AutoModel.from_pretrained(out)` needs
neither peft nor this package.

Both formats add the task's head, which neither peft nor transformers reads:

    head.safetensors     nn.Linear state (weight (C, d), bias (C,)): logits = head(pooled), where
                         pooled = mean of last_hidden_state over the attention mask
    labels.json          the C label strings, in logit order
    continual_peft.json  task, format, source run, slot, backbone fingerprint
    README.md            the above, in words

The peft package is not imported here (it is a test-only dependency); the tests check the files
against peft itself. Nothing is written to `out` unless the whole export succeeds.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.text import DEFAULT_BACKBONE, Backbone, default_model_path, model_name
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.store.checkpoint import read_checkpoint
from continual_peft.store.io import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    load_json,
    load_safetensors,
)

FORMATS = ("peft", "merged")
EXPORTABLE_KINDS = ("lora",)  # module kinds these formats can express
LORA_KEYS = {"lora_A", "lora_B", "scale"}
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model


@dataclass
class _Source:
    """One task of a run, read and checked."""

    run_dir: Path
    task: str
    config: dict  # LearnerConfig.to_dict()
    fingerprint: dict  # the backbone's, as the run recorded it
    record: dict  # task.json
    sites: dict[str, dict[str, torch.Tensor]]  # wrapped layer name -> lora_A, lora_B, scale
    head: dict[str, torch.Tensor]  # nn.Linear state
    moved_backbone: str | None = None  # the backbone's folder when given (a moved model)

    @property
    def backbone_path(self) -> str:
        """Where the run's backbone lives: an absolute folder when it is local, else its name."""
        if self.moved_backbone:
            return self.moved_backbone
        name = self.fingerprint.get("name") or self.config.get("backbone", {}).get("name", "")
        if not name or name == DEFAULT_BACKBONE:
            return str(default_model_path().resolve())
        return str(Path(name).resolve()) if Path(name).exists() else name


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
            express, a non-empty `out`, or a missing file.
        CorruptFileError: A run file that cannot be read back.
    """
    if format not in FORMATS:
        raise ContinualPeftError(f"unknown export format {format!r}; valid formats: {FORMATS}")
    if Path(out).resolve().is_relative_to(Path(run_dir).resolve()):
        raise ContinualPeftError(
            f"export folder {out} is inside the run directory {run_dir}, whose files only the "
            "run writes; choose a folder outside it"
        )
    out = _check_out(Path(out))
    source = _read_task(Path(run_dir), task)
    if backbone is not None:
        source.moved_backbone = model_name(backbone)
        if format == "peft":  # `merged` loads and checks it anyway
            length = int(source.config.get("backbone", {}).get("max_length", 128))
            moved = Backbone.from_pretrained(backbone, length, device="cpu", dtype="float32")
            check_fingerprint(source.fingerprint, moved, f"run {source.run_dir}")
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        (_write_peft if format == "peft" else _write_merged)(source, staging)
        _write_extras(source, staging, format)
        if out.exists():
            out.rmdir()  # empty, checked above; rename cannot replace a folder everywhere
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ContinualPeftError(
            f"export folder {out} already exists and is not empty; choose a new --out folder "
            "(nothing was overwritten)."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ContinualPeftError(f"cannot create {out.parent}: {err}") from None
    return out


def _read_task(run_dir: Path, task: str) -> _Source:
    """The task as the run's last checkpoint evaluates it, every file's sha256 checked."""
    if not run_dir.is_dir():
        raise ContinualPeftError(f"run directory {run_dir} does not exist; check the path.")
    run = load_json(run_dir / "config.json")
    checkpoint = read_checkpoint(run_dir)
    entries = {entry["name"]: entry for entry in checkpoint["tasks"]}
    if task not in entries:
        raise ContinualPeftError(f"unknown task {task!r} in {run_dir}; its tasks: {list(entries)}")
    slots, weights = _task_routing(entries[task], run["config"], len(checkpoint["slots"]))
    kinds = {checkpoint["slots"][slot]["kind"] for slot in slots}
    if not kinds <= set(EXPORTABLE_KINDS):
        raise ContinualPeftError(
            f"task {task!r} goes through {sorted(kinds)} module(s); formats {FORMATS} can "
            f"express only module kinds {EXPORTABLE_KINDS}"
        )
    parts = []
    for slot in slots:
        path = run_dir / checkpoint["slots"][slot]["file"]
        parts.append(_lora_sites(load_safetensors(path), path))
    record = dict(checkpoint["records"][list(entries).index(task)], slots=slots, weights=weights)
    head = load_safetensors(run_dir / "tasks" / task / "head.safetensors")
    return _Source(run_dir, task, run["config"], run["backbone"], record, _sum(parts, weights),
                   head)  # fmt: skip


def _task_routing(entry: dict, config: dict, num_slots: int) -> tuple[list[int], list[float]]:
    """The slots (and weights) the task's rows go through, as the checkpoint records them;
    checkpoints written before that was recorded: the task's own slot, or every slot for
    `olora` (which sums them all)."""
    if "routing" in entry:
        return [int(s) for s in entry["routing"]["slots"]], list(entry["routing"]["weights"])
    if config.get("strategy") == "olora":
        return list(range(num_slots)), [1.0] * num_slots
    return [int(entry["slot"])], [1.0]


def _sum(parts: list[dict[str, dict]], weights: list[float]) -> dict[str, dict]:
    """k LoRAs summed with weights as ONE LoRA of rank Σr: A = [A_1; …; A_k] and
    B = [w_1 (s_1/s) B_1, …, w_k (s_k/s) B_k] with s = s_1, so s·B A = Σ w_i s_i B_i A_i."""
    if len(parts) == 1 and weights == [1.0]:
        return parts[0]
    layers = set(parts[0])
    if any(set(part) != layers for part in parts):
        raise ContinualPeftError("the task's slots wrap different layers; they cannot be summed")
    summed = {}
    for layer in sorted(layers):
        scale = parts[0][layer]["scale"]
        ups = [
            w * (p[layer]["scale"] / scale) * p[layer]["lora_B"]
            for p, w in zip(parts, weights, strict=True)
        ]
        summed[layer] = {
            "lora_A": torch.cat([p[layer]["lora_A"] for p in parts]),  # (Σr, d_in)
            "lora_B": torch.cat(ups, dim=1),  # (d_out, Σr)
            "scale": scale,
        }
    return summed


def _lora_sites(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    """Group `<layer>.lora_A/.lora_B/.scale` keys by layer, checking that every site is whole."""
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, part = key.rpartition(".")
        sites.setdefault(layer, {})[part] = tensor.float()
    for layer, parts in sites.items():
        if set(parts) != LORA_KEYS:
            raise CorruptFileError(path, f"layer {layer!r} has {sorted(parts)}, not {LORA_KEYS}")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptFileError(path, f"layer {layer!r}: lora_A {a.shape}, lora_B {b.shape}")
    if not sites:
        raise CorruptFileError(path, "no LoRA tensors")
    return sites


def _write_peft(source: _Source, out: Path) -> None:
    """adapter_model.safetensors and adapter_config.json, keyed and spelled as peft saves them."""
    state = {}
    for layer, parts in sorted(source.sites.items()):
        state[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = parts["lora_A"]
        state[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = parts["lora_B"]
    atomic_save_safetensors(state, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_json(out / "adapter_config.json", _peft_config(source))


def _peft_config(source: _Source) -> dict:
    """peft's LoraConfig for this LoRA; fields left out read as peft's defaults."""
    r, alpha = _rank_and_alpha(source)
    lora = source.config.get("lora", {})
    config = {
        "peft_type": "LORA",
        "task_type": None,  # a bare encoder: no peft task head
        "auto_mapping": _auto_mapping(source.fingerprint.get("model_class", "")),
        "base_model_name_or_path": source.backbone_path,
        "revision": None,
        "inference_mode": True,  # peft sets this when saving
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": _target_modules(list(source.sites), lora.get("targets", [])),
        "fan_in_fan_out": False,  # our A and B act on nn.Linear's (out, in) layout
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,  # ours: A Kaiming-uniform, B zero, as peft's default
        "modules_to_save": None,  # the head is no peft module: see head.safetensors
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return dict(sorted(config.items()))  # peft writes sorted keys


def _rank_and_alpha(source: _Source) -> tuple[int, int | float]:
    """One rank and one scale for every site (peft's plain form); alpha = scale · r."""
    ranks = {int(p["lora_A"].shape[0]) for p in source.sites.values()}
    scales = {float(p["scale"]) for p in source.sites.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ContinualPeftError(
            f"task {source.task!r} mixes ranks {sorted(ranks)} or scales {sorted(scales)}; "
            "the peft format needs one of each"
        )
    r, scale = ranks.pop(), scales.pop()
    alpha = float(source.config.get("lora", {}).get("alpha", scale * r))
    if not math.isclose(alpha / r, scale, rel_tol=1e-6):
        alpha = scale * r  # the file wins over the config (and a sum of slots has rank Σr)
    return r, int(alpha) if alpha.is_integer() else alpha


def _target_modules(layers: list[str], targets: list[str]) -> list[str]:
    """Name suffixes when the run targeted plain names (peft matches them alike), else full names.

    Regular expressions and "all-linear" (which skips the pooler here, not in peft) are
    spelled out as the wrapped layers' full names, which peft matches exactly.
    """
    if targets and all(re.fullmatch(r"\w+", t) for t in targets):
        return sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    return sorted(layers)


def _auto_mapping(model_class: str) -> dict | None:
    """What peft records for a model without a task type, so AutoPeftModel can rebuild it."""
    import transformers

    model_type = getattr(transformers, model_class, None) if model_class else None
    if model_type is None:
        return None
    return {"base_model_class": model_class, "parent_library": model_type.__module__}


def _write_merged(source: _Source, out: Path) -> None:
    """The run's backbone with each LoRA delta added to its Linear weight, plus its tokenizer."""
    # merged on the CPU in float32, with the run's own max_length (only checked, never used)
    max_length = int(source.config.get("backbone", {}).get("max_length", 128))
    backbone = Backbone.from_pretrained(
        source.backbone_path, max_length, device="cpu", dtype="float32"
    )
    check_fingerprint(source.fingerprint, backbone, f"run {source.run_dir}")
    model = backbone.model
    with torch.no_grad():
        for layer, parts in source.sites.items():
            linear = _linear(model, layer)
            delta = parts["scale"] * (parts["lora_B"] @ parts["lora_A"])  # (d_out, d_in)
            if delta.shape != linear.weight.shape:
                raise ContinualPeftError(
                    f"the LoRA of {layer!r} is {tuple(delta.shape)}, "
                    f"the layer {tuple(linear.weight.shape)}"
                )
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
    model.save_pretrained(out)  # safetensors by default
    backbone.tokenizer.save_pretrained(out)


def _linear(model: torch.nn.Module, layer: str) -> torch.nn.Linear:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    if not isinstance(module, torch.nn.Linear):
        raise ContinualPeftError(f"the backbone has no Linear layer {layer!r} to merge a LoRA into")
    return module


def _write_extras(source: _Source, out: Path, format: str) -> None:
    """The task's head, labels and provenance, which peft and transformers ignore."""
    atomic_save_safetensors(source.head, out / "head.safetensors", {"task": source.task})
    atomic_write_json(out / "labels.json", source.record["labels"])
    atomic_write_json(
        out / "continual_peft.json",
        {
            "task": source.task,
            "format": format,
            "source_run": str(source.run_dir.resolve()),
            "slots": source.record.get("slots"),  # summed into this one LoRA, with weights
            "weights": source.record.get("weights"),
            "module": source.record.get("module", "lora"),
            "base_model_name_or_path": source.backbone_path,
            "backbone": source.fingerprint,
            "head": "logits = head(mean of last_hidden_state over the attention mask)",
        },
    )
    atomic_write_text(out / "README.md", _readme(source, format))


def _readme(source: _Source, format: str) -> str:
    load = {
        "peft": f"PeftModel.from_pretrained(AutoModel.from_pretrained({source.backbone_path!r}), "
        "this_folder)",
        "merged": "AutoModel.from_pretrained(this_folder)",
    }[format]
    return (
        f"---\nlibrary_name: {'peft' if format == 'peft' else 'transformers'}\n"
        f"base_model: {source.backbone_path}\n---\n\n"
        f"# {source.task} ({format} export of continual-peft run {source.run_dir.name})\n\n"
        f"Load: `{load}`.\n\n"
        "Extras that peft and transformers ignore: `head.safetensors` is the task's classifier "
        "(an `nn.Linear` state: `weight`, `bias`) applied to the mean of `last_hidden_state` over "
        "the attention mask; `labels.json` lists the labels in logit order; "
        "`continual_peft.json` records the task, source run and backbone fingerprint.\n"
    )
