"""The engine: `ContinualLearner` learns tasks one after another and reports after each.

learner = ContinualLearner(module="lora", strategy="per_task")
for task in stream.tasks:
    learner.learn(task)
learner.predict(["some text"], task="agnews")
learner.report            # accuracy matrix, metrics, per-task records
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from continual_peft.backbone import DEFAULT_BACKBONE, Backbone
from continual_peft.bank import ModuleBank
from continual_peft.config import BackboneConfig, LearnerConfig, TrainConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.heads import Heads
from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.monitor import ForgettingMonitor
from continual_peft.reports import console_report
from continual_peft.rundir import RunDir
from continual_peft.strategies import STRATEGIES
from continual_peft.tasks import Task
from continual_peft.training import predict_rows, train_task

SCHEMA_VERSION = 1
VERSION = "0.1.0"


@dataclass
class _Learned:
    task: Task
    slot: int
    test_ids: list[list[int]]


class ContinualLearner:
    """Learns a stream of tasks on a frozen backbone, one module slot and head per task.

    Args:
        backbone: A `Backbone`, a model folder/name, or None for the bundled all-MiniLM-L6-v2.
        module: Module kind for every task ("lora", "adapter", "prompt", "prefix").
        strategy: Registered strategy ("per_task", "seq").
        module_config: That kind's config (e.g. `LoRAConfig(r=4)`); its defaults when None.
        train: Training settings.
        seed: Seeds every random choice; same seed and machine give the same numbers.
        max_length: Longest input in tokens (when `backbone` is not already built).
        config: A full `LearnerConfig`; overrides the arguments above.
        run_dir: Folder to write checkpoints and reports to after every task; none when None.
        stream: Stream name, for reports.
        console: Where tables and progress go; None prints nothing.
    """

    def __init__(
        self,
        backbone: Backbone | str | None = None,
        module: str = "lora",
        strategy: str = "per_task",
        module_config: object | None = None,
        train: TrainConfig | None = None,
        seed: int = 0,
        max_length: int = 128,
        config: LearnerConfig | None = None,
        run_dir: str | Path | None = None,
        stream: str = "custom",
        console: Console | None = None,
    ) -> None:
        if config is None:
            config = LearnerConfig(
                strategy=strategy,
                module=module,
                seed=seed,
                modules={module: module_config} if module_config is not None else {},
                train=train or TrainConfig(),
                backbone=BackboneConfig(max_length=max_length),
            )
        config.validate()
        self.strategy = STRATEGIES.get(config.strategy)()
        if isinstance(backbone, Backbone | str):
            # config.json must name the backbone actually used ("" = the bundled default)
            name = backbone if isinstance(backbone, str) else backbone.name
            config.backbone.name = "" if name == DEFAULT_BACKBONE else name
        if not isinstance(backbone, Backbone):
            name = backbone or config.backbone.name or None
            backbone = Backbone.from_pretrained(
                name, config.backbone.max_length, config.backbone.device or None
            )
        self.config = config
        self.backbone = backbone
        kinds = {config.module, *config.task_modules.values()}
        self.bank = ModuleBank(
            backbone, config.module, configs={k: config.kind_config(k) for k in kinds}
        )
        self.heads = Heads(backbone.hidden_size).to(backbone.device)
        self.monitor = ForgettingMonitor()
        self.learned: dict[str, _Learned] = {}
        self.records: list[dict] = []
        self.stream = stream
        self.status = "running"
        self.baseline: dict | None = None
        self.console = console
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        if self.run_dir:
            self.run_dir.save_config({"config": config.to_dict(), "backbone": self.fingerprint()})

    def task_seed(self, task: Task, purpose: str) -> int:
        """A seed for one task and purpose that does not depend on task order."""
        return zlib.crc32(f"{self.config.seed}/{task.name}/{purpose}".encode())

    def fingerprint(self) -> dict[str, str]:
        return {"name": self.backbone.name, **self.backbone.fingerprint()}

    def learn(self, task: Task) -> dict:
        """Allocate a slot, train it and a new head, freeze, evaluate every task, report.

        Returns:
            The task's record (slot, sizes, times, loss, accuracy row).
        """
        if task.name in self.learned:
            raise ContinualPeftError(
                f"task {task.name!r} was already learned; task names must be unique."
            )
        self.strategy.before_task(self, task)
        slot = self.strategy.allocate(self, task)
        head = self.heads.add(task.name, len(task.labels), seed=self.task_seed(task, "head"))
        train_enc = self.backbone.tokenize(task.train_texts)
        test_enc = self.backbone.tokenize(task.test_texts)
        state = self.learned[task.name] = _Learned(task, slot, test_enc.input_ids)
        initial = self._accuracy(state, base_only=True)
        self.monitor.before_task(initial, {"oracle": self._accuracy(state)})
        params = self.bank.trainable_parameters() + list(head.parameters())
        with self.bank.use_slot(slot):
            result = train_task(
                self.backbone, head, params, train_enc.input_ids, task.train_labels,
                self.config.train, seed=self.task_seed(task, "train"),
                adjust_loss=lambda loss: self.strategy.loss(self, task, loss),
                description=f"task {len(self.learned)} {task.name}",
            )  # fmt: skip
        self.strategy.after_task(self, task)
        self.heads.freeze(task.name)
        start = time.perf_counter()
        self.monitor.after_task({"oracle": [self._accuracy(s) for s in self.learned.values()]})
        record = {
            "name": task.name, "slot": slot, "module": self.bank.slot_kinds[slot],
            "labels": task.labels, "train_examples": len(task.train_texts),
            "test_examples": len(task.test_texts),
            "trainable_parameters": sum(p.numel() for p in params),
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "train_steps": result.steps, "final_train_loss": result.final_loss,
            "truncated_inputs": train_enc.truncated + test_enc.truncated,
        }  # fmt: skip
        self.records.append(record)
        self._checkpoint(task, slot)
        return record

    def finish(self, status: str = "finished") -> None:
        """Mark the run `finished` (or `failed`) and write the final report."""
        self.status = status
        self._write_report()

    def _checkpoint(self, task: Task, slot: int) -> None:
        if self.run_dir:
            head = dict(self.heads.heads[task.name].state_dict())
            self.run_dir.save_task(task.name, self.bank.slot_state(slot), head, self.records[-1])
        self._write_report()
        if self.console:
            self.console.print(console_report(self.report))

    def _write_report(self) -> None:
        if self.run_dir:
            self.run_dir.save_report(self.report)

    def _accuracy(self, state: _Learned, base_only: bool = False) -> float:
        """Oracle accuracy on a task's test set (its slot and head; no module if `base_only`)."""
        head = self.heads.heads[state.task.name]
        routing = self.bank.base_only() if base_only else self.bank.use_slot(state.slot)
        with routing:
            preds = predict_rows(
                self.backbone,
                lambda batch, rows: head(self.backbone.embed(batch)),
                state.test_ids,
                self.config.train.eval_batch_size,
            )
        return float(np.mean(preds == np.array(state.task.test_labels)))

    def logits(self, texts: list[str], tasks: list[str]) -> torch.Tensor:
        """Logits of a batch whose rows may belong to different tasks, in ONE forward pass.

        Args:
            texts: The inputs.
            tasks: The task of each row (oracle routing).

        Returns:
            (B, C_max) logits, -inf past each row's own label count.
        """
        slots = torch.tensor([self._learned(t).slot for t in tasks], device=self.backbone.device)
        batch = self.backbone.collate(self.backbone.tokenize(list(texts)).input_ids)
        with torch.no_grad(), self.bank.route(slots), self.backbone.autocast():
            return self.heads.logits(self.backbone.embed(batch), list(tasks)).float()

    def predict(self, texts: list[str], task: str | list[str]) -> list[str]:
        """Predicted label strings; `task` names one task for all rows or one per row."""
        tasks = [task] * len(texts) if isinstance(task, str) else list(task)
        if len(tasks) != len(texts):
            raise ContinualPeftError(f"got {len(texts)} texts but {len(tasks)} task names")
        input_ids = self.backbone.tokenize(list(texts)).input_ids
        slots = torch.tensor([self._learned(t).slot for t in tasks], device=self.backbone.device)

        def score(batch: dict[str, torch.Tensor], rows: np.ndarray) -> torch.Tensor:
            with self.bank.route(slots[torch.as_tensor(rows, device=slots.device)]):
                return self.heads.logits(self.backbone.embed(batch), [tasks[i] for i in rows])

        preds = predict_rows(self.backbone, score, input_ids, self.config.train.eval_batch_size)
        return [self._learned(t).task.labels[p] for t, p in zip(tasks, preds, strict=True)]

    def _learned(self, task: str) -> _Learned:
        if task not in self.learned:
            raise ContinualPeftError(f"unknown task {task!r}; learned tasks: {list(self.learned)}")
        return self.learned[task]

    @property
    def report(self) -> dict:
        """The report as a JSON-ready dict (schema version 1)."""
        matrices = {m: _nan_to_none(self.monitor.matrix(m)) for m in self.monitor.modes}
        metrics = {m: self.monitor.metrics(m) for m in self.monitor.modes} if self.records else {}
        return {
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": {"name": "continual-peft", "version": VERSION},
            "stream": self.stream,
            "strategy": self.config.strategy,
            "config": {**self.config.to_dict(), "backbone_fingerprint": self.fingerprint()},
            "task_names": [r["name"] for r in self.records],
            "tasks": self.records,
            "accuracy_matrix": matrices,
            "initial_accuracy": self.monitor.initial[: len(self.records)],
            "metrics": metrics,
            "metric_definitions": METRIC_DEFINITIONS,
            "baseline": self.baseline,
        }


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]
