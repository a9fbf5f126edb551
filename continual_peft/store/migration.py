"""Run directories written by earlier versions, read as this version writes them.

The one place that knows older formats. A reader hands the JSON it loaded to `upgrade_checkpoint`
or `upgrade_config` and gets this version's layout back; nothing on disk is rewritten (a
resumed run writes its next checkpoint in the current format).

`checkpoint.json` format 2 differs from format 3 in: the records and the accuracy matrices are
inline (`records`, `monitor`) rather than in the tasks' folders; the router's state is one file
pair in the newest task's folder (no `task_rows`); there is no `retired` list. Readers take the
inline values; the next checkpoint a resumed run writes puts each task's part in its folder.

Format 1 differs from format 2 in:
- `checkpoint.json`: `router` and `strategy` are `[tensors, meta]` lists, not objects; a task
  may lack its `routing` (runs made before routings were recorded: its own slot, or every slot
  under `olora`, which sums them all); `baseline` and `stream_plan` may be absent (the baseline
  is then the run's `baseline-<strategy>/` folder).
- `config.json`: no `format`; the backbone's `dtype` may be "auto", which stood for the dtype
  the run computed in (recorded in the backbone's fingerprint).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from continual_peft.errors import ContinualPeftError
from continual_peft.store.io import load_json

CURRENT = 2  # config.json's format
CHECKPOINT = 3  # checkpoint.json's format


def upgrade_checkpoint(data: dict[str, Any], folder: Path, path: Path) -> dict[str, Any]:
    """`checkpoint.json` of run directory `folder` (read from `path`) in the current format;
    `data` is not changed.

    Raises:
        ContinualPeftError: a format this version does not know.
    """
    found = data.get("format")
    if found == CHECKPOINT:
        return data
    if found == 2:
        return _from_format_2(data)
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ContinualPeftError(
            f"{path} is damaged: its format is {found!r}, not a version number; restore it "
            "from a copy of the run (`run --resume` repairs a run from its tasks' copies)."
        )
    if found != 1:
        raise ContinualPeftError(
            f"{path}: checkpoint format {found!r} is not supported (this version reads formats "
            f"1 to {CHECKPOINT}); a newer continual-peft wrote it: upgrade continual-peft."
        )
    data = copy.deepcopy(data)
    data.setdefault("stream_plan", None)
    if "baseline" not in data:
        folders = sorted(sub.name for sub in folder.glob("baseline-*") if sub.is_dir())
        data["baseline"] = folders[0].removeprefix("baseline-") if folders else None
    for key in ("router", "strategy"):
        if isinstance(data.get(key), list) and len(data[key]) == 2:
            data[key] = {"tensors": data[key][0], "meta": data[key][1]}
    slots = data.get("slots") if isinstance(data.get("slots"), list) else []
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    unrouted = [task for task in tasks if isinstance(task, dict) and "routing" not in task]
    strategy = _strategy(folder) if unrouted else None  # config.json read only when needed
    for task in unrouted:
        own = [task.get("slot")] if strategy != "olora" else list(range(len(slots)))
        task["routing"] = {"slots": own, "weights": [1.0] * len(own)}
    return _from_format_2(data)


def _from_format_2(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 as format 3: no retired files; records and matrices stay inline."""
    return {**data, "format": CHECKPOINT, "retired": data.get("retired", [])}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
    """`config.json` (`{"config": ..., "backbone": ...}`) in the current format; `saved` is not
    changed."""
    found = saved.get("format", 1)  # format 1 wrote none
    if found == CURRENT:
        return saved
    if found != 1:
        raise ContinualPeftError(
            f"config.json: format {found!r} is not supported (this version reads formats 1 and "
            f"{CURRENT}); a newer continual-peft wrote it, or it was edited."
        )
    saved = copy.deepcopy(saved)
    saved["format"] = CURRENT
    backbone = saved["config"].get("backbone")
    recorded = (saved.get("backbone") or {}).get("dtype")
    if isinstance(backbone, dict) and backbone.get("dtype") == "auto" and recorded:
        backbone["dtype"] = recorded
    return saved


def _strategy(folder: Path) -> str | None:
    """The run's strategy as its config.json names it, None if it does not read."""
    try:
        saved = load_json(folder / "config.json")
    except (ContinualPeftError, OSError):
        return None
    config = saved.get("config") if isinstance(saved, dict) else None
    return config.get("strategy") if isinstance(config, dict) else None
