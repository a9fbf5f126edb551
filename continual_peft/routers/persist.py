"""Saving a router with a run: `router.safetensors` (statistics) + `router.json` (name, options)."""

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


def load_router(folder: PathLike, device: str | torch.device = "cpu") -> Router:
    """Rebuild the router saved in `folder`; it makes the same decisions as when saved.

    Args:
        folder: A directory written by `save_router`.
        device: Where its statistics go (the backbone's device).
    """
    source = Path(folder)
    meta = load_json(source / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ContinualPeftError(
            f"{source / META_FILE}: router format {found!r} is not supported "
            f"(this version reads format {ROUTER_FORMAT})"
        )
    cls = ROUTERS.get(meta.pop("router"))
    meta.pop("format")
    tensors = load_safetensors(source / TENSORS_FILE)
    try:
        router = cls.from_state(tensors, meta)
    except STATE_ERRORS as err:
        # the files passed their checksums, so they were changed with the checksums or
        # written by another version: say which folder, and how to get a router back
        raise CorruptFileError(source, f"its saved router does not load: {err}") from err
    return router.to(device)
