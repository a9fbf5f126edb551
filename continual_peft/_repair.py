"""Repairing a run that lost a file: `run --resume` rolls back to the newest intact task.

Every task's folder keeps a copy of the checkpoint written when that task finished
(`tasks/<name>/checkpoint.json`), and files a checkpoint names never change afterwards. When the
run's `checkpoint.json`, or a file it names, is missing, damaged or altered, the newest copy whose
own files are all intact is the state of an uninterrupted run after that task: it becomes the
run's checkpoint, and resuming re-trains the tasks after it exactly as the run first did (later
tasks were trained on top of the lost one, so they are re-trained too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from continual_peft._checkpoint import CHECKPOINT_FILE, read_checkpoint, read_checkpoint_file
from continual_peft._io import atomic_write_json
from continual_peft.errors import ContinualPeftError, RunFileError


def resume_point(run: Path, names: list[str], say: Callable[[str], None]) -> dict | None:
    """The checkpoint to resume `run` from, rolled back if needed; None: from the first task.

    Args:
        run: A run directory, its lock held by the caller.
        names: The stream's task names in training order (a damaged checkpoint.json cannot
            say which copies to look for).
        say: Tells the user what is rolled back and what will be re-trained.
    """
    main = run / CHECKPOINT_FILE
    if not any(path.is_file() for path in [main, *_copies(run, names)]):
        return None  # no task finished yet
    try:
        return read_checkpoint(run)
    except RunFileError as err:
        damage = f"{err.path} {err.problem}"
    except ContinualPeftError:
        if main.is_file():
            raise  # another format: not this version's to repair
        damage = f"{main} is missing"
    intact = _newest_intact(run, names)
    done = intact["tasks_done"] if intact else 0
    redo = names[done:]
    start = f"after task {done} ({names[done - 1]}), from that task's copy of the checkpoint"
    redo = f"re-training {len(redo)} task(s): {', '.join(redo)}" if redo else "no task to re-train"
    say(f"{damage}. {run} resumes {start if done else 'from the start'}, {redo}.")
    if intact is None:
        (run / CHECKPOINT_FILE).unlink(missing_ok=True)
        return None
    intact["status"] = "interrupted"
    atomic_write_json(run / CHECKPOINT_FILE, intact)
    return intact


def _copies(run: Path, names: list[str]) -> list[Path]:
    return [run / "tasks" / name / CHECKPOINT_FILE for name in names]


def _newest_intact(run: Path, names: list[str]) -> dict | None:
    """The newest task's checkpoint copy that describes the first tasks of `names` with every
    file it names intact, or None."""
    for path in reversed(_copies(run, names)):
        if not path.is_file():
            continue
        try:
            checkpoint = read_checkpoint_file(run, path)
        except ContinualPeftError:
            continue
        done = [entry["name"] for entry in checkpoint["tasks"]]
        if done == names[: len(done)] and done and path.parent.name == done[-1]:
            return checkpoint
    return None
