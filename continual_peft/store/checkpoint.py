"""The checkpoint: `checkpoint.json`, the one file that says what a run directory holds.

After every task the learner writes that task's files (slot, head, record, router and strategy
state, each atomically), and then, last, `checkpoint.json` (atomically too): the number of
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

import base64
import hashlib
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.config import without_place
from continual_peft.errors import ContinualPeftError, CorruptFileError, RunFileError
from continual_peft.routers import save_router
from continual_peft.store.io import atomic_write_json, file_sha256, load_json, timestamp

if TYPE_CHECKING:
    from continual_peft.engine.learner import ContinualLearner
    from continual_peft.store.rundir import RunDir
    from continual_peft.tasks.streams import Stream
    from continual_peft.tasks.task import Task

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def write_checkpoint(run: RunDir, learner: ContinualLearner, names: list[str]) -> None:
    """Write the files of tasks `names` (all learned; the newest last), then `checkpoint.json`.

    Files of other tasks must already be on disk and in `learner.saved_files` (a run writes
    one task at a time; `save` writes every task into an empty folder).
    """
    files = dict(learner.saved_files)
    order = list(learner.learned)
    owner = {state.slot: name for name, state in learner.learned.items()}  # last task per slot
    for name in names:
        state = learner.learned[name]
        module = learner.bank.slot_state(state.slot) if owner[state.slot] == name else None
        head = dict(learner.heads.heads[name].state_dict())
        files |= run.save_task(name, module, head, learner.records[state.index])
    newest = run.task_folder(names[-1])
    state_files = {}
    if learner.router is not None:
        save_router(learner.router, newest)
        names = ("router.safetensors", "router.json")
        state_files["router"] = [_rel(run, newest / name) for name in names]
    tensors, meta = learner.strategy.state()
    if tensors or meta:
        state_files["strategy"] = run.save_strategy(newest, tensors, meta)
    for paths in state_files.values():
        files |= {path: file_sha256(run.path / path) for path in paths}
    slots = [
        {
            "file": f"tasks/{owner[slot]}/module.safetensors",
            "kind": learner.bank.slot_kinds[slot],
            "trainable": learner.bank.has_trainable and slot == learner.bank.num_slots - 1,
        }
        for slot in range(learner.bank.num_slots)
    ]
    keep = {s["file"] for s in slots} | {p for paths in state_files.values() for p in paths}
    keep |= {f"tasks/{n}/{f}" for n in order for f in ("head.safetensors", "task.json")}
    files = {path: sha for path, sha in sorted(files.items()) if path in keep}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "status": learner.status,
        "written": timestamp(),
        "tasks_done": len(order),
        "last_task": order[-1],
        "config_sha256": config_sha256(learner.config.to_dict()),
        "run_config_sha256": run_config_sha256(learner.config.to_dict()),
        "backbone": learner.fingerprint(),
        "stream": learner.stream,
        "stream_plan": learner.stream_plan,
        "baseline": learner.planned_baseline,  # the strategy run beside it, if any
        "tasks": [
            {
                "name": n,
                "slot": learner.learned[n].slot,
                "data_sha256": learner.task_digest(n),
                # what the task's rows go through now (the strategy's routing): what an export
                # must reproduce
                "routing": dict(
                    zip(("slots", "weights"), learner.strategy.routing(learner, n), strict=True)
                ),
            }
            for n in order
        ],  # fmt: skip
        "slots": slots,
        "router": state_files.get("router"),
        "strategy": state_files.get("strategy"),
        "files": files,
        "records": learner.records,
        "monitor": learner.monitor.state(),
        "rng": rng_state(),
    }
    # the newest task keeps a copy: what `run --resume` rolls back to if a later file is lost
    atomic_write_json(newest / CHECKPOINT_FILE, checkpoint)
    atomic_write_json(run.path / CHECKPOINT_FILE, checkpoint)
    learner.saved_files = files


def save_learner(learner: ContinualLearner, run: RunDir) -> Path:
    """`learner.save`: config, every task's files, checkpoint and report into a new folder."""
    try:
        run.save_config({"config": learner.config.to_dict(), "backbone": learner.fingerprint()})
        own, learner.saved_files = learner.saved_files, {}
        try:
            if learner.learned:
                write_checkpoint(run, learner, list(learner.learned))
        finally:
            learner.saved_files = own
        run.save_report(learner.report)
    finally:
        run.close()
    return run.path


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


def _rel(run: RunDir, path: Path) -> str:
    return path.relative_to(run.path).as_posix()


# ---------------------------------------------------------------- what must match on resume


def run_config_sha256(config: dict) -> str:
    """A hash of a run's configuration as config.json holds it, less where it computed (a run
    may resume on another device): checkpoint.json records it, so an edited config.json is
    named instead of silently changing what a resumed or reloaded run does."""
    data = json.loads(json.dumps(config, default=str))
    if isinstance(data.get("backbone"), dict):
        data["backbone"] = without_place(data["backbone"])
    return config_sha256(data)


def config_sha256(config: dict) -> str:
    """A hash of a config dict (`LearnerConfig.to_dict()`), independent of key order."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(saved: dict, given: dict) -> list[str]:
    """Each dotted key whose value differs, as 'key: A in the run, B here'."""
    flat_saved = _flatten(json.loads(json.dumps(saved, default=str)))
    flat_given = _flatten(json.loads(json.dumps(given, default=str)))
    keys = sorted(set(flat_saved) | set(flat_given))
    return [
        f"{key}: {flat_saved.get(key)!r} in the run, {flat_given.get(key)!r} here"
        for key in keys
        if flat_saved.get(key) != flat_given.get(key)
    ]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def task_digest(task: Task) -> str:
    """A hash of a task's data: name, labels, both splits and the router's inputs."""
    digest = hashlib.sha256()
    for part in (task.name, task.labels, task.train_labels, task.test_labels):
        digest.update(json.dumps(part, default=str).encode())
    for inputs in (task.train_inputs, task.test_inputs, task.router_inputs or []):
        digest.update(f"|{len(inputs)}|".encode())
        for item in inputs:
            digest.update(_input_bytes(item))
            digest.update(b"\x00")
    return digest.hexdigest()


def _input_bytes(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes()
    if hasattr(item, "tobytes") and hasattr(item, "mode"):  # a PIL image
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    return repr(item).encode()


def stream_plan(stream: Stream) -> dict[str, Any]:
    """The stream's task names and data hashes, in training order."""
    return {
        "name": stream.name,
        "tasks": [task.name for task in stream.tasks],
        "data_sha256": [task_digest(task) for task in stream.tasks],
    }


def check_stream(run: Path, saved: dict | None, stream: Stream, done: list[dict]) -> None:
    """Refuse a stream that is not the one the run was learning, naming the first difference."""
    plan = stream_plan(stream)
    if saved is not None and saved["tasks"] != plan["tasks"]:
        raise ContinualPeftError(
            f"{run} was learning the tasks {saved['tasks']} in that order, but the stream given "
            f"has {plan['tasks']}: resume with the same stream spec, order and --max-train/"
            "--max-test as the run, or start a new run."
        )
    for position, entry in enumerate(done):
        if position >= len(plan["tasks"]) or plan["tasks"][position] != entry["name"]:
            raise ContinualPeftError(
                f"{run}: finished task {position + 1} is {entry['name']!r}, but the stream given "
                f"has {plan['tasks'][position] if position < len(plan['tasks']) else 'no task'} "
                "there: resume with the same stream."
            )
        if plan["data_sha256"][position] != entry["data_sha256"]:
            raise ContinualPeftError(
                f"{run}: task {entry['name']!r} has other data than when the run learned it "
                "(its data hash differs): resume with the same data files, --max-train and "
                "--max-test, or start a new run."
            )


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """The global RNGs' states (torch CPU, numpy, Python), JSON-ready.

    Every random choice of the engine comes from generators seeded per task
    (`learner.task_seed`), so results do not depend on these; they are restored on resume so
    that user code relying on the global RNGs sees the same sequence as in the uninterrupted run.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": {
            "kind": kind,
            "keys": base64.b64encode(np.asarray(keys, dtype=np.uint32).tobytes()).decode(),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch_state = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(torch_state))
    saved = state["numpy"]
    keys = np.frombuffer(base64.b64decode(saved["keys"]), dtype=np.uint32).copy()
    np.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
