"""Atomic file writing and checked reading for everything a run directory holds.

A run can be killed at any moment and resumed later, and reports are read while a run is still
writing them. Every writer here therefore writes a temporary file in the target's directory and
renames it onto the target, so a reader sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from continual_peft._version import __version__
from continual_peft.errors import ContinualPeftError, CorruptFileError, readable_file

PathLike = str | os.PathLike[str]

# mkstemp creates files as 0600; read the umask once so atomically written files get the same
# permissions as a plain open() would give them (reading it means briefly setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a completed rename survives a power loss (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories; the rename itself is still atomic
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never observe a partial file.

    The bytes go to a temporary file in the same directory (a rename is only atomic within one
    file system), which is flushed and fsynced and then moved onto ``path`` with ``os.replace``.
    On any failure the temporary file is removed and the previous ``path`` is left untouched; an
    OS error (a full disk) becomes a ContinualPeftError that says so, others propagate.

    Args:
        path: Target file; its parent directory must exist. A symbolic link is written through
            (its target is replaced, the link stays); a target that is not a regular file (a
            device such as /dev/stdout, a pipe) is refused.
        data: The complete new contents.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_file():
        raise ContinualPeftError(
            f"cannot write {path}: it is not a regular file (a folder, device or pipe); give a "
            "file name (for standard output, where a command offers it: -)"
        )
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:  # a missing or read-only folder: nothing was written
        raise ContinualPeftError(
            f"cannot write {target}: {err.strerror or err} (in {target.parent}); write it to a "
            "folder that exists and is writable"
        ) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(err, OSError):  # a full disk, a read-only folder: say what is kept
            raise ContinualPeftError(
                f"cannot write {target}: {err.strerror or err}. The previous version of the file "
                "is kept; free space, or fix the path or the permissions (a run continues with "
                "`continual-peft run ... --resume RUN`)."
            ) from err
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path`` as UTF-8.

    Args:
        path: Target file; its parent directory must exist.
        text: The complete new contents.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def nan_to_none(obj: Any) -> Any:
    """Recursively replace float NaN/inf (numpy arrays and scalars included) by None, since
    strict JSON has no spelling for them; arrays and tuples become lists."""
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, dict):
        return {key: nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        if all(type(value) in (float, int) for value in obj):  # a row of numbers: no recursion
            return [value if math.isfinite(value) else None for value in obj]
        return [nan_to_none(value) for value in obj]
    return obj


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, as a hex string (what checkpoint.json records)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def timestamp() -> str:
    """Local time as the files record it, e.g. 2026-11-30T07:58:01+0000."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def atomic_write_json(path: PathLike, obj: Any, compact: bool = False) -> None:
    """Atomically write ``obj`` as strict JSON, indented unless `compact`.

    Float NaN and infinities (e.g. unmeasured entries of an accuracy matrix) become ``null``:
    Python's default would emit the non-standard token ``NaN``, which other JSON readers reject.
    Tuples become lists. Anything else that ``json`` cannot encode raises ``TypeError``.

    Args:
        path: Target file; its parent directory must exist.
        obj: A JSON-ready value (dicts, lists, str, int, float, bool, None).
        compact: One line, no indentation: for files that grow with the number of tasks and
            are written after every task (the standard library's C encoder writes them about
            ten times faster than its indenting one).
    """
    indent = None if compact else 2
    text = json.dumps(nan_to_none(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def _read_bytes(source: Path) -> bytes:
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise ContinualPeftError(f"{source} does not exist; check the path.") from None


def load_json(path: PathLike) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`.

    Args:
        path: The file to read.

    Returns:
        The decoded value.

    Raises:
        ContinualPeftError: If the file does not exist.
        CorruptFileError: If the file is not valid UTF-8 JSON (e.g. truncated).
    """
    source = Path(path)
    raw = _read_bytes(source)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptFileError(source, f"not UTF-8: {err}") from err
    except json.JSONDecodeError as err:
        raise CorruptFileError(source, f"invalid JSON: {err}") from err


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Atomically save tensors in the safetensors format.

    Tensors are moved to CPU and made contiguous first, because safetensors serialises raw
    storage and refuses non-contiguous views.

    Args:
        tensors: Name to tensor; tensors must not share memory.
        path: Target file; its parent directory must exist.
        metadata: Optional string-to-string header metadata.
    """
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, _st_save(prepared, metadata=metadata))


def load_safetensors(path: PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file (dtypes as stored).

    Args:
        path: The file to read.
        device: Where the tensors go.

    Returns:
        Name to tensor.

    Raises:
        ContinualPeftError: If the file does not exist.
        CorruptFileError: If the file is not a valid safetensors file (e.g. truncated).
    """
    source = Path(path)
    raw = _read_bytes(source)
    try:
        with torch.device("cpu"):  # an empty tensor would land on the default device
            tensors = _st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CorruptFileError(source, f"invalid safetensors data: {err}") from err
    return {name: value.to(device) for name, value in tensors.items()}


def load_versioned_json(
    path: PathLike, kind: str, version: int, hint: str, tagged: bool = True
) -> dict[str, Any]:
    """Read `<kind>.json` (pass its folder or the file), checking what it is and its schema
    version: a report, an aggregate or a leaderboard.

    Args:
        path: The folder holding `<kind>.json`, or the file itself.
        kind: "report", "aggregate", "leaderboard": the file's name (and its `kind` field).
        version: The schema version this code reads.
        hint: What to pass instead, for the message when the file is missing.
        tagged: Whether the file names its kind in a `kind` field (reports do not).

    Raises:
        ContinualPeftError: No such file, another kind of file, or another schema version
            (naming the version that wrote it).
        CorruptFileError: Not JSON, truncated, or no schema version at all.
    """
    source = Path(path)
    if source.is_dir():
        source = source / f"{kind}.json"
    if not readable_file(source):
        raise ContinualPeftError(f"no {kind} at {source}; {hint}")
    data = load_json(source)
    if tagged and (not isinstance(data, dict) or data.get("kind") != kind):
        raise ContinualPeftError(f"{source} is not a continual-peft {kind} (no kind: {kind}).")
    if not isinstance(data, dict) or "schema_version" not in data:
        raise CorruptFileError(source, f"not a continual-peft {kind}: no schema_version")
    if data["schema_version"] != version:
        writer = (
            (data.get("tool") or {}).get("version") if isinstance(data.get("tool"), dict) else None
        )
        origin = (
            f"written by continual-peft {writer}: read it with that version"
            if writer and writer != __version__
            else "from another version of continual-peft, or edited"
        )
        raise ContinualPeftError(
            f"{source} has schema_version {data['schema_version']!r}, but continual-peft "
            f"{__version__} reads schema_version {version}; the file is {origin}."
        )
    return data
