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
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from continual_peft.backbones.placement import set_threads
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig, TrainConfig
from continual_peft.distributed import from_writer, on_writer, world
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.heads import check_new_task, make_heads
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.prediction import Predictor, evaluating
from continual_peft.engine.progress import meter
from continual_peft.engine.report import learner_report
from continual_peft.engine.rollback import undone_on_failure
from continual_peft.engine.snapshot import save_learner, snapshot
from continual_peft.engine.state import LearnedTask, TaskSession, backbone_for, make_router
from continual_peft.engine.training import TrainResult, train_task
from continual_peft.errors import ContinualPeftError
from continual_peft.reports.run import console_report, write_reports
from continual_peft.routers import ROUTERS, Router
from continual_peft.store.checkpoint import set_status, write_checkpoint
from continual_peft.store.digests import task_digest
from continual_peft.store.rundir import RunDir
from continual_peft.strategies.base import check_config
from continual_peft.tasks.task import Task

# The loader `ContinualLearner.load` calls: `engine.loading.load_learner`, which builds on this
# module and registers itself when imported (the package imports it): not imported back here.
LOADER: list[Callable[..., ContinualLearner]] = []


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
        config = config or LearnerConfig.of(
            strategy, module, module_config, train, seed, max_length
        )
        self.threads = set_threads(config.backbone.threads)  # what it says: for the log
        self.strategy = check_config(config)
        backbone = backbone_for(backbone, config)  # and config.backbone says what it is
        self.config = config
        self.backbone = backbone
        kinds = {config.module, *config.task_modules.values()}
        self.bank = ModuleBank(
            backbone, config.module, configs={k: config.kind_config(k) for k in kinds}
        )
        self.heads = make_heads(backbone, config)
        self.router = make_router(config, self.backbone)
        self.monitor = ForgettingMonitor(
            ("oracle",) if self.router is None else ("oracle", "routed")
        )
        self.learned: dict[str, LearnedTask] = {}
        self.predictor = Predictor(
            backbone, self.bank, self.heads, self.learned,
            lambda task: self.strategy.routing(self, task), config.train,
        )  # fmt: skip
        self.records: list[dict] = []
        self.stream = stream
        self.status = "running"
        self.baseline: dict | None = None
        self.planned_baseline: str | None = None  # the strategy a runner runs beside this one
        self.console = console if world().writer else None  # under torchrun: rank 0 speaks
        self.stream_plan: dict | None = None  # the whole stream's names and data hashes, if known
        self.saved_files: dict[str, str] = {}  # what the last checkpoint names: path -> sha256
        self.run_dir = run_dir if isinstance(run_dir, RunDir) or run_dir is None else None
        if run_dir is not None and self.run_dir is None:  # under torchrun: rank 0 writes
            saved = {"config": config.to_dict(), "backbone": self.fingerprint()}
            self.run_dir = on_writer(lambda: RunDir.create(run_dir, saved))

    def task_seed(self, task: Task, purpose: str) -> int:
        """A seed for one task and purpose that does not depend on task order."""
        return zlib.crc32(f"{self.config.seed}/{task.name}/{purpose}".encode())

    def fingerprint(self) -> dict[str, str]:
        return {"name": self.backbone.name, **self.backbone.fingerprint()}

    def task_digest(self, task: str) -> str:
        """A hash of a learned task's data (names the data in checkpoints; checked on resume)."""
        state = self.learned[task]
        if state.data_sha256 is None:
            state.data_sha256 = task_digest(state.task)
        return state.data_sha256

    def save(self, path: str | Path) -> Path:
        """Write every learned task into a new folder, as a run directory's checkpoint (on rank
        0 under torchrun). `ContinualLearner.load(path)` gives back a learner with the same
        predictions, which can keep learning. Task data is not copied: only slots, heads,
        router and strategy state.

        Args:
            path: A folder that does not hold a run yet; created if missing.
        """
        if len(self.records) != len(self.learned):
            raise ContinualPeftError("cannot save while a task is being learned.")
        return from_writer(on_writer(lambda: save_learner(self, RunDir(path))))

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
        """Learn one task: begin (slot, head, "before" accuracies), train, end (freeze,
        re-evaluate every task, record), checkpoint, report. A failure leaves the learner as
        it was before the task.

        Returns:
            The task's record (slot, sizes, times, loss, accuracy row).
        """
        with undone_on_failure(self):
            session = self.begin_task(task)
            result = self.train(session)
            return self.end_task(session, result)

    def train(self, session: TaskSession) -> TrainResult:
        """Train the session's slot and head on its task (through the task's routing)."""
        task, items = session.task, session.train_items

        def batch_loss(rows) -> torch.Tensor:
            labels = [task.train_labels[i] for i in rows]
            return self.heads.row_loss([items[i] for i in rows], [task.name] * len(rows), labels)

        weights = self.heads.row_weights([task.name] * len(items), task.train_labels)
        with self.use_task(task.name):
            return train_task(
                self.backbone, session.params, len(items), batch_loss, self.config.train,
                seed=self.task_seed(task, "train"), adjust_loss=session.adjust_loss,
                description=f"task {len(self.learned)} {task.name}", row_weights=weights,
            )  # fmt: skip

    def begin_task(self, task: Task) -> TaskSession:
        """The first half of `learn`: slot, head and the "before" accuracies of a new task.

        For training loops other than ours (e.g. Avalanche's): train `session.params` on the
        task under `use_task(task.name)` with `session.adjust_loss` applied to each batch's
        loss, then call `end_task`.
        """
        check_new_task(task, self.learned, self.heads)
        self.strategy.before_task(self, task)
        slot = self.strategy.allocate(self, task)
        head = self.heads.open(task, seed=self.task_seed(task, "head"))
        where = f"task {task.name!r}: %s input"
        train_enc = self.heads.prompt_items(task.name, task.train_inputs, where % "train")
        test_enc = self.heads.prompt_items(task.name, task.test_inputs, where % "test")
        state = LearnedTask(task, len(self.learned), slot, test_enc.items)
        raw_train = self.heads.feature_items(task.train_inputs, where % "train")
        state.raw_items = self.heads.feature_items(task.test_inputs, where % "test")
        self.learned[task.name] = state
        where = f"task {len(self.learned)} {task.name}: evaluating before training"
        with evaluating(self.backbone), meter(where, 2 * len(state.test_items)):
            initial = self.predictor.accuracy(state, base_only=True)
            before = self.predictor.accuracy(state)
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
            raw_items=raw_train,
        )

    def end_task(self, session: TaskSession, result: TrainResult) -> dict:
        """The second half of `learn`: the task's record, then its checkpoint and the report."""
        record = self.evaluate_task(session, result)
        on_writer(lambda: self.checkpoint(session.task) or self.write_report())  # other ranks wait
        if self.console:
            self.console.print(console_report(self.report))
        return record

    def evaluate_task(self, session: TaskSession, result: TrainResult) -> dict:
        """Freeze the task, re-evaluate every task (a new row of each matrix), its record."""
        task, slot = session.task, session.slot
        strategy_facts = self.strategy.after_task(self, task)
        self.heads.freeze(task.name)
        start = time.perf_counter()
        router_items = session.train_items if session.raw_items is None else session.raw_items
        if task.router_inputs and self.router is not None:  # oracle: no router to fit
            where = f"task {task.name!r}: router input"
            router_items = self.backbone.encode(task.router_inputs, where).items
        where = f"task {len(self.learned)} {task.name}: re-evaluating {len(self.learned)} task(s)"
        with (
            evaluating(self.backbone),
            meter(where, self.predictor.evaluation_rows(self.router, router_items)),
        ):
            accuracies, routing = self.predictor.evaluate(self.router, router_items)
        self.monitor.after_task(accuracies, routing=routing)
        record = {
            "name": task.name, "slot": slot, "module": self.bank.slot_kinds[slot],
            "labels": task.labels, "metric": self.heads.metric(task.name),
            "train_examples": len(task.train_inputs),
            "test_examples": len(task.test_inputs),
            "router_examples": len(router_items) if self.router is not None else 0,
            "trainable_parameters": sum(p.numel() for p in session.params),
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "train_steps": result.steps, "final_train_loss": result.final_loss,
            "truncated_inputs": session.truncated,
        }  # fmt: skip
        record |= self.heads.describe(task.name, self.predictor.text_scores)
        if world().size > 1:  # trained under torchrun: its times are those of N processes
            record["processes"] = world().size
        if result.loss_curve is not None:
            record["loss_curve"] = result.loss_curve
        if strategy_facts:
            record["strategy"] = strategy_facts
        self.records.append(record)
        return record

    def use_task(self, task: str) -> contextlib.AbstractContextManager[None]:
        """Every row through `task`'s slots and weights (the strategy's `routing`): how a
        task's rows are trained and evaluated."""
        slots, weights = self.strategy.routing(self, task)
        return self.bank.use_slots(slots, weights)

    def finish(self, status: str = "finished") -> None:
        """Mark the run `finished` (or `failed`, `interrupted`), write the final report and
        release the run directory; an unfinished run can be resumed from its last task."""
        self.status = status
        self.write_report()
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

    def checkpoint(self, task: Task) -> None:
        """After `task`: its files and the new checkpoint, written by the store from a snapshot."""
        if self.run_dir:
            self.saved_files = write_checkpoint(self.run_dir, snapshot(self, [task.name]))

    def write_report(self) -> None:
        """The report into the run directory, if any."""
        if self.run_dir:
            write_reports(self.report, self.run_dir.path)

    def features(self, inputs: list, layers: str | list[int] = "last") -> torch.Tensor:
        """(N, d) frozen features, all routers see: the bare backbone's pooled states of the
        layers of a `layers` setting (`backbones.features`; a router's is `router.layers`)."""
        return self.predictor.features(self.backbone.encode(list(inputs)).items, layers)

    def routed_accuracy(self, router: Router) -> tuple[list[float], list[float]]:
        """Per learned task: accuracy and routing accuracy on its test set under `router`.

        The router must already know every learned task (in learning order); this learner's own
        router is left untouched.
        """
        return self.predictor.routed_accuracy(router)

    def logits(self, inputs: list, tasks: list[str]) -> torch.Tensor:
        """Logits of a batch whose rows may belong to different tasks, in ONE forward pass.

        Args:
            inputs: Texts, or images for an image backbone.
            tasks: The task of each row (oracle routing).

        Returns:
            (B, C_max) logits, -inf past each row's own label count.
        """
        return self.predictor.logits(inputs, tasks)

    def predict(self, inputs: list, task: str | list[str] | None = None) -> list[str | None]:
        """Predicted label strings, all rows in batched routed forwards.

        Args:
            inputs: Texts, or images for an image backbone.
            task: One task for all rows, one per row, or None to let the router choose per row
                (a row it rejects is predicted as None: no task, no label).

        Raises:
            ContinualPeftError: an unknown task, as many task names as inputs, or no router
                when `task` is None.
        """
        _check_inputs(inputs)
        if not len(inputs):
            return []
        if task is None:
            return [row["label"] for row in self.predict_details(inputs)]
        tasks = [task] * len(inputs) if isinstance(task, str) else list(task)
        return self.predictor.predict(inputs, tasks)

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
        return self.predictor.details(self.router, inputs) if len(inputs) else []

    @property
    def report(self) -> dict:
        """The report as a JSON-ready dict (schema version 1)."""
        return learner_report(
            self.monitor, self.records, self.config,
            status=self.status, stream=self.stream, fingerprint=self.fingerprint(),
            baseline=self.baseline, routed=self.router is not None,
        )  # fmt: skip


def _check_inputs(inputs: object) -> None:
    """A list of inputs, not one bare text (which would be read character by character)."""
    if isinstance(inputs, str | bytes):
        raise ContinualPeftError(
            f"inputs must be a list of texts (or images), got one {type(inputs).__name__}: "
            f"wrap it in a list, e.g. predict([{inputs[:20]!r}])"
        )
