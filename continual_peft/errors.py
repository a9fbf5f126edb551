"""User-facing errors: each message names the bad value and the fix."""

from __future__ import annotations

import signal
from pathlib import Path


class ContinualPeftError(Exception):
    """Base class for every error this package raises on purpose."""


class CorruptFileError(ContinualPeftError):
    """A file the package wrote earlier cannot be read back (truncated or damaged).

    Attributes:
        path: The offending file.
        reason: What went wrong while reading it.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{self.path} is corrupt or truncated ({reason}); delete it and re-create it "
            "(for a run directory: resume or re-run the task that wrote it)."
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
