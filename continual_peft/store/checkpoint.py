"""The checkpoint: `checkpoint.json`, the one file that says what a run directory holds.

After every task the learner hands a `Snapshot` (plain tensors and JSON-ready values) to
`write_checkpoint`, which writes that task's files (slot, head, record, router and strategy
state, each atomically) and then, last, `checkpoint.json` (atomically too): the number of
finished tasks, every file a reader needs with its sha256, and the state that is small enough
for JSON (accuracy matrices, task records, RNG states, the config's hash, the stream's task
names and data hashes). A kill at any moment therefore leaves either the previous checkpoint or
the new one; files written after the last `checkpoint.json` are ignored by readers and
overwritten when the task is learned again. `learner.save(dir)` writes the same files at once.

Files a checkpoint names never change afterwards (state that changes from task to task, the
router's and the strategy's, is written into the newest task's folder), so a checkpoint stays
valid while the next task's files are being written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from continual_peft.errors import ContinualPeftError, CorruptFileError, RunFileError
from continual_peft.store.io import atomic_write_json, file_sha256, load_json, timestamp
from continual_peft.store.rng import rng_state
from continual_peft.store.rundir import RunDir

Tensors = dict[str, torch.Tensor]


@dataclass
class TaskFiles:
    """One finished task's files as values: what `RunDir.save_task` writes."""

    name: str
    head: Tensors  # the task's head
    record: dict[str, Any]  # its task.json
    module: Tensors | None = None  # its slot's tensors, if its folder holds them (see Snapshot)


@dataclass
class Snapshot:
    """A learner's state after a task, as plain values: the engine builds it, the store writes it.

    A slot shared by several tasks is written into the folder of the last task that trained it
    (`owners`); the router's and the strategy's state into the newest task's folder.
    """

    tasks: list[TaskFiles]  # the tasks whose files are written now, the newest last
    order: list[str]  # every learned task, in learning order
    owners: list[str]  # per slot: the task whose folder holds it
    slot_kinds: list[str]  # per slot: its module kind
    trainable_slot: int | None  # the slot still training (shared slots), if any
    router: tuple[Tensors, dict[str, Any]] | None  # router.safetensors, router.json
    strategy: tuple[Tensors, dict[str, Any]]  # the strategy's state; ({}, {}) if none
    state: dict[str, Any]  # JSON-ready: status, config hashes, backbone, stream, tasks, ...
    saved_files: dict[str, str] = field(default_factory=dict)  # on disk already: path -> sha256


CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def set_status(folder: Path, status: str) -> None:
    """Rewrite the status of an existing checkpoint (finished, failed, interrupted)."""
    path = Path(folder) / CHECKPOINT_FILE
    if path.is_file():
        checkpoint = load_json(path)
        checkpoint["status"] = status
        atomic_write_json(path, checkpoint)


def read_checkpoint(folder: str | Path) -> dict[str, Any]:
    """`checkpoint.json`, with every file it names present and unchanged (sha256 checked).

    Raises:
        ContinualPeftError: No checkpoint (no task finished yet), or another format.
        RunFileError: The checkpoint, or a file it names, is missing, damaged or altered
            (`run --resume` repairs the run).
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not path.is_file() and any(folder.glob(f"tasks/*/{CHECKPOINT_FILE}")):
        raise RunFileError(path, folder, "is missing (finished tasks' folders hold copies of it)")
    if not path.is_file():
        raise ContinualPeftError(
            f"{folder} has no {CHECKPOINT_FILE}: no task of it has finished yet (or it is not a "
            "run directory)."
        )
    return read_checkpoint_file(folder, path)


def read_checkpoint_file(folder: Path, path: Path) -> dict[str, Any]:
    """The checkpoint in `path` (the run's own, or a task's copy of it) with every file it names
    in run directory `folder` present and unchanged; errors as `read_checkpoint`'s."""
    try:
        checkpoint = load_json(path)
    except CorruptFileError as err:
        raise RunFileError(path, folder, f"is corrupt or truncated ({err.reason})") from err
    if isinstance(checkpoint, dict) and checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ContinualPeftError(
            f"{path}: checkpoint format {checkpoint.get('format')!r} is not supported (this "
            f"version reads format {CHECKPOINT_FORMAT})."
        )
    problem = _inconsistency(checkpoint) if isinstance(checkpoint, dict) else "not a JSON object"
    if problem:
        raise RunFileError(path, folder, f"is inconsistent ({problem}): it was edited or damaged")
    for name, sha in checkpoint["files"].items():
        target = folder / name
        if not target.is_file():
            problem = f"is missing ({path.name} names it as part of the run)"
            raise RunFileError(target, folder, problem)
        if file_sha256(target) != sha:
            problem = f"was altered (its sha256 differs from the one {path} records)"
            raise RunFileError(target, folder, problem)
    return checkpoint


def recorded_baseline(folder: str | Path) -> str | None:
    """The baseline strategy a run directory was started with: as its checkpoint (or a task's
    copy of it) records it, else from a `baseline-<strategy>/` folder (older runs), else None."""
    folder = Path(folder)
    for path in [folder / CHECKPOINT_FILE, *sorted(folder.glob(f"tasks/*/{CHECKPOINT_FILE}"))]:
        try:
            data = load_json(path) if path.is_file() else None
        except ContinualPeftError:
            continue
        if isinstance(data, dict) and "baseline" in data:
            return data["baseline"] if isinstance(data["baseline"], str) else None
    found = sorted(p.name for p in folder.glob("baseline-*") if p.is_dir())
    return found[0].removeprefix("baseline-") if found else None


def baseline_folders(folder: str | Path) -> list[Path]:
    """The baseline runs a run directory holds or must hold: every `baseline-*/` folder, and
    the recorded baseline's even if its folder is gone."""
    folder = Path(folder)
    found = {sub for sub in folder.glob("baseline-*") if sub.is_dir()}
    recorded = recorded_baseline(folder)
    found |= {folder / f"baseline-{recorded}"} if recorded else set()
    return sorted(found)


def _inconsistency(checkpoint: dict) -> str | None:
    """What makes a checkpoint disagree with itself, or None: its parts must describe the same
    tasks, and every file a reader needs must be named with a sha256 (so none goes unchecked)."""
    kinds = {"tasks": list, "slots": list, "files": dict, "records": list, "tasks_done": int}
    for key, kind in kinds.items():
        if not isinstance(checkpoint.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    tasks, slots, files = checkpoint["tasks"], checkpoint["slots"], checkpoint["files"]
    if not len(tasks) == len(checkpoint["records"]) == checkpoint["tasks_done"]:
        return (
            f"tasks_done is {checkpoint['tasks_done']} but it lists {len(tasks)} task(s) and "
            f"{len(checkpoint['records'])} record(s)"
        )
    needed = [slot.get("file") for slot in slots if isinstance(slot, dict)]
    for task in tasks:
        if not isinstance(task, dict) or not isinstance(task.get("slot"), int):
            return f"task entry {task!r} has no slot"
        if not 0 <= task["slot"] < len(slots):
            return f"task {task.get('name')!r} uses slot {task['slot']} of {len(slots)}"
        needed += [f"tasks/{task.get('name')}/{f}" for f in ("head.safetensors", "task.json")]
        problem = _routing_problem(task, len(slots))
        if problem:
            return problem
    for key in ("router", "strategy"):
        needed += list(checkpoint.get(key) or [])
    unnamed = [path for path in needed if path not in files]
    if unnamed:
        return f"files it needs have no sha256 in 'files': {unnamed[:3]}"
    return None


def _routing_problem(task: dict, num_slots: int) -> str | None:
    """A task's recorded routing must name distinct slots that exist, each with a finite weight."""
    routing = task.get("routing")
    if routing is None:
        return None  # written before routings were recorded
    routing = routing if isinstance(routing, dict) else {}
    slots, weights, name = routing.get("slots"), routing.get("weights"), task.get("name")
    if not isinstance(slots, list) or not isinstance(weights, list) or len(slots) != len(weights):
        return f"task {name!r}: its routing needs as many slots as weights"
    if not slots or len(set(map(str, slots))) != len(slots):
        return f"task {name!r}: its routing names no slot, or a slot twice ({slots})"
    if not all(_is_number(s, int) and 0 <= s < num_slots for s in slots):
        return f"task {name!r}: its routing names slots {slots} of {num_slots}"
    if not all(_is_number(w, int | float) and math.isfinite(w) for w in weights):
        return f"task {name!r}: its routing weights {weights} are not finite numbers"
    return None


def _is_number(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def write_checkpoint(run: RunDir, snapshot: Snapshot) -> dict[str, str]:
    """Write the snapshot's task files, the router's and strategy's state, then, last,
    `checkpoint.json` (and its copy in the newest task's folder).

    Files of earlier tasks must already be on disk and in `snapshot.saved_files` (a run writes
    one task at a time; `learner.save` writes every task into an empty folder).

    Returns:
        Every file the new checkpoint names: path (relative to the run) -> sha256.
    """
    files = dict(snapshot.saved_files)
    for task in snapshot.tasks:
        files |= run.save_task(task.name, task.module, task.head, task.record)
    newest = run.task_folder(snapshot.tasks[-1].name)
    state_files = {}
    for kind, payload in (("router", snapshot.router), ("strategy", snapshot.strategy)):
        if payload is not None and (payload[0] or payload[1]):
            state_files[kind] = run.save_state(newest, kind, *payload)
    for paths in state_files.values():
        files |= {path: file_sha256(run.path / path) for path in paths}
    owners = zip(snapshot.owners, snapshot.slot_kinds, strict=True)
    slots = [
        {"file": f"tasks/{owner}/module.safetensors", "kind": kind,
         "trainable": slot == snapshot.trainable_slot}
        for slot, (owner, kind) in enumerate(owners)
    ]  # fmt: skip
    keep = {s["file"] for s in slots} | {p for paths in state_files.values() for p in paths}
    keep |= {f"tasks/{n}/{f}" for n in snapshot.order for f in ("head.safetensors", "task.json")}
    files = {path: sha for path, sha in sorted(files.items()) if path in keep}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "status": snapshot.state["status"],
        "written": timestamp(),
        "tasks_done": len(snapshot.order),
        "last_task": snapshot.order[-1],
        **{key: value for key, value in snapshot.state.items() if key != "status"},
        "slots": slots,
        "router": state_files.get("router"),
        "strategy": state_files.get("strategy"),
        "files": files,
        "rng": rng_state(),
    }
    # the newest task keeps a copy: what `run --resume` rolls back to if a later file is lost
    atomic_write_json(newest / CHECKPOINT_FILE, checkpoint)
    atomic_write_json(run.path / CHECKPOINT_FILE, checkpoint)
    return files
