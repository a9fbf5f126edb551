"""The run directory: everything one run writes, each file written atomically.

runs/<YYYYmmdd-HHMMSS>-<stream>/
    .lock                       while a process writes the run: its pid, host and start time
    config.json                 the full configuration and the backbone's fingerprint
    checkpoint.json             written last after every task: what a reader may trust (below)
    report.json                 schema-versioned report, rewritten after every task
    report.md, accuracy_matrix.csv, accuracy_matrix.png
    tasks/<task>/module.safetensors   the task's slot after its training
    tasks/<task>/head.safetensors     the task's head
    tasks/<task>/task.json            labels, slot index, training record
    tasks/<task>/matrices.json        its row of every accuracy matrix (and its "before" values)
    tasks/<task>/router-rows.safetensors  its own rows of the router's per-task statistics
                                (task-agnostic runs: its mean, count, kept calibration rows)
    tasks/<task>/checkpoint.json      a copy of the checkpoint after it (the newest two tasks)
    state/router-<n>.safetensors, .json    the router's shared statistics after n tasks (a
                                pooled covariance, thresholds): the newest two kept
    state/strategy-<n>.safetensors, .json  the strategy's state after n tasks (a replay
                                buffer, EWC's Fisher, ...), if it keeps any: the newest two
    baseline-<strategy>/        a baseline run on the same stream (same layout), if asked for

Every file is written to a temporary file in its folder, fsynced, and renamed onto its name (the
folder is fsynced too), so no reader ever sees half a file. `checkpoint.json` names the finished
tasks and every file that holds them, with their sha256: a reader (resume, `load_learner`,
`ContinualLearner.load`) trusts only what it names, so a task interrupted at any point, even
halfway through writing its files, costs only that task. A slot shared by several tasks (seq,
replay, ewc, joint, l2p) is read from the folder of the last task that trained it; the router's
and strategy's shared state from `state/`. A run grows by each task's own files: state that
every task changes is kept for the newest two checkpoints only. See
`continual_peft.store.checkpoint`.

One process writes a run directory at a time (`.lock`, see `store.lock`); readers need no lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from continual_peft.distributed import from_writer, on_writer, world
from continual_peft.errors import ContinualPeftError
from continual_peft.registry import validate_task_name
from continual_peft.store.io import atomic_save_safetensors, atomic_write_json, file_sha256
from continual_peft.store.lock import RunLock

T = TypeVar("T")


def new_run_path(base: str | Path = "runs", stream: str = "run") -> Path:
    """A fresh `runs/<time>-<stream>` path that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{stamp}-{stream}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"{stamp}-{stream}-{suffix}"
    return path


def check_free(path: str | Path) -> Path:
    """Refuse a folder that already holds a run, so one run never overwrites another."""
    path = Path(path)
    for name in ("report.json", "checkpoint.json"):
        if (path / name).exists():
            raise ContinualPeftError(
                f"{path} already holds a run ({name}); choose another --out folder, or continue "
                "it with --resume."
            )
    return path


class RunDir:
    """Writes one run's files, holding the folder's lock until `close`.

    Under torchrun every process makes the same calls and only the writing process (rank 0)
    touches the folder: the others wait for it, and fail with its error
    (`distributed.on_writer`), so callers never branch on rank.

    Args:
        path: The folder; created if missing. Unless `resume`, a folder that already holds a
            run is refused, so one run never overwrites another.
        resume: Continue writing a run that is already there.
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.lock: RunLock | None = None
        self.write(lambda: self._open(resume))

    def _open(self, resume: bool) -> None:
        if not resume:
            check_free(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ContinualPeftError(f"cannot create run directory {self.path}: {err}") from None
        self.lock = RunLock(self.path)
        if not resume:
            try:
                check_free(self.path)  # again, now that no other writer can start one
            except ContinualPeftError:
                self.lock.release()
                raise
        for leftover in self.path.rglob(".*.tmp"):  # an atomic write cut short by a kill
            with contextlib.suppress(OSError):
                leftover.unlink()

    def write(self, action: Callable[[], T], together: bool = True) -> T | None:
        """Run `action` (which writes into this folder) on the writing process.

        Args:
            action: What to write.
            together: Every process waits for the writer and gets its result, or fails with its
                error. False after a failure, when other processes may be gone or stuck in a
                step of their own: the writer writes, the others go on at once (None).
        """
        if together:
            return from_writer(on_writer(action))
        return action() if world().writer else None

    def close(self) -> None:
        """Release the lock; nothing more is written."""
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def create(cls, path: str | Path, config: dict) -> RunDir:
        """A new run directory, locked, with its config.json written."""
        run_dir = cls(path)
        run_dir.save_config(config)
        return run_dir

    def save_config(self, config: dict) -> None:
        """config.json: the configuration and the backbone (see `ContinualLearner.run_config`)."""
        self.write(lambda: atomic_write_json(self.path / "config.json", config))

    def task_folder(self, name: str) -> Path:
        folder = self.path / "tasks" / validate_task_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_task(
        self,
        name: str,
        module: dict[str, torch.Tensor] | None,
        head: dict[str, torch.Tensor],
        info: dict,
        derived: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, str]:
        """A finished task's slot (unless None), head and record, and slots a strategy derived
        from others (`<stem>.safetensors` each); their paths and sha256."""
        folder = self.task_folder(name)
        written = []
        for stem, tensors in {"module": module, **(derived or {})}.items():
            if tensors is not None:
                atomic_save_safetensors(tensors, folder / f"{stem}.safetensors", {"task": name})
                written.append(f"{stem}.safetensors")
        atomic_save_safetensors(head, folder / "head.safetensors", {"task": name})
        atomic_write_json(folder / "task.json", info)
        written += ["head.safetensors", "task.json"]
        return {f"tasks/{name}/{f}": file_sha256(folder / f) for f in written}

    def save_state(self, stem: str, tensors: dict[str, torch.Tensor], meta: dict) -> list[str]:
        """A router's or strategy's shared state as `<stem>.safetensors` and then
        `<stem>.json` (`stem` relative to the run, e.g. `state/router-3`); the paths written,
        relative to the run."""
        (self.path / stem).parent.mkdir(parents=True, exist_ok=True)
        paths = [f"{stem}.safetensors", f"{stem}.json"]
        atomic_save_safetensors(tensors, self.path / paths[0])
        atomic_write_json(self.path / paths[1], meta)
        return paths

    def save_json(self, path: str, value: object) -> str:
        """`value` as JSON at `path` (relative to the run, its folder existing); its sha256."""
        atomic_write_json(self.path / path, value)
        return file_sha256(self.path / path)

    def save_tensors(self, path: str, tensors: dict[str, torch.Tensor]) -> str:
        """`tensors` as safetensors at `path` (relative to the run, its folder existing); its
        sha256."""
        atomic_save_safetensors(tensors, self.path / path)
        return file_sha256(self.path / path)
