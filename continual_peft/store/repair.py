"""Repairing a run that lost a file: `run --resume` rolls back to the newest intact task.

The newest two tasks' folders keep a copy of the checkpoint written when that task finished
(`tasks/<name>/checkpoint.json`), with every file it names (files a checkpoint names never
change afterwards; older ones are deleted, `store.checkpoint.collect_garbage`). When the run's
`checkpoint.json`, or a file it names, is missing, damaged or altered, the newer of the two
copies whose own files are all intact is the state of an uninterrupted run after that task: it
becomes the run's checkpoint, and resuming re-trains the tasks after it exactly as the run first
did (later tasks were trained on top of the lost one, so they are re-trained too). Damage that
reaches both copies' files makes the run start again from its first task (runs an older version
wrote kept a copy in every task's folder, and roll back further).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from continual_peft.errors import ContinualPeftError, RunFileError
from continual_peft.store.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    read_checkpoint,
    read_checkpoint_file,
)
from continual_peft.store.digests import check_stream
from continual_peft.store.io import atomic_write_json, load_json

if TYPE_CHECKING:
    from continual_peft.tasks.streams import Stream


def resume_point(run: Path, stream: Stream, say: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to resume `run` from, rolled back if needed; None: from the first task.

    Nothing is written before the stream given is checked against the run's (the copy's plan,
    or the damaged checkpoint's when it still reads), so a wrong stream never costs a task.

    Args:
        run: A run directory, its lock held by the caller.
        stream: The stream given to resume with.
        say: Tells the user what is rolled back and what will be re-trained.
    """
    main = run / CHECKPOINT_FILE
    copies = sorted(run.glob(f"tasks/*/{CHECKPOINT_FILE}"))
    if not main.is_file() and not copies:
        return None  # no task finished yet
    try:
        checkpoint = read_checkpoint(run)
    except RunFileError as err:
        damage = f"{err.path} {err.problem}"
    else:
        check_stream(run, checkpoint.stream_plan, stream, checkpoint.tasks)
        return checkpoint
    intact, copy_path = _newest_intact(run, copies)
    plan = intact.stream_plan if intact else _readable_plan(main)
    check_stream(run, plan, stream, intact.tasks if intact else [])
    names = [task.name for task in stream.tasks]
    done = len(intact.tasks) if intact else 0
    start = f"after task {done} ({names[done - 1]}), from that task's copy of the checkpoint"
    redo = names[done:]
    redo = f"re-training {len(redo)} task(s): {', '.join(redo)}" if redo else "no task to re-train"
    say(f"{damage}. {run} resumes {start if done else 'from the start'}, {redo}.")
    if intact is None:
        main.unlink(missing_ok=True)
        return None
    # the copy as it is on disk (an older version's format stays as it was written)
    atomic_write_json(main, {**load_json(copy_path), "status": "interrupted"}, compact=True)
    return dataclasses.replace(intact, status="interrupted")


def _newest_intact(run: Path, copies: list[Path]) -> tuple[Checkpoint | None, Path | None]:
    """The task copy of the checkpoint with the most finished tasks whose own files are all
    intact (and that is the copy of its last task), and its path; (None, None) if none is."""
    best, where = None, None
    for path in copies:
        try:
            checkpoint = read_checkpoint_file(run, path)
        except ContinualPeftError:
            continue
        names = checkpoint.task_names
        newer = best is None or len(checkpoint.tasks) > len(best.tasks)
        if names and path.parent.name == names[-1] and newer:
            best, where = checkpoint, path
    return best, where


def _readable_plan(path: Path) -> dict | None:
    """The stream plan of a damaged checkpoint that still parses, else None."""
    try:
        data = load_json(path)
    except (ContinualPeftError, OSError):
        return None
    plan = data.get("stream_plan") if isinstance(data, dict) else None
    return plan if isinstance(plan, dict) and isinstance(plan.get("tasks"), list) else None
