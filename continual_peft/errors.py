"""User-facing errors: each message names the bad value and the fix."""

from __future__ import annotations

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
