"""The engine: `ContinualLearner` learns tasks one after another and reports after each.

learner = ContinualLearner(module="lora", strategy="per_task")
for task in stream.tasks:
    learner.learn(task)
learner.predict(["some text"], task="agnews")
learner.report            # accuracy matrix, metrics, per-task records
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from continual_peft.backbones.placement import dtype_name, set_threads
from continual_peft.backbones.text import DEFAULT_BACKBONE, Backbone
from continual_peft.config import BackboneConfig, LearnerConfig, TrainConfig
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import Heads
from continual_peft.engine.inference import (
    frozen_features,
    predict_rows,
    routed_predict,
    routing_table,
)
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.progress import meter
from continual_peft.engine.report import learner_report
from continual_peft.engine.rollback import Snapshot
from continual_peft.engine.training import TrainResult, train_task
from continual_peft.errors import ContinualPeftError
from continual_peft.reports.run import console_report
from continual_peft.routers import ROUTERS, Router, build_router
from continual_peft.store.checkpoint import save_learner, set_status, task_digest, write_checkpoint
from continual_peft.store.rundir import RunDir
from continual_peft.strategies import build_strategy
from continual_peft.tasks.task import Task


def record_backbone(config: LearnerConfig, backbone: Backbone) -> None:
    """Set `config.backbone` to what `backbone` really is, as config.json records it: its name
    ("" = the bundled default; a local folder by its absolute path), the max_length it really
    cuts at, and the dtype it really computes in ("auto" means bfloat16 on one machine, float32
    on another: a resumed or reloaded run keeps it)."""
    config.backbone.name = "" if backbone.name == DEFAULT_BACKBONE else backbone.name
    config.backbone.max_length = backbone.max_length
    config.backbone.dtype = dtype_name(backbone.dtype)


# The loader `ContinualLearner.load` calls: `continual_peft.engine.loading.load_learner`, which builds on
# this module and registers itself when imported (the package imports it), so this module does
# not import it back.
LOADER: list[Callable[..., ContinualLearner]] = []


@dataclass
class LearnedTask:
    """A learned task as the learner keeps it: its data, place in the order, slot, and encoded
    test inputs (with their frozen features once computed)."""

    task: Task
    index: int  # position in learning order: the router's name for the task
    slot: int
    test_items: list
    test_features: torch.Tensor | None = None  # frozen features, computed once (routed runs)
    has_data: bool = True  # False when loaded without the task's data: it cannot be evaluated


@dataclass
class TaskSession:
    """A task between `begin_task` and `end_task`: what its training may change."""

    task: Task
    slot: int
    head: nn.Linear
    params: list[nn.Parameter]  # the trainable slot's and the head's
    train_items: list  # encoded training inputs
    truncated: int  # inputs cut to max_length, train and test
    adjust_loss: Callable[[torch.Tensor], torch.Tensor]  # the strategy's `loss` hook


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
            A `RunDir` already opened (e.g. to resume a run) is used as it is.
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
        run_dir: str | Path | RunDir | None = None,
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
        self.threads = set_threads(config.backbone.threads)  # what it says: for the log
        self.strategy = build_strategy(config.strategy, config.strategy_options)
        if not isinstance(backbone, Backbone):
            name = backbone or config.backbone.name or None
            backbone = Backbone.from_pretrained(
                name, config.backbone.max_length, config.backbone.device or None,
                config.backbone.dtype,
            )  # fmt: skip
        record_backbone(config, backbone)
        self.config = config
        self.backbone = backbone
        kinds = {config.module, *config.task_modules.values()}
        self.bank = ModuleBank(
            backbone, config.module, configs={k: config.kind_config(k) for k in kinds}
        )
        self.heads = Heads(backbone.hidden_size, backbone.placement)
        self.router = self._make_router(config)
        self.monitor = ForgettingMonitor(
            ("oracle",) if self.router is None else ("oracle", "routed")
        )
        self.learned: dict[str, LearnedTask] = {}
        self.records: list[dict] = []
        self.stream = stream
        self.status = "running"
        self.baseline: dict | None = None
        self.planned_baseline: str | None = None  # the strategy a runner runs beside this one
        self.console = console
        self.stream_plan: dict | None = None  # the whole stream's names and data hashes, if known
        self.saved_files: dict[str, str] = {}  # what the last checkpoint names: path -> sha256
        self._digests: dict[str, str] = {}  # task name -> data hash
        self.run_dir = run_dir if isinstance(run_dir, RunDir) or run_dir is None else None
        if run_dir is not None and self.run_dir is None:
            self.run_dir = RunDir(run_dir)
            self.run_dir.save_config({"config": config.to_dict(), "backbone": self.fingerprint()})

    def task_seed(self, task: Task, purpose: str) -> int:
        """A seed for one task and purpose that does not depend on task order."""
        return zlib.crc32(f"{self.config.seed}/{task.name}/{purpose}".encode())

    def fingerprint(self) -> dict[str, str]:
        return {"name": self.backbone.name, **self.backbone.fingerprint()}

    def task_digest(self, task: str) -> str:
        """A hash of a learned task's data (names the data in checkpoints; checked on resume)."""
        if task not in self._digests:
            self._digests[task] = task_digest(self.learned[task].task)
        return self._digests[task]

    def save(self, path: str | Path) -> Path:
        """Write every learned task into a new folder, as a run directory's checkpoint.

        `ContinualLearner.load(path)` gives back a learner with the same predictions, which can
        keep learning. Task data is not copied: only slots, heads, router and strategy state.

        Args:
            path: A folder that does not hold a run yet; created if missing.
        """
        if len(self.records) != len(self.learned):
            raise ContinualPeftError("cannot save while a task is being learned.")
        return save_learner(self, RunDir(path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        backbone: Backbone | None = None,
        tasks: list[Task] | None = None,
        console: Console | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> ContinualLearner:
        """A learner from a folder written by `save` or a run directory (its last checkpoint).

        Args:
            path: The folder.
            backbone: Use this backbone instead of loading the one the folder names; it must
                be the same model (its fingerprint is checked).
            tasks: The learned tasks with their data (any extra are ignored), to keep learning:
                a new task re-evaluates every earlier one on its test set. Without them the
                learner predicts, but `learn` refuses.
            console: Where tables and progress go.
            device: Where to load it; None: CUDA when present, else the CPU.
            dtype: The frozen weights' dtype; None: the one the run computed in.
        """
        return LOADER[0](path, backbone, tasks=tasks, console=console, device=device, dtype=dtype)

    def learn(self, task: Task) -> dict:
        """Allocate a slot, train it and a new head, freeze, evaluate every task, report.

        Returns:
            The task's record (slot, sizes, times, loss, accuracy row).
        """
        with self._undone_on_failure():
            session = self.begin_task(task)
            with self.use_task(task.name):
                result = train_task(
                    self.backbone, session.head, session.params, session.train_items,
                    task.train_labels, self.config.train, seed=self.task_seed(task, "train"),
                    adjust_loss=session.adjust_loss,
                    description=f"task {len(self.learned)} {task.name}",
                )  # fmt: skip
            return self.end_task(session, result)

    @contextlib.contextmanager
    def _undone_on_failure(self) -> Iterator[None]:
        """A task that fails before its checkpoint is written (an error, a diverged loss,
        Ctrl-C) leaves the learner exactly as it was before the task: slots, the shared slot's
        values, heads, router, strategy state and matrices, so it can be learned again."""
        before = Snapshot.take(self)
        try:
            yield
        except BaseException:
            if self.saved_files is before.saved_files:  # no new checkpoint names the task
                before.restore(self)
            raise

    def begin_task(self, task: Task) -> TaskSession:
        """The first half of `learn`: slot, head and the "before" accuracies of a new task.

        For training loops other than ours (e.g. Avalanche's): train `session.params` on the
        task under `use_task(task.name)` with `session.adjust_loss` applied to each batch's
        loss, then call `end_task`.
        """
        if task.name in self.learned:
            raise ContinualPeftError(
                f"task {task.name!r} was already learned; task names must be unique."
            )
        missing = [name for name, state in self.learned.items() if not state.has_data]
        if missing:
            raise ContinualPeftError(
                f"this learner was loaded without the data of task(s) {missing}, which a new "
                "task must re-evaluate: pass them as ContinualLearner.load(..., tasks=[...])."
            )
        self.strategy.before_task(self, task)
        slot = self.strategy.allocate(self, task)
        head = self.heads.add(task.name, len(task.labels), seed=self.task_seed(task, "head"))
        train_enc = self.backbone.encode(task.train_inputs, f"task {task.name!r}: train input")
        test_enc = self.backbone.encode(task.test_inputs, f"task {task.name!r}: test input")
        state = LearnedTask(task, len(self.learned), slot, test_enc.items)
        self.learned[task.name] = state
        where = f"task {len(self.learned)} {task.name}: evaluating before training"
        with self._evaluating(), meter(where, 2 * len(state.test_items)):
            initial = self._accuracy(state, base_only=True)
            before = self._accuracy(state)
        # the router cannot know a task before it is trained: no routed "before" value
        self.monitor.before_task(initial, {"oracle": before, "routed": float("nan")})
        return TaskSession(
            task=task,
            slot=slot,
            head=head,
            params=self.bank.trainable_parameters() + list(head.parameters()),
            train_items=train_enc.items,
            truncated=train_enc.truncated + test_enc.truncated,
            adjust_loss=lambda loss: self.strategy.loss(self, task, loss),
        )

    def end_task(self, session: TaskSession, result: TrainResult) -> dict:
        """The second half of `learn`: freeze, evaluate every task, checkpoint and report."""
        task, slot = session.task, session.slot
        strategy_facts = self.strategy.after_task(self, task)
        self.heads.freeze(task.name)
        start = time.perf_counter()
        router_items = session.train_items
        if task.router_inputs:
            where = f"task {task.name!r}: router input"
            router_items = self.backbone.encode(task.router_inputs, where).items
        where = f"task {len(self.learned)} {task.name}: re-evaluating {len(self.learned)} task(s)"
        with self._evaluating(), meter(where, self._evaluation_rows(router_items)):
            self._evaluate(router_items)
        record = {
            "name": task.name, "slot": slot, "module": self.bank.slot_kinds[slot],
            "labels": task.labels, "train_examples": len(task.train_inputs),
            "test_examples": len(task.test_inputs),
            "trainable_parameters": sum(p.numel() for p in session.params),
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "train_steps": result.steps, "final_train_loss": result.final_loss,
            "truncated_inputs": session.truncated,
        }  # fmt: skip
        if result.loss_curve is not None:
            record["loss_curve"] = result.loss_curve
        if strategy_facts:
            record["strategy"] = strategy_facts
        self.records.append(record)
        self._checkpoint(task, slot)
        return record

    def use_task(self, task: str) -> contextlib.AbstractContextManager[None]:
        """Every row through `task`'s slots and weights (the strategy's `routing`): how a
        task's rows are trained and evaluated."""
        slots, weights = self.strategy.routing(self, task)
        return self.bank.use_slots(slots, weights)

    def _routing_table(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's routing (the strategy's) as one padded row; see `routing_table`."""
        return routing_table([self.strategy.routing(self, task) for task in tasks])

    def _rows_routing(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, m) slots and weights for rows whose tasks are given (oracle routing)."""
        names = [self._learned(t).task.name for t in dict.fromkeys(tasks)]  # unknown: refused
        slots, weights = self._routing_table(names)
        rows = torch.tensor([names.index(t) for t in tasks], dtype=torch.long, device="cpu")
        return slots[rows], weights[rows]

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Inference mode (no dropout) for measurements, whatever loop is training; the mode
        the backbone was in comes back afterwards."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            yield
        finally:
            self.backbone.train(was_training)

    def finish(self, status: str = "finished") -> None:
        """Mark the run `finished` (or `failed`, `interrupted`), write the final report and
        release the run directory; an unfinished run can be resumed from its last task."""
        self.status = status
        self._write_report()
        if self.run_dir:
            set_status(self.run_dir.path, status)
            self.close()

    def __enter__(self) -> ContinualLearner:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        """`with ContinualLearner(...) as learner:` ends the run on leaving the block: finished,
        or `interrupted` (Ctrl-C) or `failed` (an error, which propagates)."""
        if kind is None:
            self.finish()
        else:
            self.finish("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")

    def close(self) -> None:
        """Stop writing the run directory and release its lock (also done at exit)."""
        if self.run_dir:
            self.run_dir.close()

    def _checkpoint(self, task: Task, slot: int) -> None:
        if self.run_dir:
            write_checkpoint(self.run_dir, self, [task.name])
        self._write_report()
        if self.console:
            self.console.print(console_report(self.report))

    def _write_report(self) -> None:
        if self.run_dir:
            self.run_dir.save_report(self.report)

    def _make_router(self, config: LearnerConfig) -> Router | None:
        if config.router == "oracle":
            return None  # the task is given: no router state at all
        return build_router(config.router, **config.router_options).to(self.backbone.device)

    def _features(self, items: list) -> torch.Tensor:
        batch = self.config.train.eval_batch_size
        return frozen_features(self.backbone, self.bank, items, batch)

    def features(self, inputs: list) -> torch.Tensor:
        """(N, d) frozen features: the bare backbone's pooled states, all that routers see."""
        return self._features(self.backbone.encode(list(inputs)).items)

    def routed_accuracy(self, router: Router) -> tuple[list[float], list[float]]:
        """Per learned task: accuracy and routing accuracy on its test set under `router`.

        The router must already know every learned task (in learning order); this learner's own
        router is left untouched.
        """
        own, self.router = self.router, router
        try:
            results = [self._routed_scores(state) for state in self.learned.values()]
        finally:
            self.router = own
        return [r[0] for r in results], [r[1] for r in results]

    def _evaluation_rows(self, router_items: list) -> int:
        """Rows `_evaluate` runs through the backbone (what its progress counts)."""
        tests = [len(state.test_items) for state in self.learned.values()]
        if self.router is None:
            return sum(tests)
        uncached = sum(len(s.test_items) for s in self.learned.values() if s.test_features is None)
        return 2 * sum(tests) + len(router_items) + uncached

    def _evaluate(self, router_items: list) -> None:
        """Row i of every matrix: oracle accuracy, and with a router routed and routing accuracy."""
        states = list(self.learned.values())
        oracle = [self._accuracy(s) for s in states]
        if self.router is None:
            self.monitor.after_task({"oracle": oracle})
            return
        self.router.add_task(self._features(router_items))  # statistics only; the features go
        routed, routing = self.routed_accuracy(self.router)
        self.monitor.after_task({"oracle": oracle, "routed": routed}, routing=routing)

    def _routed(
        self, items: list, features: torch.Tensor
    ) -> tuple[list[str | None], torch.Tensor, torch.Tensor]:
        """Routed predictions: label strings (None if rejected), and the router's (B, k)
        task indices and weights."""
        indices, weights = (t.cpu() for t in self.router.route(features))  # one copy per set
        order = list(self.learned.values())
        # each of a row's k tasks brings its own routing (m slots): k·m entries per row
        table_slots, table_weights = self._routing_table([s.task.name for s in order])
        safe, chosen = indices.clamp(min=0), (indices >= 0)[:, :, None]
        slots = torch.where(chosen, table_slots[safe], -1).flatten(1)  # (B, k·m)
        mixed = (weights[:, :, None] * table_weights[safe]).flatten(1)  # (B, k·m)
        top = indices[:, 0].tolist()
        heads = [order[t].task.name if t >= 0 else None for t in top]
        predictions = routed_predict(
            self.backbone, self.bank, self.heads, items, slots, mixed, heads,
            self.config.train.eval_batch_size,
        )  # fmt: skip
        labels = [
            None if p is None else order[t].task.labels[p]
            for t, p in zip(top, predictions, strict=True)
        ]
        return labels, indices, weights

    def _routed_scores(self, state: LearnedTask) -> tuple[float, float]:
        """(routed accuracy, routing accuracy) on a task's test set; correct = same label string."""
        if state.test_features is None:
            state.test_features = self._features(state.test_items)
        labels, indices, _ = self._routed(state.test_items, state.test_features)
        truth = [state.task.labels[y] for y in state.task.test_labels]
        accuracy = float(np.mean([a == b for a, b in zip(labels, truth, strict=True)]))
        return accuracy, float((indices[:, 0] == state.index).double().mean())

    def _accuracy(self, state: LearnedTask, base_only: bool = False) -> float:
        """Oracle accuracy on a task's test set (its routing and head; no module if `base_only`)."""
        head = self.heads.heads[state.task.name]
        routing = self.bank.base_only() if base_only else self.use_task(state.task.name)
        with routing:
            preds = predict_rows(
                self.backbone,
                lambda batch, rows: head(self.backbone.embed(batch)),
                state.test_items,
                self.config.train.eval_batch_size,
            )
        return float(np.mean(preds == np.array(state.task.test_labels)))

    def logits(self, inputs: list, tasks: list[str]) -> torch.Tensor:
        """Logits of a batch whose rows may belong to different tasks, in ONE forward pass.

        Args:
            inputs: Texts, or images for an image backbone.
            tasks: The task of each row (oracle routing).

        Returns:
            (B, C_max) logits, -inf past each row's own label count.
        """
        slots, weights = self._rows_routing(list(tasks))
        batch = self.backbone.collate(self.backbone.encode(list(inputs)).items)
        with torch.no_grad(), self.bank.route(slots, weights):
            return self.heads.logits(self.backbone.embed(batch), list(tasks)).float()

    def predict(self, inputs: list, task: str | list[str] | None = None) -> list[str | None]:
        """Predicted label strings, all rows in batched routed forwards.

        Args:
            inputs: Texts, or images for an image backbone.
            task: One task for all rows, one per row, or None to let the router choose per row
                (a row it rejects is predicted as None: no task, no label).
        """
        _check_inputs(inputs)
        if not len(inputs):
            return []
        if task is None:
            return [row["label"] for row in self.predict_details(inputs)]
        tasks = [task] * len(inputs) if isinstance(task, str) else list(task)
        if len(tasks) != len(inputs):
            raise ContinualPeftError(f"got {len(inputs)} inputs but {len(tasks)} task names")
        slots, weights = self._rows_routing(tasks)
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", len(items)):
            predictions = routed_predict(
                self.backbone, self.bank, self.heads, items, slots, weights, tasks,
                self.config.train.eval_batch_size,
            )  # fmt: skip
        return [self._learned(t).task.labels[p] for t, p in zip(tasks, predictions, strict=True)]

    def predict_details(self, inputs: list) -> list[dict]:
        """Router-chosen predictions, one dict per row: `task` and `label` (both None when the
        router rejects the row), `rejected` (bool), the router's best `score` and the `topk`
        tasks with their weights."""
        if self.router is None:
            raise ContinualPeftError(
                "this learner routes by oracle (router 'oracle'): pass task=..., or configure a "
                f"router ({', '.join(n for n in ROUTERS.names() if n != 'oracle')})"
            )
        _check_inputs(inputs)
        if not len(inputs):
            return []
        items = self.backbone.encode(list(inputs)).items
        with meter(f"predicting {len(items)} input(s)", 2 * len(items)):
            features = self._features(items)
            labels, indices, weights = self._routed(items, features)
        scores = self.router.scores(features).cpu()
        names = list(self.learned)
        rows = []
        for i, label in enumerate(labels):
            top = [
                (names[t], round(float(w), 6))
                for t, w in zip(indices[i].tolist(), weights[i].tolist(), strict=True)
                if t >= 0
            ]
            rows.append({
                "task": top[0][0] if top else None,
                "label": label,
                "rejected": label is None,
                "score": float(scores[i].max()),
                "topk": [{"task": t, "weight": w} for t, w in top],
            })  # fmt: skip
        return rows

    def _learned(self, task: str) -> LearnedTask:
        if task not in self.learned:
            raise ContinualPeftError(f"unknown task {task!r}; learned tasks: {list(self.learned)}")
        return self.learned[task]

    @property
    def report(self) -> dict:
        """The report as a JSON-ready dict (schema version 1)."""
        return learner_report(self)


def _check_inputs(inputs: object) -> None:
    """A list of inputs, not one bare text (which would be read character by character)."""
    if isinstance(inputs, str | bytes):
        raise ContinualPeftError(
            f"inputs must be a list of texts (or images), got one {type(inputs).__name__}: "
            f"wrap it in a list, e.g. predict([{inputs[:20]!r}])"
        )
