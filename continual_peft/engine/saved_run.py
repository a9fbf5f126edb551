"""A run directory as its readers see it: config.json and the last checkpoint, both checked.

Every reader of a finished or unfinished run (`ContinualLearner.load`, `run --resume`,
`predict`, `eval`, `export`) goes through `read_run`, so an edited `config.json` or a damaged
file is refused the same way everywhere, and a run written by an earlier version is read in
this version's format (`store.migration`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_peft.backbones.fingerprint import CHECKED
from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.store.checkpoint import CHECKPOINT_FILE, Checkpoint, read_checkpoint
from continual_peft.store.digests import config_differences, run_config_sha256, without_place
from continual_peft.store.io import load_json
from continual_peft.store.migration import upgrade_config


@dataclass(frozen=True, kw_only=True)
class SavedRun:
    """A run directory's configuration and last checkpoint, read and checked."""

    folder: Path
    config: LearnerConfig  # as the run was started (config.json)
    fingerprint: dict[str, Any]  # the backbone's, as the run recorded it
    checkpoint: Checkpoint


def read_run(folder: str | Path) -> SavedRun:
    """The run in `folder`, its config.json and every file its checkpoint names checked.

    Raises:
        ContinualPeftError: not a run directory, no task finished yet, an edited config.json.
        RunFileError: a missing, damaged or altered file (`run --resume` repairs the run).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ContinualPeftError(f"run directory {folder} does not exist; check the path.")
    saved = read_config_json(folder)
    checkpoint = read_checkpoint(folder)
    # the backbone as the checkpoint records it; config.json's copy must agree with it
    recorded, ours = saved.get("backbone"), checkpoint.backbone
    if not isinstance(recorded, dict) or not recorded:
        differ = ["missing"]
    else:  # a key one of them lacks was added since the run began (a resumed older run)
        differ = [k for k in CHECKED if k in recorded and k in ours and recorded[k] != ours[k]]
    if differ:
        raise ContinualPeftError(
            f"{folder / 'config.json'} was edited: its backbone ({', '.join(differ)}) is not "
            f"the one {folder / CHECKPOINT_FILE} records. Restore it from a copy of the run."
        )
    return SavedRun(
        folder=folder,
        config=LearnerConfig.from_dict(saved["config"], str(folder / "config.json")),
        fingerprint=checkpoint.backbone,
        checkpoint=checkpoint,
    )


def saved_config(run_dir: str | Path) -> LearnerConfig:
    """The configuration a run directory was started with."""
    run = Path(run_dir)
    return LearnerConfig.from_dict(read_config_json(run)["config"], str(run / "config.json"))


def read_config_json(run: Path) -> dict:
    """config.json, checked (an object with a config, unchanged since the last checkpoint) and
    in the current format."""
    path = run / "config.json"
    if not path.is_file():
        if (run / CHECKPOINT_FILE).is_file() or (run / "tasks").is_dir():
            raise ContinualPeftError(
                f"{path} is missing: the run's configuration went with it (checkpoint.json keeps "
                "only its hash). Put it back from a copy of the run, or re-run the stream into a "
                "new run directory."
            )
        raise ContinualPeftError(f"{run}: not a run directory (no config.json).")
    saved = load_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ContinualPeftError(
            f"{path} is damaged (it must be an object with a 'config'); restore it from a copy "
            "of the run."
        )
    checkpoint = run / CHECKPOINT_FILE
    try:
        recorded = load_json(checkpoint) if checkpoint.is_file() else None
    except CorruptFileError:
        recorded = None  # named by whoever reads the checkpoint; `run --resume` repairs it
    recorded = recorded.get("run_config_sha256") if isinstance(recorded, dict) else None
    upgraded = upgrade_config(saved)
    if recorded and recorded not in _config_hashes(saved["config"], upgraded["config"]):
        raise ContinualPeftError(
            f"{path} was edited: its configuration differs from the one {checkpoint} records, "
            "so the run's tasks were not made with it. Restore it from a copy of the run; to "
            "change settings, start a new run."
        )
    return upgraded


def _config_hashes(saved: dict, upgraded: dict) -> set[str]:
    """The run-config hashes a checkpoint may record for a config.json: its own, and, for a
    run an older version started and this one resumed, that of the config as this version
    writes it."""
    hashes = {run_config_sha256(saved), run_config_sha256(upgraded)}
    with contextlib.suppress(ContinualPeftError):  # an invalid config is named by its reader
        hashes.add(run_config_sha256(LearnerConfig.from_dict(upgraded, "config.json").to_dict()))
    return hashes


def _every_key(config: LearnerConfig) -> dict:
    """`config.to_dict()` with the keys it leaves out at their defaults put back (a slot budget,
    the re-evaluation schedule), so a difference names both values, never a missing one."""
    data = config.to_dict()
    data.setdefault("max_slots", config.max_slots)
    data.setdefault("evaluation", dataclasses.asdict(config.evaluation))
    return data


def check_same_config(run: Path, saved: LearnerConfig, given: LearnerConfig) -> None:
    """Refuse resuming run `run` (started with `saved`) with another configuration, naming each
    difference; where a run computes (device, threads) may differ."""
    saved_dict, given_dict = _every_key(saved), _every_key(given)
    saved_dict["backbone"] = without_place(saved_dict["backbone"])
    given_dict["backbone"] = without_place(given_dict["backbone"])
    differences = config_differences(saved_dict, given_dict)
    if differences:
        raise ContinualPeftError(
            f"{run} was started with another configuration ({'; '.join(differences)}). A run "
            "resumes with its own configuration: leave out the options that differ, or start a "
            "new run."
        )
