"""Rebuild a learner from a run directory, for prediction: slots, heads and router, no raw data.

Slots are restored in slot order from `tasks/<task>/module.safetensors`; a slot shared by several
tasks (the `seq` strategy) takes the state saved after the last of them. The backbone is the one
named in `config.json` unless one is passed in.
"""

from __future__ import annotations

from pathlib import Path

from continual_peft._io import load_json, load_safetensors
from continual_peft.backbone import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.learner import ContinualLearner, _Learned
from continual_peft.monitor import ForgettingMonitor
from continual_peft.reports import load_report
from continual_peft.routers import load_router
from continual_peft.tasks import Task


def load_learner(run_dir: str | Path, backbone: Backbone | None = None) -> ContinualLearner:
    """A learner holding every finished task of a run, ready for `predict`.

    Args:
        run_dir: The run directory.
        backbone: Use this backbone instead of loading the one the run names.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ContinualPeftError(f"{run}: not a run directory (no config.json).")
    saved = load_json(run / "config.json")
    config = LearnerConfig.from_dict(saved["config"], str(run / "config.json"))
    report = load_report(run)
    learner = ContinualLearner(backbone, config=config, stream=report.get("stream", "?"))
    learner.monitor = ForgettingMonitor.from_report(report)
    records = report.get("tasks") or []
    last_for_slot = {record["slot"]: record for record in records}
    for slot in sorted(last_for_slot):
        record = last_for_slot[slot]
        state = load_safetensors(run / "tasks" / record["name"] / "module.safetensors")
        if learner.bank.load_slot(state, kind=record["module"]) != slot:
            raise ContinualPeftError(f"{run}: slots are not numbered 0..n-1; the run is damaged.")
    for index, record in enumerate(records):
        head = learner.heads.add(record["name"], len(record["labels"]), seed=0)
        head.load_state_dict(load_safetensors(run / "tasks" / record["name"] / "head.safetensors"))
        learner.heads.freeze(record["name"])
        task = Task(record["name"], list(record["labels"]), [], [], [], [])
        learner.learned[record["name"]] = _Learned(task, index, record["slot"], [])
        learner.records.append(record)
    if learner.router is not None:
        learner.router = load_router(run / "router")
    if (run / "strategy" / "strategy.json").is_file():
        learner.strategy.load_state(
            load_safetensors(run / "strategy" / "strategy.safetensors"),
            load_json(run / "strategy" / "strategy.json"),
        )
    return learner
