"""User-facing errors: each message names the bad value and the fix."""

from __future__ import annotations

import signal
import stat
from pathlib import Path


class ContinualPeftError(Exception):
    """Base class for every error this package raises on purpose."""


class CorruptFileError(ContinualPeftError):
    """A file the package wrote earlier cannot be read back (truncated or damaged).

    Attributes:
        path: The offending file.
        reason: What went wrong while reading it.
    """

    def __init__(self, path: str | Path, reason: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        fix = fix or "delete it and re-create it (for a run directory: resume the run)"
        super().__init__(f"{self.path} is corrupt or truncated ({reason}); {fix}.")


class RunFileError(CorruptFileError):
    """A file of a run directory that its `checkpoint.json` needs is missing, altered (its
    sha256 differs from the recorded one) or unreadable, or `checkpoint.json` itself is.

    `run --resume` repairs such a run: it rolls back to the newest task whose own checkpoint
    copy and files are intact and re-trains the tasks after it.

    Attributes:
        path: The offending file.
        run: The run directory.
        problem: What is wrong with it ("is missing (...)", "was altered (...)").
    """

    def __init__(self, path: str | Path, run: str | Path, problem: str) -> None:
        self.path, self.run, self.problem = Path(path), Path(run), problem
        self.reason = problem
        ContinualPeftError.__init__(
            self,
            f"{self.path} {problem}. Put it back from a copy of the run, or re-train from the "
            f"newest task whose files are intact: `continual-peft run <the run's stream "
            f"arguments> --resume {self.run}`.",
        )


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM from a cluster scheduler, SIGHUP) arrived while a command
    worked. It stops the work exactly as Ctrl-C does (the run is marked `interrupted`, its lock
    released, finished tasks kept); the command then exits with 128 + the signal's number.

    Attributes:
        signum: The signal's number.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def readable_file(path: str | Path) -> bool:
    """Whether `path` can be read as a file, once, start to end: a regular file, or a pipe (a
    FIFO, a shell's `<(...)`, /dev/stdin) or a character device. Not a folder, not a missing
    path. Whoever reads a pipe reads it once: no look ahead before the read."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:  # missing, or a link to nothing
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def check_file(path: str | Path, what: str = "file", hint: str = "check the path") -> None:
    """Refuse a path that is not a readable file (`readable_file`): absent, or a folder
    (named as such).

    Args:
        path: The path given.
        what: What it should be, e.g. "labels file", "spec file".
        hint: The fix, appended to the message.
    """
    path = Path(path)
    if path.is_dir():
        raise ContinualPeftError(f"{path} is a folder, not a {what}; {hint}.")
    if not readable_file(path):
        raise ContinualPeftError(f"{path}: {what} not found; {hint}.")
