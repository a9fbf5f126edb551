"""The global RNGs' states, saved with every checkpoint and restored on resume."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The global RNGs' states (torch CPU, numpy, Python), JSON-ready.

    Every random choice of the engine comes from generators seeded per task
    (`learner.task_seed`), so results do not depend on these; they are restored on resume so
    that user code relying on the global RNGs sees the same sequence as in the uninterrupted run.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": {
            "kind": kind,
            "keys": base64.b64encode(np.asarray(keys, dtype=np.uint32).tobytes()).decode(),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs to a state `rng_state` returned."""
    torch_state = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(torch_state))
    saved = state["numpy"]
    keys = np.frombuffer(base64.b64decode(saved["keys"]), dtype=np.uint32).copy()
    np.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
