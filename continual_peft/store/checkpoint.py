"""The checkpoint: `checkpoint.json`, the one file that says what a run directory holds.

After every task the learner hands a `Snapshot` (plain tensors and JSON-ready values) to
`write_checkpoint`, which writes that task's files (slot, head, record, its row of the accuracy
matrices, its rows of the router's statistics, each atomically), the router's and strategy's
shared state, and then, last, `checkpoint.json` (atomically too): the number of finished
tasks, every file a reader needs with its sha256, and the small run-wide state (RNG states, the
config's hash, the stream's task names and data hashes, which slot and routing each task
uses). A kill at any moment therefore leaves either the previous checkpoint or the new one;
files written after the last `checkpoint.json` are ignored by readers and overwritten when the
task is learned again. `learner.save(dir)` writes the same files at once.

A run directory grows by each task's own bytes: what belongs to one task (its record, its row
of the matrices, its rows of per-task router statistics) is written once, into its folder, and
the state every task changes (a shared covariance, a replay buffer) is written once per run
into `state/`, named by the number of tasks done. Files a checkpoint names never change
afterwards, so a checkpoint stays valid while the next task's files are being written; once the
new checkpoint is written, files that neither it nor the one before it names are deleted
(`collect_garbage`): the previous checkpoint stays whole, for `run --resume` to roll back to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from continual_peft.errors import ContinualPeftError, CorruptFileError, RunFileError
from continual_peft.store.io import atomic_write_json, file_sha256, load_json, timestamp
from continual_peft.store.migration import CHECKPOINT, upgrade_checkpoint
from continual_peft.store.rng import rng_state
from continual_peft.store.rundir import RunDir

Tensors = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class TaskFiles:
    """One finished task's files as values: what `write_task_files` writes."""

    name: str
    head: Tensors  # the task's head
    record: dict[str, Any]  # its task.json
    module: Tensors | None = None  # its slot's tensors, if its folder holds them (see Snapshot)
    # slots no task trained that a strategy builds from others (a merged slot), by file stem
    derived: dict[str, Tensors] = field(default_factory=dict)


class RouterParts(NamedTuple):
    """A router's state as a run directory stores it (`routers.persist.router_parts`)."""

    shared: Tensors  # what later tasks change: written once per run (`state/`)
    meta: dict[str, Any]  # its JSON
    task_rows: list[Tensors]  # per task, in learning order: its own rows (its folder)


@dataclass(kw_only=True)
class Snapshot:
    """A learner's state after a task, as plain values: the engine builds it, the store writes it.

    A slot shared by several tasks is written into the folder of the last task that trained it
    (`slot_files`), a slot the strategy derives from others (`TaskFiles.derived`) into the
    newest task's folder; the router's and the strategy's shared state into `state/`.
    """

    tasks: list[TaskFiles]  # the tasks whose files are written now, the newest last
    slot_files: list[str]  # per slot: its file, relative to the run (tasks/<task>/<name>)
    slot_kinds: list[str]  # per slot: its module kind
    trainable_slot: int | None  # the slot still training (shared slots), if any
    router: RouterParts | None  # None: oracle routing
    strategy: tuple[Tensors, dict[str, Any]]  # the strategy's state; ({}, {}) if none
    # everything else the checkpoint holds, JSON-ready: status, config hashes, backbone, stream,
    # every learned task's entry, records, matrices; its files, slots and rng are set on writing
    header: Checkpoint
    saved_files: dict[str, str] = field(default_factory=dict)  # on disk already: path -> sha256
    saved_retired: list[str] = field(default_factory=list)  # the last checkpoint's `retired`


class Routing(NamedTuple):
    """The slots a task's rows go through, with their weights (the strategy's `routing`)."""

    slots: list[int]
    weights: list[float]


class TaskEntry(NamedTuple):
    """A learned task as the checkpoint lists it."""

    name: str
    slot: int  # its own slot (the one its training opened or shared)
    data_sha256: str  # its data's hash, checked when the task is given again
    routing: Routing


class SlotEntry(NamedTuple):
    """A slot as the checkpoint lists it, in slot order."""

    file: str  # its module.safetensors, relative to the run
    kind: str  # its module kind
    trainable: bool  # still training (a slot shared by the tasks to come)


class StateFiles(NamedTuple):
    """A router's or strategy's state: its tensors and its JSON, relative to the run, and for
    a router each task's own rows of its statistics (in learning order; `RouterParts`)."""

    tensors: str
    meta: str
    task_rows: list[str] = []  # noqa: RUF012 (a NamedTuple field: never mutated)


@dataclass(kw_only=True)
class Checkpoint:
    """`checkpoint.json` as values: what `write_checkpoint` writes and `read_checkpoint` returns.

    Every reader of a run (load, resume, repair, evaluation, export) reads it through
    `read_checkpoint`, which checks every file it names and upgrades older formats
    (`store.migration`).
    """

    status: str  # running, finished, failed or interrupted
    written: str  # when, ISO 8601
    config_sha256: str  # the configuration's hash (config.json's, every key)
    run_config_sha256: str  # the same without where it ran (device, threads)
    backbone: dict[str, Any]  # the backbone's fingerprint
    stream: str  # the stream's name
    stream_plan: dict[str, Any] | None  # every task of the stream: names and data hashes
    baseline: str | None  # the strategy run beside this one, if any
    tasks: list[TaskEntry]  # the learned tasks, in learning order
    # per task: its record (its task.json, read from there)
    records: list[dict[str, Any]]
    # the accuracy matrices (`ForgettingMonitor.state`); on disk each task's row is in its
    # folder (`MONITOR_ROW`)
    monitor: dict[str, Any]
    slots: list[SlotEntry]  # every slot, in slot order
    router: StateFiles | None  # the router's state; None: oracle routing
    strategy: StateFiles | None  # the strategy's state; None: it keeps none
    files: dict[str, str]  # every file it names: path (relative to the run) -> sha256
    rng: dict[str, Any]  # random number generators' states after the last task
    # files the checkpoint before named and this one does not: deleted by the next checkpoint
    retired: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def to_json(self) -> dict[str, Any]:
        """The JSON object `checkpoint.json` holds (format `CHECKPOINT_FORMAT`): all but the
        records and the matrices, which the tasks' folders hold."""
        data = {"format": CHECKPOINT_FORMAT, "tasks_done": len(self.tasks)}
        data["last_task"] = self.tasks[-1].name if self.tasks else None
        for item in dataclasses.fields(self):
            if item.name in IN_TASK_FOLDERS:
                continue
            value = getattr(self, item.name)
            if item.name == "tasks":
                value = [{**t._asdict(), "routing": t.routing._asdict()} for t in value]
            elif item.name == "slots":
                value = [slot._asdict() for slot in value]
            elif item.name in ("router", "strategy") and value is not None:
                value = value._asdict()
            data[item.name] = value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        """A checkpoint from its JSON (format `CHECKPOINT_FORMAT`, already checked) with its
        records and matrices added (`read_checkpoint_file` reads them from the tasks' folders)."""
        tasks = [
            TaskEntry(
                name=t["name"],
                slot=t["slot"],
                data_sha256=t["data_sha256"],
                routing=Routing(
                    slots=list(t["routing"]["slots"]), weights=list(t["routing"]["weights"])
                ),
            )
            for t in data["tasks"]
        ]
        return cls(
            status=data["status"],
            written=data["written"],
            config_sha256=data["config_sha256"],
            run_config_sha256=data["run_config_sha256"],
            backbone=data["backbone"],
            stream=data["stream"],
            stream_plan=data["stream_plan"],
            baseline=data["baseline"],
            tasks=tasks,
            records=list(data["records"]),
            monitor=data["monitor"],
            slots=[SlotEntry(**slot) for slot in data["slots"]],
            router=_state_files(data["router"]),
            strategy=_state_files(data["strategy"]),
            files=dict(data["files"]),
            rng=data["rng"],
            retired=list(data["retired"]),
        )


def _state_files(value: dict[str, Any] | None) -> StateFiles | None:
    if not value:
        return None
    return StateFiles(value["tensors"], value["meta"], list(value.get("task_rows", [])))


CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = CHECKPOINT
IN_TASK_FOLDERS = ("records", "monitor")  # fields each task's folder holds its part of
MONITOR_ROW = "matrices.json"  # a task's row of every accuracy matrix, in its folder
ROUTER_ROWS = "router-rows.safetensors"  # a task's own rows of the router's statistics
STATE_FOLDER = "state"  # the router's and strategy's shared state, once per run


def set_status(folder: Path, status: str) -> None:
    """Rewrite the status of an existing checkpoint (finished, failed, interrupted)."""
    path = Path(folder) / CHECKPOINT_FILE
    if path.is_file():
        checkpoint = load_json(path)
        checkpoint["status"] = status
        atomic_write_json(path, checkpoint, compact=True)


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """`checkpoint.json`, with every file it names present and unchanged (sha256 checked),
    upgraded to this version's format if an older version wrote it.

    Raises:
        ContinualPeftError: No checkpoint (no task finished yet), or an unknown format.
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


def read_checkpoint_file(folder: Path, path: Path) -> Checkpoint:
    """The checkpoint in `path` (the run's own, or a task's copy of it) with every file it names
    in run directory `folder` present and unchanged; errors as `read_checkpoint`'s."""
    try:
        data = load_json(path)
    except CorruptFileError as err:
        raise RunFileError(path, folder, f"is corrupt or truncated ({err.reason})") from err
    if not isinstance(data, dict):
        raise RunFileError(path, folder, "is inconsistent (not a JSON object): it was edited")
    data = upgrade_checkpoint(data, folder, path)
    problem = _inconsistency(data)
    if problem:
        raise RunFileError(path, folder, f"is inconsistent ({problem}): it was edited or damaged")
    problem = _differs_from_copy(folder, path, data)
    if problem:
        raise RunFileError(path, folder, problem)
    for name, sha in data["files"].items():
        target = folder / name
        if not target.is_file():
            problem = f"is missing ({path.name} names it as part of the run)"
            raise RunFileError(target, folder, problem)
        if file_sha256(target) != sha:
            problem = f"was altered (its sha256 differs from the one {path} records)"
            raise RunFileError(target, folder, problem)
    return Checkpoint.from_json(data | _task_parts(folder, data))


def _task_parts(folder: Path, data: dict) -> dict[str, Any]:
    """The records and matrices a checkpoint's tasks' folders hold (none to read when an
    older format held them inline). Their files passed their checksums already."""
    if "records" in data:
        return {}
    names = [task["name"] for task in data["tasks"]]
    rows = [load_json(folder / "tasks" / name / MONITOR_ROW) for name in names]
    records = [load_json(folder / "tasks" / name / "task.json") for name in names]
    return {"records": records, "monitor": join_monitor_rows(rows)}


def recorded_baseline(folder: str | Path) -> str | None:
    """The baseline strategy a run directory was started with, as its checkpoint (or a task's
    copy of it) records it, else None. Read without checking the files it names."""
    folder = Path(folder)
    for path in [folder / CHECKPOINT_FILE, *sorted(folder.glob(f"tasks/*/{CHECKPOINT_FILE}"))]:
        try:
            data = load_json(path) if path.is_file() else None
            data = upgrade_checkpoint(data, folder, path) if isinstance(data, dict) else None
        except ContinualPeftError:
            continue
        if data is not None:
            return data["baseline"] if isinstance(data.get("baseline"), str) else None
    return None


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
    tasks, and every file a reader needs must be named with a sha256 (so none goes unchecked).
    Records and matrices are in the tasks' folders (older formats held them inline)."""
    kinds = {"tasks": list, "slots": list, "files": dict, "tasks_done": int, "retired": list}
    inline = "records" in checkpoint or "monitor" in checkpoint
    kinds |= {"records": list, "monitor": dict} if inline else {}
    for key, kind in kinds.items():
        if not isinstance(checkpoint.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    missing = [key for key in REQUIRED if key not in checkpoint]
    if missing:
        return f"it has no {missing}"
    tasks, slots, files = checkpoint["tasks"], checkpoint["slots"], checkpoint["files"]
    records = len(checkpoint["records"]) if inline else len(tasks)
    if not len(tasks) == records == checkpoint["tasks_done"]:
        return (
            f"tasks_done is {checkpoint['tasks_done']} but it lists {len(tasks)} task(s) and "
            f"{records} record(s)"
        )
    needed = []
    for slot in slots:
        if not isinstance(slot, dict) or set(slot) != set(SlotEntry._fields):
            return f"slot entry {slot!r} is not {list(SlotEntry._fields)}"
        needed.append(slot["file"])
    own = ("head.safetensors", "task.json") + (() if inline else (MONITOR_ROW,))
    for task in tasks:
        if not isinstance(task, dict) or set(task) != set(TaskEntry._fields):
            return f"task entry {task!r} is not {list(TaskEntry._fields)}"
        # -1: a task with no slot of its own (its head alone trained: `linear_probe`)
        if not _is_number(task["slot"], int) or not -1 <= task["slot"] < len(slots):
            return f"task {task['name']!r} uses slot {task['slot']!r} of {len(slots)}"
        needed += [f"tasks/{task['name']}/{f}" for f in own]
        problem = _routing_problem(task, len(slots))
        if problem:
            return problem
    for key in ("router", "strategy"):
        value = checkpoint[key]
        if value is None:
            continue
        if not isinstance(value, dict) or not {"tensors", "meta"} <= set(value) <= STATE_KEYS:
            return f"{key!r} must name its 'tensors' and 'meta' files"
        rows = value.get("task_rows", [])
        if not isinstance(rows, list) or len(rows) not in (0, len(tasks)):
            return f"{key!r} must name one file of rows per task, or none"
        needed += [value["tensors"], value["meta"], *rows]
    if not all(isinstance(path, str) for path in needed):
        return "a file it names is not a path"
    outside = [p for p in files if Path(p).is_absolute() or ".." in Path(p).parts]
    if outside:
        return f"file {outside[0]!r} is outside the run directory"
    unnamed = [path for path in needed if path not in files]
    if unnamed:
        return f"files it needs have no sha256 in 'files': {unnamed[:3]}"
    return None


STATE_KEYS = set(StateFiles._fields)
REQUIRED = [f.name for f in dataclasses.fields(Checkpoint) if f.name not in IN_TASK_FOLDERS]


def _differs_from_copy(folder: Path, path: Path, data: dict) -> str | None:
    """The run's checkpoint must equal the copy its newest task's folder keeps (all but the
    status, which finishing a run rewrites): a hand-edit of one of them (a routing, a slot, a
    record) is named instead of trusted."""
    if not data["tasks"]:
        return None
    copy_path = folder / "tasks" / str(data["tasks"][-1]["name"]) / CHECKPOINT_FILE
    if path == copy_path:
        return None
    try:
        kept = load_json(copy_path)
    except ContinualPeftError:
        return f"has no intact copy in {copy_path} to agree with"
    if not isinstance(kept, dict):
        return f"has no intact copy in {copy_path} to agree with"
    kept = upgrade_checkpoint(kept, folder, copy_path)
    differ = sorted(
        k for k in set(data) | set(kept) if k != "status" and data.get(k) != kept.get(k)
    )
    if differ:
        return f"differs from its copy {copy_path} in {differ}: one of them was edited"
    return None


def _routing_problem(task: dict, num_slots: int) -> str | None:
    """A task's recorded routing must name distinct slots that exist, each with a finite weight;
    only a task with no slot of its own (slot -1) may name none (the bare backbone)."""
    routing = task["routing"] if isinstance(task["routing"], dict) else {}
    slots, weights, name = routing.get("slots"), routing.get("weights"), task["name"]
    if not isinstance(slots, list) or not isinstance(weights, list) or len(slots) != len(weights):
        return f"task {name!r}: its routing needs as many slots as weights"
    if (not slots and task["slot"] != -1) or len(set(map(str, slots))) != len(slots):
        return f"task {name!r}: its routing names no slot, or a slot twice ({slots})"
    if not all(_is_number(s, int) and 0 <= s < num_slots for s in slots):
        return f"task {name!r}: its routing names slots {slots} of {num_slots}"
    if not all(_is_number(w, int | float) and math.isfinite(w) for w in weights):
        return f"task {name!r}: its routing weights {weights} are not finite numbers"
    return None


def _is_number(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def write_checkpoint(run: RunDir, snapshot: Snapshot) -> Checkpoint:
    """Write the snapshot's task files, each task's part of the run-wide state that is not on
    disk yet, the router's and strategy's shared state, then, last, `checkpoint.json` (and its
    copy in the newest task's folder); then delete what only older checkpoints named
    (`collect_garbage`). On the writing process only: callers go through `RunDir.write`.

    Files of earlier tasks must already be on disk and in `snapshot.saved_files` (a run writes
    one task at a time; `learner.save` writes every task into an empty folder). What is
    written costs the new task's own files plus the shared state, not the tasks before it.

    Returns:
        The checkpoint written; its `files` are every file it names: path -> sha256.
    """
    header = snapshot.header
    files = dict(snapshot.saved_files)
    for task in snapshot.tasks:
        files |= run.save_task(task.name, task.module, task.head, task.record, task.derived)
    names = header.task_names
    # each task's own part of the run-wide state, written once: the new tasks', and every
    # task's of a run that an older version wrote (which kept them in checkpoint.json)
    for index, name in enumerate(names):
        path = f"tasks/{name}/{MONITOR_ROW}"
        if path not in files:
            files[path] = run.save_json(path, monitor_row(header.monitor, index))
    state_files: dict[str, StateFiles] = {}
    done = len(names)
    if snapshot.router is not None:
        shared, meta, task_rows = snapshot.router
        paths = [f"tasks/{name}/{ROUTER_ROWS}" for name in names] if task_rows else []
        for path, rows in zip(paths, task_rows, strict=True):
            if path not in files:
                files[path] = run.save_tensors(path, rows)
        stem = f"{STATE_FOLDER}/router-{done}"
        state_files["router"] = StateFiles(*run.save_state(stem, shared, meta), task_rows=paths)
    if snapshot.strategy[0] or snapshot.strategy[1]:
        stem = f"{STATE_FOLDER}/strategy-{done}"
        state_files["strategy"] = StateFiles(*run.save_state(stem, *snapshot.strategy))
    for state in state_files.values():
        files |= {path: file_sha256(run.path / path) for path in (state.tensors, state.meta)}
    slots = [
        SlotEntry(file=file, kind=kind, trainable=slot == snapshot.trainable_slot)
        for slot, (file, kind) in enumerate(
            zip(snapshot.slot_files, snapshot.slot_kinds, strict=True)
        )
    ]
    keep = {s.file for s in slots}
    for state in state_files.values():
        keep |= {state.tensors, state.meta, *state.task_rows}
    own = ("head.safetensors", "task.json", MONITOR_ROW)
    keep |= {f"tasks/{n}/{f}" for n in names for f in own}
    named = {path: sha for path, sha in sorted(files.items()) if path in keep}
    checkpoint = dataclasses.replace(
        header,
        written=timestamp(),
        slots=slots,
        router=state_files.get("router"),
        strategy=state_files.get("strategy"),
        files=named,
        rng=rng_state(),
        retired=sorted(set(snapshot.saved_files) - set(named)),
    )
    # the newest task keeps a copy: what `run --resume` rolls back to if a later file is lost
    newest = run.task_folder(snapshot.tasks[-1].name)
    data = checkpoint.to_json()  # a few hundred bytes a task: written compact
    atomic_write_json(newest / CHECKPOINT_FILE, data, compact=True)
    atomic_write_json(run.path / CHECKPOINT_FILE, data, compact=True)
    collect_garbage(run.path, checkpoint, snapshot.saved_retired)
    return checkpoint


def collect_garbage(folder: Path, checkpoint: Checkpoint, retired: list[str]) -> None:
    """Delete what only checkpoints older than the previous one named, once `checkpoint` is
    written: the files the previous checkpoint had retired (named by the one before it, not
    by it) that `checkpoint` does not name again, and the copy of the checkpoint three tasks
    back. The previous checkpoint stays whole, so `run --resume` can roll back to it. A file
    that cannot be deleted is left (it costs disk, never correctness)."""
    doomed = [folder / path for path in retired if path not in checkpoint.files]
    names = checkpoint.task_names
    if len(names) > 2:
        doomed.append(folder / "tasks" / names[-3] / CHECKPOINT_FILE)
    for path in doomed:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def monitor_row(monitor: dict[str, Any], task: int) -> dict[str, Any]:
    """Task `task`'s part of a monitor's state (`ForgettingMonitor.state`: lists indexed by
    task, or per mode dicts of them): its entry of each list it reaches."""
    row: dict[str, Any] = {}
    for key, value in monitor.items():
        if isinstance(value, dict):
            row[key] = {mode: items[task] for mode, items in value.items() if task < len(items)}
        elif task < len(value):
            row[key] = value[task]
    return row


def join_monitor_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitor's state from every task's `monitor_row`, in learning order."""
    state: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dict):
                for mode, item in value.items():
                    state.setdefault(key, {}).setdefault(mode, []).append(item)
            else:
                state.setdefault(key, []).append(value)
    return state
