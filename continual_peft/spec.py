"""Reading TOML spec files with errors that name the file and the key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from continual_peft.errors import ContinualPeftError, check_file


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file names itself."""
    check_file(path, "spec file", "give the path of a TOML spec")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ContinualPeftError(f"{path}: not valid TOML ({err}).") from None


class Section:
    """A table of a spec file that knows where it came from.

    Args:
        data: The parsed table.
        where: "file" or "file: key" prefix for messages.
        allowed: Every key this table may have; others are refused by name.
    """

    def __init__(self, data: object, where: str, allowed: set[str]) -> None:
        if not isinstance(data, dict):
            raise ContinualPeftError(f"{where}: expected a table, got {type(data).__name__}")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ContinualPeftError(
                f"{where}: unknown key(s) {unknown}; valid keys: {sorted(allowed)}"
            )
        self.data = data
        self.where = where

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        """The value of `key`, checked against `kind`."""
        if key not in self.data:
            if required:
                raise ContinualPeftError(f"{self.where}: missing required key '{key}'")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            hint = ""
            if kind is list and isinstance(value, str):  # one value where a list is wanted
                hint = f" (a list of one: {key} = [{json.dumps(value)}])"
            raise ContinualPeftError(
                f"{self.where}: key '{key}' must be {names}, got {value!r}{hint}"
            )
        return value
