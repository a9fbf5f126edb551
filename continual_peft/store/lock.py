"""The run directory's lock: one writing process per run directory.

`RUN/.lock` is created with O_CREAT|O_EXCL (so exactly one of two racing writers gets it) and
holds JSON: the writer's pid, host name, start time and a random token. It is held for as long
as the run is written and removed when the writer finishes, fails or is interrupted, and at
interpreter exit. A second writer is refused with the holder's pid, host and start time.

A lock whose pid no longer runs on this host was left by a killed process (`kill -9`, a power
loss): it is taken over with a warning. A lock from another host cannot be checked from here and
is always refused; the message says which file to delete once that process is known to be gone.
Readers (`report`, `predict`, `load_learner`) never take the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import warnings
import weakref
from pathlib import Path

from continual_peft.errors import ContinualPeftError
from continual_peft.store.io import timestamp

LOCK_FILE = ".lock"
UNREADABLE_GRACE_S = 10.0  # a lock file still empty after this long was never finished


class RunLock:
    """A held lock on one folder; `release` (or interpreter exit) removes it.

    Args:
        folder: The run directory; it must exist.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": timestamp(),
            "token": uuid.uuid4().hex,
        }
        for _ in range(5):  # a takeover can race with another process's: try again
            if self._create():
                self._finalizer = weakref.finalize(self, _remove_if_mine, self.path, self.info)
                return
            holder = _read(self.path)
            if holder is not None and _alive(holder):
                raise ContinualPeftError(_held_message(folder, self.path, holder))
            if holder is None and _age(self.path) < UNREADABLE_GRACE_S:
                time.sleep(0.5)  # another writer is between creating and filling it
                continue
            _take_over(self.path, holder)
        raise ContinualPeftError(
            f"{folder}: could not take the lock {self.path}: it is unreadable or still being "
            "written. If no other continual-peft process works on this run, delete that file "
            "and try again."
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise ContinualPeftError(f"cannot create the lock {self.path}: {err}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.info))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._finalizer()


def _read(path: Path) -> dict | None:
    """The holder's info; None when the file is gone, empty or not JSON."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(holder: dict) -> bool:
    """Whether the holder may still run; a pid on another host cannot be checked: assume so."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return not _zombie(holder["pid"])


def _zombie(pid: int) -> bool:
    """Whether `pid` has exited but was not yet reaped (its parent, e.g. a killed `torchrun`,
    is gone, and a container's init may reap late): it holds nothing any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux): a process that answers is taken as alive
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _held_message(folder: Path, path: Path, holder: dict) -> str:
    gone = (
        "if that process is gone, run the command again: a lock left by a dead process on this "
        "host is taken over"
        if holder.get("host") == socket.gethostname()
        else f"if that process is gone (it runs on another host, which cannot be checked from "
        f"here), delete {path}"
    )
    return (
        f"{folder} is being written by process {holder['pid']} on {holder.get('host', '?')} "
        f"since {holder.get('started', '?')}; wait for it to finish or, {gone}."
    )


def _take_over(path: Path, holder: dict | None) -> None:
    """Remove a stale lock, making sure it is the one we judged stale and not a newer one."""
    what = (
        f"process {holder['pid']} on {holder.get('host')} (since {holder.get('started')})"
        if holder
        else "an unreadable lock file"
    )
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process removed it first
    if _read(aside) != holder:  # a fresh lock replaced the stale one meanwhile: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink()
        return
    aside.unlink()
    warnings.warn(
        f"{path.parent}: taking over a stale lock left by {what}, which is no longer running; "
        "the run continues from its last finished task.",
        stacklevel=4,
    )


def _remove_if_mine(path: Path, info: dict) -> None:
    if _read(path) == info:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
