"""One task of a run as an export reads it: its module (the slots it is routed through, summed
into one: a LoRA or an (IA)^3), its head and record, read through the run reader every command
uses. Each exportable kind has a `KindReader`: how its slot files group by layer, and how k slots
with weights sum into one module of that kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from continual_peft.backbones.text import DEFAULT_BACKBONE, default_model_path
from continual_peft.config import LearnerConfig
from continual_peft.engine.saved_run import SavedRun, read_run
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.integrations.lora_layers import Layout
from continual_peft.modules import HYBRID, ia3, kind_parts
from continual_peft.store.io import load_safetensors

FORMATS = ("peft", "merged")  # one task each (integrations.peft_export)
SERVER_FORMAT = "vllm"  # every task's LoRA for multi-LoRA servers (integrations.vllm_export)
SERVER_KINDS = ("lora",)  # what multi-LoRA servers load
LORA_KEYS = {"lora_A", "lora_B", "scale"}
IA3_KEYS = (ia3.IN, ia3.OUT)  # a layer holds one: its δ = l − 1 on the input or the output


@dataclass(kw_only=True)
class ExportSource:
    """One task of a run, read and checked."""

    run_dir: Path
    task: str
    config: LearnerConfig  # the run's
    fingerprint: dict  # the backbone's, as the run recorded it
    record: dict  # task.json
    # wrapped layer name -> its tensors: lora_A, lora_B, scale (lora); ia3_in or ia3_out (ia3)
    sites: dict[str, dict[str, torch.Tensor]]
    head: dict[str, torch.Tensor]  # nn.Linear state; empty on a generative backbone
    kind: str = "lora"  # the module kind of `sites`, one of EXPORTABLE_KINDS
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
    if not slots:  # its head alone trained (strategy linear_probe): the bare backbone
        raise ContinualPeftError(
            f"task {task!r} of {run_dir} has no module to export: its rows go through the bare "
            f"backbone and only its head trained (strategy {saved.config.strategy!r}); the head "
            f"is in {run_dir / 'tasks' / task / 'head.safetensors'}"
        )
    kinds = module_kinds(saved, task)
    hybrid = sorted(kind for kind in kinds if HYBRID in kind)
    if hybrid:
        alone = [part for part in kind_parts(hybrid[0]) if part in EXPORTABLE_KINDS]
        could = f"peft could hold its {' or '.join(alone)} part alone, but " if alone else ""
        raise ContinualPeftError(
            f"task {task!r} has a hybrid slot {hybrid[0]!r}: formats {FORMATS} hold one module "
            f"kind per adapter, so none reproduces the slot ({could}leaving a part out changes "
            "the task's outputs). Its tensors are in the run's safetensors files, named "
            "'<kind>/<layer>.<tensor>'; answer with it through continual-peft predict or serve"
        )
    if not kinds <= set(EXPORTABLE_KINDS) or len(kinds) > 1:
        raise ContinualPeftError(
            f"task {task!r} goes through {sorted(kinds)} module(s); formats {FORMATS} can "
            f"express only module kinds {EXPORTABLE_KINDS}, one per task; answer with it "
            "through continual-peft predict or serve"
        )
    kind = kinds.pop()
    parts = []
    for slot in slots:
        path = run_dir / checkpoint.slots[slot].file
        parts.append(READERS[kind].read(load_safetensors(path), path))
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
        sites=READERS[kind].combine(parts, weights),
        kind=kind,
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
    layers = _same_layers(parts)
    summed = {}
    for layer in layers:
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


def _sum_ia3(parts: list[dict[str, dict]], weights: list[float]) -> dict[str, dict]:
    """k (IA)^3 slots with weights as ONE: δ = Σ w_i δ_i, the multiplier 1 + δ the routed
    forward applies."""
    if len(parts) == 1 and weights == [1.0]:
        return parts[0]
    layers = _same_layers(parts)
    if any(set(p[layer]) != set(parts[0][layer]) for p in parts for layer in layers):
        raise ContinualPeftError(
            "the task's slots scale different sides (input, output) of a layer; they cannot be "
            "summed"
        )
    return {
        layer: {
            key: sum(w * p[layer][key] for p, w in zip(parts, weights, strict=True))
            for key in parts[0][layer]
        }
        for layer in layers
    }


def _same_layers(parts: list[dict[str, dict]]) -> list[str]:
    layers = set(parts[0])
    if any(set(part) != layers for part in parts):
        raise ContinualPeftError("the task's slots wrap different layers; they cannot be summed")
    return sorted(layers)


def _by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`<layer>.<tensor>` keys grouped by layer, in float32."""
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, part = key.rpartition(".")
        sites.setdefault(layer, {})[part] = tensor.float()
    return sites


def _lora_sites(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    """Group `<layer>.lora_A/.lora_B/.scale` keys by layer, checking that every site is whole."""
    sites = _by_layer(tensors)
    for layer, parts in sites.items():
        if set(parts) != LORA_KEYS:
            raise CorruptFileError(path, f"layer {layer!r} has {sorted(parts)}, not {LORA_KEYS}")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptFileError(path, f"layer {layer!r}: lora_A {a.shape}, lora_B {b.shape}")
    if not sites:
        raise CorruptFileError(path, "no LoRA tensors")
    return sites


def _ia3_sites(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    """Group `<layer>.ia3_in` / `<layer>.ia3_out` keys by layer: one vector per layer."""
    sites = _by_layer(tensors)
    for layer, parts in sites.items():
        if len(parts) != 1 or set(parts) - set(IA3_KEYS):
            raise CorruptFileError(
                path, f"layer {layer!r} has {sorted(parts)}, not one of {list(IA3_KEYS)}"
            )
        vector = next(iter(parts.values()))
        if vector.dim() != 1:
            raise CorruptFileError(path, f"layer {layer!r}: a vector of shape {vector.shape}")
    if not sites:
        raise CorruptFileError(path, "no (IA)^3 tensors")
    return sites


@dataclass(frozen=True)
class KindReader:
    """How one module kind's slot files read for export."""

    # a slot file's tensors (and its path, for errors) -> layer -> tensors, checked
    read: Callable[[dict[str, torch.Tensor], Path], dict[str, dict[str, torch.Tensor]]]
    # k slots' layers and their weights -> ONE module of the kind that acts as their mix
    combine: Callable[[list[dict[str, dict]], list[float]], dict[str, dict]]


READERS = {"lora": KindReader(_lora_sites, _sum), "ia3": KindReader(_ia3_sites, _sum_ia3)}
EXPORTABLE_KINDS = tuple(READERS)  # module kinds the formats FORMATS can express
