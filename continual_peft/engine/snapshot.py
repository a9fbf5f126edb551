"""A learner's state as the plain values the store writes (`store.checkpoint.Snapshot`), and
`learner.save` (every task at once into a new folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import Heads
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.state import LearnedTask
from continual_peft.reports.run import write_reports
from continual_peft.routers import Router, router_state
from continual_peft.store.checkpoint import Snapshot, TaskFiles, write_checkpoint
from continual_peft.store.digests import config_sha256, run_config_sha256
from continual_peft.store.rundir import RunDir


class Snapshotted(Protocol):
    """What a checkpoint holds of the learner (`ContinualLearner` is one)."""

    backbone: Backbone
    bank: ModuleBank
    heads: Heads
    config: LearnerConfig
    strategy: Any  # strategies.Strategy: its state, and each task's routing
    router: Router | None
    monitor: ForgettingMonitor
    learned: dict[str, LearnedTask]
    records: list[dict]
    status: str
    stream: str
    stream_plan: dict | None
    planned_baseline: str | None
    saved_files: dict[str, str]
    report: dict

    def fingerprint(self) -> dict[str, str]: ...

    def task_digest(self, task: str) -> str: ...


def snapshot(learner: Snapshotted, names: list[str]) -> Snapshot:
    """The learner's state, with the files of tasks `names` (the newest last), as the plain
    values the store writes."""
    owner = {state.slot: name for name, state in learner.learned.items()}  # last task per slot
    config, bank = learner.config.to_dict(), learner.bank
    tasks = [
        TaskFiles(n, dict(learner.heads.heads[n].state_dict()), learner.records[s.index],
                  bank.slot_state(s.slot) if owner[s.slot] == n else None)
        for n, s in ((n, learner.learned[n]) for n in names)
    ]  # fmt: skip
    routing = {
        n: learner.strategy.routing(learner, n) for n in learner.learned
    }  # what exports redo
    state = {
        "status": learner.status, "config_sha256": config_sha256(config),
        "run_config_sha256": run_config_sha256(config), "backbone": learner.fingerprint(),
        "stream": learner.stream, "stream_plan": learner.stream_plan,
        "baseline": learner.planned_baseline,  # the strategy run beside it, if any
        "tasks": [
            {"name": n, "slot": s.slot, "data_sha256": learner.task_digest(n),
             "routing": {"slots": routing[n][0], "weights": routing[n][1]}}
            for n, s in learner.learned.items()
        ],
        "records": learner.records, "monitor": learner.monitor.state(),
    }  # fmt: skip
    return Snapshot(
        tasks, list(learner.learned), [owner[slot] for slot in range(bank.num_slots)],
        list(bank.slot_kinds), bank.num_slots - 1 if bank.has_trainable else None,
        router_state(learner.router) if learner.router is not None else None,
        learner.strategy.state(), state, dict(learner.saved_files),
    )  # fmt: skip


def save_learner(learner: Snapshotted, run: RunDir) -> Path:
    """Config, every task's files, checkpoint and report into a new run directory."""
    try:
        run.save_config({"config": learner.config.to_dict(), "backbone": learner.fingerprint()})
        if learner.learned:
            shot = snapshot(learner, list(learner.learned))
            shot.saved_files = {}  # a new folder: every file is written
            write_checkpoint(run, shot)
        write_reports(learner.report, run.path)
    finally:
        run.close()
    return run.path
