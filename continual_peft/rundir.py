"""The run directory: everything one run writes, each file written atomically.

runs/<YYYYmmdd-HHMMSS>-<stream>/
    config.json                 the full configuration and the backbone's fingerprint
    report.json                 schema-versioned report, rewritten after every task
    report.md, accuracy_matrix.csv, accuracy_matrix.png
    tasks/<task>/module.safetensors   the task's slot after its training
    tasks/<task>/head.safetensors     the task's head
    tasks/<task>/task.json            labels, slot index, training record
    router/router.safetensors, router/router.json   router statistics (task-agnostic runs)
    strategy/strategy.safetensors, strategy/strategy.json   the strategy's state (e.g. a replay
                                buffer, EWC's Fisher), if it keeps any
    baseline-<strategy>/        a baseline run on the same stream (same layout), if asked for
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from continual_peft._io import atomic_save_safetensors, atomic_write_json
from continual_peft._registry import validate_task_name
from continual_peft.errors import ContinualPeftError
from continual_peft.reports import write_reports
from continual_peft.routers import Router, save_router


def new_run_path(base: str | Path = "runs", stream: str = "run") -> Path:
    """A fresh `runs/<time>-<stream>` path that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{stamp}-{stream}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"{stamp}-{stream}-{suffix}"
    return path


def check_free(path: str | Path) -> Path:
    """Refuse a folder that already holds a run, so one run never overwrites another."""
    path = Path(path)
    if (path / "report.json").exists():
        raise ContinualPeftError(
            f"{path} already holds a run (report.json); choose another --out folder."
        )
    return path


class RunDir:
    """Writes one run's files.

    Args:
        path: The folder; created if missing. An existing folder that already holds a report is
            refused, so one run never overwrites another.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = check_free(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ContinualPeftError(f"cannot create run directory {self.path}: {err}") from None

    def save_config(self, config: dict) -> None:
        atomic_write_json(self.path / "config.json", config)

    def save_task(
        self,
        name: str,
        module: dict[str, torch.Tensor],
        head: dict[str, torch.Tensor],
        info: dict,
    ) -> None:
        """A finished task's slot, head and record."""
        folder = self.path / "tasks" / validate_task_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(module, folder / "module.safetensors", {"task": name})
        atomic_save_safetensors(head, folder / "head.safetensors", {"task": name})
        atomic_write_json(folder / "task.json", info)

    def save_router(self, router: Router) -> None:
        save_router(router, self.path / "router")

    def save_strategy(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """The strategy's state after a task; nothing for strategies that keep none. The JSON
        is written last, so a folder whose JSON exists always has its tensors."""
        if not tensors and not meta:
            return
        folder = self.path / "strategy"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, folder / "strategy.safetensors")
        atomic_write_json(folder / "strategy.json", meta)

    def save_report(self, report: dict) -> None:
        write_reports(report, self.path)
