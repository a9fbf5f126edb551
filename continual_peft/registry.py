"""Registries by name, and the one rule for task names.

Module kinds, routers and strategies register under a string so spec files and the CLI can name
them.
An unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Generic, TypeVar

from continual_peft.errors import ContinualPeftError

T = TypeVar("T")

TASK_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def validate_task_name(name: object, where: str = "task name") -> str:
    """Check a task name; it becomes a slot name and a folder name, so it must be path-safe.

    Args:
        name: The candidate name.
        where: Where the name came from, for the error message (file and key).

    Returns:
        The name, unchanged.
    """
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
        raise ContinualPeftError(
            f"{where}: invalid task name {name!r}. Task names become folder names: use lower-case "
            "letters, digits, '-' and '_', starting with a letter or digit (e.g. 'agnews')."
        )
    return name


class Registry(Generic[T]):
    """A name -> factory map with helpful errors.

    Args:
        kind: What is registered, for messages ("module kind", "strategy", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under `name`."""

        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorate

    def get(self, name: str) -> T:
        """The item registered under `name`; an unknown name lists the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            raise ContinualPeftError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
