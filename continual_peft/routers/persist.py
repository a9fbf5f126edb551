"""Saving a router: its statistics as safetensors, its name, options and small state as JSON.

`save_router` writes both into one folder (`router.safetensors`, `router.json`). A run
directory stores them in parts instead (`split_rows`): each task's own rows of the per-task
tensors (`Router.task_rows`) once, in the task's folder, and the rest, which later tasks
change, once per run; `load_router_files` joins them again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.routers.base import ROUTERS, Router
from continual_peft.store.io import (
    PathLike,
    atomic_save_safetensors,
    atomic_write_json,
    load_json,
    load_safetensors,
)

ROUTER_FORMAT = 1
# what rebuilding a router from changed files can raise, deep in its statistics
STATE_ERRORS = (
    ContinualPeftError,
    ValueError,
    TypeError,
    KeyError,
    RuntimeError,
    ArithmeticError,
    np.linalg.LinAlgError,
)
TENSORS_FILE = "router.safetensors"
META_FILE = "router.json"


def save_router(router: Router, folder: PathLike) -> None:
    """Write the router's state into `folder` (created if missing), each file atomically.

    The JSON is written last, so a folder whose JSON exists always has its tensors.

    Args:
        router: Any registered router.
        folder: Target directory.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    tensors, meta = router_state(router)
    atomic_save_safetensors(tensors, target / TENSORS_FILE)
    atomic_write_json(target / META_FILE, meta)


def router_state(router: Router) -> tuple[dict[str, torch.Tensor], dict]:
    """What `save_router` writes, as values: the statistics, and the JSON (format, the
    router's name and options, its small state)."""
    tensors, meta = router.state()
    return tensors, {"format": ROUTER_FORMAT, "router": router.name, **meta}


def router_parts(
    router: Router,
) -> tuple[dict[str, torch.Tensor], dict, list[dict[str, torch.Tensor]]]:
    """What a run directory stores of a router: its shared tensors, its JSON (as
    `router_state`'s) and each task's own rows (`split_rows`)."""
    tensors, meta = router_state(router)
    shared, increments = split_rows(tensors, router.task_rows())
    return shared, meta, increments


def split_rows(
    tensors: dict[str, torch.Tensor], rows: dict[str, list[int]]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A router's state tensors as (shared tensors, one dict per task of that task's rows).

    Args:
        tensors: `Router.state()`'s tensors.
        rows: `Router.task_rows()`: per-task tensor -> rows per task, in task order.

    Returns:
        The tensors not stacked per task, and per task its rows of each stacked tensor
        (copies, so each can be written on its own).
    """
    shared = {key: value for key, value in tensors.items() if key not in rows}
    tasks = max((len(sizes) for sizes in rows.values()), default=0)
    increments: list[dict[str, torch.Tensor]] = [{} for _ in range(tasks)]
    for key, sizes in rows.items():
        assert sum(sizes) == len(tensors[key]) and len(sizes) == tasks, key
        for task, part in enumerate(torch.split(tensors[key], sizes)):
            increments[task][key] = part.clone()
    return shared, increments


def join_rows(
    shared: dict[str, torch.Tensor], increments: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """`split_rows` undone: the per-task rows stacked again in task order beside the shared
    tensors. Raises ContinualPeftError when the tasks' parts name different tensors."""
    keys = {key for part in increments for key in part}
    if any(set(part) != keys for part in increments) or keys & set(shared):
        found = [sorted(part) for part in increments]
        raise ContinualPeftError(f"the tasks' router rows name different tensors: {found}")
    return dict(shared) | {key: torch.cat([part[key] for part in increments]) for key in keys}


def load_router(folder: PathLike, device: str | torch.device = "cpu") -> Router:
    """Rebuild the router saved in `folder`; it makes the same decisions as when saved.

    Args:
        folder: A directory written by `save_router`.
        device: Where its statistics go (the backbone's device).
    """
    source = Path(folder)
    return load_router_files(source / TENSORS_FILE, source / META_FILE, [], device)


def load_router_files(
    tensors_file: PathLike,
    meta_file: PathLike,
    increments: list[PathLike],
    device: str | torch.device = "cpu",
) -> Router:
    """Rebuild a router from its shared tensors, its JSON and every task's rows (a run
    directory's parts, see `split_rows`; none for a folder of `save_router`).

    Raises:
        ContinualPeftError: an unknown router format.
        CorruptFileError: files that pass their checksums but do not make a router.
    """
    meta_path = Path(meta_file)
    meta = load_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ContinualPeftError(
            f"{meta_path}: router format {found!r} is not supported "
            f"(this version reads format {ROUTER_FORMAT})"
        )
    cls = ROUTERS.get(meta.pop("router"))
    meta.pop("format")
    try:
        parts = [load_safetensors(path) for path in increments]
        tensors = join_rows(load_safetensors(tensors_file), parts)
        router = cls.from_state(tensors, meta)
    except STATE_ERRORS as err:
        # the files passed their checksums, so they were changed with the checksums or
        # written by another version: say which folder, and how to get a router back
        where = meta_path.parent
        raise CorruptFileError(where, f"its saved router does not load: {err}") from err
    return router.to(device)
