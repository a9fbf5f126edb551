"""One task of a run as an export reads it: its LoRA (the slots it is routed through, summed
into one), its head and record, read through the run reader every command uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from continual_peft.backbones.text import DEFAULT_BACKBONE, default_model_path
from continual_peft.config import LearnerConfig
from continual_peft.engine.saved_run import SavedRun, read_run
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.integrations.lora_layers import Layout
from continual_peft.store.io import load_safetensors

FORMATS = ("peft", "merged")  # one task each (integrations.peft_export)
SERVER_FORMAT = "vllm"  # every task's LoRA for multi-LoRA servers (integrations.vllm_export)
EXPORTABLE_KINDS = ("lora",)  # module kinds these formats can express
LORA_KEYS = {"lora_A", "lora_B", "scale"}


@dataclass(kw_only=True)
class ExportSource:
    """One task of a run, read and checked."""

    run_dir: Path
    task: str
    config: LearnerConfig  # the run's
    fingerprint: dict  # the backbone's, as the run recorded it
    record: dict  # task.json
    sites: dict[str, dict[str, torch.Tensor]]  # wrapped layer name -> lora_A, lora_B, scale
    head: dict[str, torch.Tensor]  # nn.Linear state; empty on a generative backbone
    moved_backbone: str | None = None  # the backbone's folder when given (a moved model)
    layout: Layout | None = None  # the backbone's family and layer kinds, read at export

    @property
    def backbone_path(self) -> str:
        """Where the run's backbone lives: an absolute folder when it is local, else its name."""
        if self.moved_backbone:
            return self.moved_backbone
        name = self.fingerprint.get("name") or self.config.backbone.name
        if not name or name == DEFAULT_BACKBONE:
            return str(default_model_path().resolve())
        return str(Path(name).resolve()) if Path(name).exists() else name


def read_task(run_dir: Path, task: str, saved: SavedRun | None = None) -> ExportSource:
    """The task as the run's last checkpoint evaluates it, read through the same reader as
    `predict` and `--resume` (`engine.saved_run.read_run`): an edited config.json or a damaged
    file is refused the same way, and every file's sha256 is checked. `saved`: the run as
    `read_run` already read it (an export of several tasks reads it once)."""
    saved = saved or read_run(run_dir)
    checkpoint = saved.checkpoint
    names = checkpoint.task_names
    if task not in names:
        raise ContinualPeftError(f"unknown task {task!r} in {run_dir}; its tasks: {names}")
    entry = checkpoint.tasks[names.index(task)]
    slots, weights = [int(s) for s in entry.routing.slots], list(entry.routing.weights)
    kinds = module_kinds(saved, task)
    if not kinds <= set(EXPORTABLE_KINDS):
        raise ContinualPeftError(
            f"task {task!r} goes through {sorted(kinds)} module(s); formats {FORMATS} can "
            f"express only module kinds {EXPORTABLE_KINDS}"
        )
    parts = []
    for slot in slots:
        path = run_dir / checkpoint.slots[slot].file
        parts.append(_lora_sites(load_safetensors(path), path))
    record = dict(checkpoint.records[names.index(task)], slots=slots, weights=weights)
    # a slot budget may have merged other tasks into these slots: say so with the export
    sharing = [t.name for t in checkpoint.tasks if t.name != task and t.slot in slots]
    merges = [r["consolidation"] for r in checkpoint.records if r.get("consolidation")]
    merges = [m for m in merges if m["slots"][0] in slots]
    if sharing and merges:
        record["merged"] = {"with_tasks": sharing, **merges[-1]}
    return ExportSource(
        run_dir=run_dir,
        task=task,
        config=saved.config,
        fingerprint=saved.fingerprint,
        record=record,
        sites=_sum(parts, weights),
        head=load_safetensors(run_dir / "tasks" / task / "head.safetensors"),
    )


def module_kinds(saved: SavedRun, task: str) -> set[str]:
    """The module kinds of the slots a learned task's rows go through."""
    checkpoint = saved.checkpoint
    entry = checkpoint.tasks[checkpoint.task_names.index(task)]
    return {checkpoint.slots[int(slot)].kind for slot in entry.routing.slots}


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
