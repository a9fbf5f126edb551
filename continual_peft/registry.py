"""Registries by name, and the one rule for task names.

Module kinds, routers and strategies register under a string so spec files and the CLI can name
them, and build by name with keyword options. An unknown name raises an error that lists the
valid ones; an unknown option, one that lists the valid options.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
    """A name -> class map: every registry registers, lists, checks options and builds the
    same way, with the same errors.

    An item's options are the keyword parameters (with their defaults) of its constructor, or
    of the class given as `options=` when it registers (a module kind's config dataclass).

    Args:
        kind: What is registered, for messages ("module kind", "strategy", ...).
        where_options: Where a user sets an item's options, for messages.
    """

    def __init__(self, kind: str, where_options: str = "") -> None:
        self.kind = kind
        self.where_options = where_options
        self._items: dict[str, T] = {}
        self._options: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, options: Callable[..., Any] | None = None) -> Callable[[T], T]:
        """Decorator that registers its target under `name`; `options`: the callable whose
        keyword parameters are its options (default: the target itself)."""

        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            self._options[name] = options or item
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

    def options(self, name: str) -> dict[str, Any]:
        """The options of the item registered as `name`, with their defaults (in order)."""
        self.get(name)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = inspect.signature(self._options[name]).parameters.values()
        return {p.name: p.default for p in parameters if p.name != "self" and p.kind in kinds}

    def options_type(self, name: str) -> Callable[..., Any]:
        """The callable whose keyword parameters are the options of `name` (a module kind's
        config dataclass; the item itself for routers and strategies)."""
        self.get(name)
        return self._options[name]

    def check_options(self, name: str, options: dict[str, Any], where: str = "") -> None:
        """Refuse option names the item registered as `name` does not take, naming the valid
        ones.

        Raises:
            ContinualPeftError: an unknown name, or unknown options.
        """
        valid = self.options(name)
        signature = inspect.signature(self._options[name])
        takes_more = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = sorted(set(options) - set(valid))
        if unknown and not takes_more:  # a wrapper (topk) hands the rest to what it wraps
            at = f" ({self.where_options})" if self.where_options else ""
            raise ContinualPeftError(
                f"{where + ': ' if where else ''}{self.kind} {name!r}: invalid options "
                f"{unknown}; valid options: {', '.join(valid) or 'none'}{at}"
            )

    def build(self, name: str, options: dict[str, Any] | None = None, where: str = "") -> Any:
        """The item registered as `name`, called with keyword `options` (checked first).

        Raises:
            ContinualPeftError: an unknown name, unknown options, or options the item refuses
                (its TypeError or ValueError, with the options named).
        """
        options = dict(options or {})
        self.check_options(name, options, where)
        try:
            return self.get(name)(**options)
        except (TypeError, ValueError) as err:
            raise ContinualPeftError(
                f"{where + ': ' if where else ''}{self.kind} {name!r}: bad options {options}: {err}"
            ) from None
