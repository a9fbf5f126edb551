"""The engine: `ContinualLearner` learns tasks one after another and reports after each.

learner = ContinualLearner(module="lora", strategy="per_task")
for task in stream.tasks:
    learner.learn(task)
learner.predict(["some text"], task="agnews")
learner.report            # accuracy matrix, metrics, per-task records
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from pathlib import Path

import torch
from rich.console import Console

from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.placement import set_threads
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig, TrainConfig
from continual_peft.distributed import world
from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.budget import Consolidation, make_room, merged_slots_from
from continual_peft.engine.heads import check_new_task, make_heads
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.engine.prediction import FALLBACK_MODE, Predictor, evaluating
from continual_peft.engine.progress import meter
from continual_peft.engine.report import learner_report
from continual_peft.engine.rollback import Undo
from continual_peft.engine.saved_run import read_run
from continual_peft.engine.schedule import reevaluation_record, reevaluation_rows
from continual_peft.engine.state import (
    LearnedTask,
    TaskSession,
    learned_from,
    make_router,
    resolve_backbone,
)
from continual_peft.engine.training import TrainResult, train_task
from continual_peft.errors import ContinualPeftError
from continual_peft.reports.run import console_report, plots_due, write_reports
from continual_peft.routers import ROUTERS, Router, load_router_files, router_parts
from continual_peft.store.checkpoint import (
    Checkpoint,
    RouterParts,
    Routing,
    Snapshot,
    TaskEntry,
    TaskFiles,
    set_status,
    write_checkpoint,
)
from continual_peft.store.digests import config_sha256, run_config_sha256, task_digest
from continual_peft.store.io import load_json, load_safetensors
from continual_peft.store.migration import CURRENT
from continual_peft.store.rundir import RunDir
from continual_peft.strategies.base import NO_SLOT, Strategy, build_strategy, check_config
from continual_peft.tasks.task import Task, check_task


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
        config = check_config(config)  # checked once: a config already checked is trusted
        self.strategy = build_strategy(config.strategy, config.strategy_options)
        # config.backbone as the run records it: a new value, the caller's config is not changed
        backbone, config = resolve_backbone(backbone, config)
        self.config = config
        self.backbone = backbone
        self.strategy.check_backbone(backbone)  # before any run folder is made
        self.bank = ModuleBank(
            backbone, config.module, configs={k: config.kind_config(k) for k in config.part_kinds()}
        )
        self.heads = make_heads(backbone, config)
        self.router = make_router(config, self.backbone)
        self.monitor = ForgettingMonitor(monitor_modes(self.router, self.strategy))
        self.learned: dict[str, LearnedTask] = {}
        # a slot budget (`engine.budget`): the consolidation for the task being learned
        self.consolidation: Consolidation | None = None
        self.predictor = Predictor(
            backbone=backbone,
            bank=self.bank,
            heads=self.heads,
            learned=self.learned,
            routing=lambda task: self.strategy.routing(self, task),
            train=config.train,
            fallback=lambda: self.strategy.fallback(self),
        )
        self.records: list[dict] = []
        self.stream = stream
        self.status = "running"
        self.baseline: dict | None = None  # the baseline run's matrix and metrics, once run
        # scores on the tasks' dev splits after the last task (`evaluation.score_dev`)
        self.dev: dict | None = None
        self.data: dict | None = None  # how the stream's data was read (`Stream.protocol`)
        self.planned_baseline: str | None = None  # the strategy a runner runs beside this one
        self.console = console if world().writer else None  # under torchrun: rank 0 speaks
        self.stream_plan: dict | None = None  # the whole stream's names and data hashes, if known
        self.last_checkpoint: Checkpoint | None = None  # the newest one written or read
        if run_dir is None or isinstance(run_dir, RunDir):
            self.run_dir = run_dir
        else:
            self.run_dir = RunDir.create(run_dir, self.run_config())

    def task_seed(self, task: Task, purpose: str) -> int:
        """A seed for one task and purpose that does not depend on task order."""
        return zlib.crc32(f"{self.config.seed}/{task.name}/{purpose}".encode())

    def fingerprint(self) -> dict[str, str]:
        """The backbone's name and fingerprint (checked when a run is loaded or resumed)."""
        return {"name": self.backbone.name, **self.backbone.fingerprint()}

    def run_config(self) -> dict:
        """What config.json holds: the configuration, the backbone's fingerprint (checked on
        load) and what the backbone is (family, model type, parameters, dtype: for readers)."""
        return {
            "format": CURRENT,
            "config": self.config.to_dict(),
            "backbone": self.fingerprint(),
            "model": self.backbone.describe(),
        }

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
        run = RunDir.create(path, self.run_config())
        try:
            if self.learned:
                state = self.state_dict(list(self.learned), written={})  # a new folder: all
                run.write(lambda: write_checkpoint(run, state))
            report = self.report
            run.write(lambda: write_reports(report, run.path))
        finally:
            run.close()
        return run.path

    @classmethod
    def load(
        cls,
        path: str | Path,
        backbone: Backbone | None = None,
        tasks: list[Task] | None = None,
        console: Console | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
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
            batch_size: Rows per forward pass while predicting; None: the run's
                eval_batch_size.
        """
        tasks = [check_task(task, "load(tasks=...)") for task in tasks or []]
        saved = read_run(path)
        ran = saved.config.backbone
        # where it predicts, not where it ran: the device and threads of this machine
        place = {"device": device or "", "threads": 0, "dtype": dtype or ran.dtype}
        settings = dataclasses.replace(ran, **place)
        train = saved.config.train
        if batch_size is not None:
            train = dataclasses.replace(train, eval_batch_size=batch_size)
        config = dataclasses.replace(saved.config, backbone=settings, train=train)
        learner = cls(backbone, config=config, stream=saved.checkpoint.stream, console=console)
        check_fingerprint(saved.fingerprint, learner.backbone, f"run {saved.folder}")
        learner.load_state_dict(saved.checkpoint, saved.folder, tasks or [])
        return learner

    def learn(self, task: Task) -> dict:
        """Learn one task: begin (slot, head, "before" accuracies), train, end (freeze,
        re-evaluate every task, record), checkpoint, report. A failure leaves the learner as
        it was before the task.

        Returns:
            The task's record (slot, sizes, times, loss, accuracy row).

        Raises:
            ContinualPeftError: `task` is no Task (a task's name, None), or the task cannot be
                learned (named with the reason); the learner is then as it was.
        """
        task = check_task(task, "learn()")
        undo = Undo.take(
            bank=self.bank,
            learned=self.learned,
            records=self.records,
            strategy=self.strategy,
            router=self.router,
            monitor=self.monitor,
            derived=list(self.strategy.derived_slots(self)),
        )
        try:
            session = self.begin_task(task)
            result = self.train(session)
            return self.end_task(session, result)
        except BaseException:
            if not self.checkpointed(task.name):  # a checkpoint that holds it keeps it
                parts = {"bank": self.bank, "heads": self.heads, "learned": self.learned}
                undo.restore_parts(**parts, records=self.records, consolidation=self.consolidation)
                self.strategy, self.router, self.monitor = undo.strategy, undo.router, undo.monitor
                self.consolidation = None
                self.backbone.eval()
            raise

    @property
    def merged_slots(self) -> dict[int, str]:
        """Slot -> the task during whose `learn` a slot budget's consolidation last rewrote it
        (saved as a new file in that task's folder), as the records tell it."""
        return merged_slots_from(self.records)

    def checkpointed(self, task: str) -> bool:
        """Whether the newest checkpoint written or read holds `task`."""
        return self.last_checkpoint is not None and task in self.last_checkpoint.task_names

    def train(self, session: TaskSession) -> TrainResult:
        """Train the session's slot and head on its task (through the task's routing)."""
        task, items = session.task, session.train_items

        def batch_loss(rows) -> torch.Tensor:
            labels = [task.train_labels[i] for i in rows]
            return self.heads.row_loss([items[i] for i in rows], [task.name] * len(rows), labels)

        weights = self.heads.row_weights([task.name] * len(items), task.train_labels)
        with self.use_task(task.name):
            return train_task(
                self.backbone,
                session.params,
                len(items),
                batch_loss,
                self.config.train,
                seed=self.task_seed(task, "train"),
                adjust_loss=session.adjust_loss,
                description=f"task {len(self.learned)} {task.name}",
                row_weights=weights,
            )

    def begin_task(self, task: Task) -> TaskSession:
        """The first half of `learn`: slot, head and the "before" accuracies of a new task.

        For training loops other than ours (e.g. Avalanche's): train `session.params` on the
        task under `use_task(task.name)` with `session.adjust_loss` applied to each batch's
        loss, then call `end_task`.
        """
        self.consolidation = None
        check_new_task(task, self.learned, self.heads)
        self.strategy.before_task(self, task)
        # the head first: a strategy may run the task's rows through it to shape its new slot
        head = self.heads.open(task, seed=self.task_seed(task, "head"))
        # a full slot budget: two slots merge, and the strategy's new slot reopens the freed one
        self.consolidation = make_room(self.bank, self.learned, self.config.max_slots, task.name)
        slot = self.strategy.allocate(self, task)
        where = f"task {task.name!r}: %s input"
        train_enc = self.heads.prompt_items(task.name, task.train_inputs, where % "train")
        test_enc = self.heads.prompt_items(task.name, task.test_inputs, where % "test")
        state = LearnedTask(
            task=task, index=len(self.learned), slot=slot, test_items=test_enc.items
        )
        raw_train = self.heads.feature_items(task.train_inputs, where % "train")
        state.raw_items = self.heads.feature_items(task.test_inputs, where % "test")
        self.learned[task.name] = state
        where = f"task {len(self.learned)} {task.name}: evaluating before training"
        with evaluating(self.backbone), meter(where, 2 * len(state.test_items)):
            initial = self.predictor.accuracy(state, base_only=True)
            before = self.predictor.accuracy(state)
        # the router cannot know a task before it is trained: no routed "before" value
        routed = {mode: float("nan") for mode in self.monitor.modes}
        self.monitor.before_task(initial, routed | {"oracle": before})
        return TaskSession(
            task=task,
            slot=slot,
            head=head,
            params=self.bank.trainable_parameters()
            + self.strategy.parameters(self)
            + list(head.parameters()),
            train_items=train_enc.items,
            truncated=train_enc.truncated + test_enc.truncated,
            adjust_loss=lambda loss: self.strategy.loss(self, task, loss),
            raw_items=raw_train,
        )

    def end_task(self, session: TaskSession, result: TrainResult) -> dict:
        """The second half of `learn`: the task's record, then its checkpoint and the report."""
        record = self.evaluate_task(session, result)
        self.checkpoint(session.task)
        self.write_report()
        if self.console:
            self.console.print(console_report(self.report))
        return record

    def evaluate_task(self, session: TaskSession, result: TrainResult) -> dict:
        """Freeze the task, re-evaluate the tasks the schedule measures (`config.evaluation`; by
        default every task: a new row of each matrix), its record."""
        task, slot = session.task, session.slot
        strategy_facts = self.strategy.after_task(self, task)
        self.heads.freeze(task.name)
        start = time.perf_counter()
        router_items = session.train_items if session.raw_items is None else session.raw_items
        if task.router_inputs and self.router is not None:  # oracle: no router to fit
            where = f"task {task.name!r}: router input"
            router_items = self.backbone.encode(task.router_inputs, where).items
        sizes = {name: len(state.test_items) for name, state in self.learned.items()}
        planned = (self.stream_plan or {}).get("tasks") or []
        rows = reevaluation_rows(
            self.config.evaluation,
            sizes,
            {name: self.task_seed(s.task, "reevaluation") for name, s in self.learned.items()},
            last=bool(planned) and planned[-1] == task.name,  # the final row: every entry, exact
        )
        where = f"task {len(self.learned)} {task.name}: re-evaluating {len(rows)} task(s)"
        with (
            evaluating(self.backbone),
            meter(where, self.predictor.evaluation_rows(self.router, router_items, rows)),
        ):
            accuracies, routing, rejection = self.predictor.evaluate(
                self.router, router_items, rows
            )
        self.monitor.after_task(accuracies, routing=routing, rejection=rejection)
        record = {
            "name": task.name,
            "slot": slot,
            "module": None if slot == NO_SLOT else self.bank.slot_kinds[slot],
            "labels": task.labels,
            "metric": self.heads.metric(task.name),
            "train_examples": len(task.train_inputs),
            "test_examples": len(task.test_inputs),
            "router_examples": len(router_items) if self.router is not None else 0,
            "trainable_parameters": sum(p.numel() for p in session.params),
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "train_steps": result.steps,
            "final_train_loss": result.final_loss,
            "truncated_inputs": session.truncated,
            "reevaluation": reevaluation_record(rows, sizes),
        }
        if task.dev_inputs:
            record["dev_examples"] = len(task.dev_inputs)
        if task.skipped:  # records left out: their label is not one of the task's
            record["skipped_records"] = task.skipped
        if task.sources:
            record["sources"] = dict(task.sources)
        record |= self.heads.describe(task.name, self.predictor.text_scores)
        if world().size > 1:  # trained under torchrun: its times are those of N processes
            record["processes"] = world().size
        if result.loss_curve is not None:
            record["loss_curve"] = result.loss_curve
        if strategy_facts:
            record["strategy"] = strategy_facts
        if self.consolidation is not None:  # a slot budget made room for it (`engine.budget`)
            record["consolidation"] = self.consolidation.record()
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
        if self.run_dir:
            run, report = self.run_dir, self.report

            def final() -> None:
                write_reports(report, run.path)
                set_status(run.path, status)

            # after a failure the other processes may be gone or mid-step: no waiting for them
            run.write(final, together=status == "finished")
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
            run, state = self.run_dir, self.state_dict([task.name])
            self.last_checkpoint = run.write(lambda: write_checkpoint(run, state))

    def state_dict(self, names: list[str], written: dict[str, str] | None = None) -> Snapshot:
        """The learner's state as the plain values a checkpoint holds, with the files of tasks
        `names` (the newest last); `load_state_dict` reads it back.

        Args:
            names: The tasks whose files are written now.
            written: Files already on disk (path -> sha256); None: those of the last
                checkpoint.
        """
        # each slot's last task (tasks with no slot of their own have no module file)
        owner = {s.slot: name for name, s in self.learned.items() if s.slot != NO_SLOT}
        files = {slot: f"tasks/{name}/module.safetensors" for slot, name in owner.items()}
        # a slot a budget's consolidation rewrote: into the folder of the task it made room for
        merged = {slot: f"merged-slot{slot}" for slot in self.merged_slots}
        files |= {
            slot: f"tasks/{self.merged_slots[slot]}/{merged[slot]}.safetensors" for slot in merged
        }
        derived = self.strategy.derived_slots(self)  # into the newest task's folder
        files |= {slot: f"tasks/{names[-1]}/{stem}.safetensors" for slot, stem in derived.items()}
        retired = []
        if written is None:
            written = dict(self.last_checkpoint.files) if self.last_checkpoint else {}
            retired = list(self.last_checkpoint.retired) if self.last_checkpoint else []
        tasks = [
            TaskFiles(
                name=name,
                head=dict(self.heads.heads[name].state_dict()),
                record=self.records[self.learned[name].index],
                module=self.bank.slot_state(slot)
                if owner.get(slot) == name and slot not in merged
                else None,
                derived={
                    **{s: self.bank.slot_state(k) for k, s in derived.items() if name == names[-1]},
                    **{
                        merged[k]: self.bank.slot_state(k)
                        for k, holder in self.merged_slots.items()
                        if holder == name
                    },
                },
            )
            for name, slot in ((n, self.learned[n].slot) for n in names)
        ]
        config = self.config.to_dict()
        header = Checkpoint(
            status=self.status,
            written="",  # set when written
            config_sha256=config_sha256(config),
            run_config_sha256=run_config_sha256(config),
            backbone=self.fingerprint(),
            stream=self.stream,
            stream_plan=self.stream_plan,
            baseline=self.planned_baseline,
            tasks=[
                TaskEntry(
                    name=name,
                    slot=learned.slot,
                    data_sha256=self.task_digest(name),
                    routing=Routing(*self.strategy.routing(self, name)),  # what exports redo
                )
                for name, learned in self.learned.items()
            ],
            records=list(self.records),
            monitor=self.monitor.state(),
            slots=[],  # these four: set when written
            router=None,
            strategy=None,
            files={},
            rng={},
        )
        return Snapshot(
            tasks=tasks,
            slot_files=[files[slot] for slot in range(self.bank.num_slots)],
            slot_kinds=list(self.bank.slot_kinds),
            trainable_slot=self.bank.training_slot,
            router=RouterParts(*router_parts(self.router)) if self.router is not None else None,
            strategy=self.strategy.state(),
            header=header,
            saved_files=written,
            saved_retired=retired,
        )

    def load_state_dict(self, checkpoint: Checkpoint, folder: Path, tasks: list[Task]) -> None:
        """Put a checkpoint of run directory `folder` into this fresh learner (built with the
        run's configuration): slots in slot order, heads, router, strategy state, matrices and
        records. `tasks` (any of the learned ones, with their data) let it keep learning; their
        data hashes must match the recorded ones.

        Raises:
            ContinualPeftError: a task given with other data than the run learned.
        """
        given, device = {task.name: task for task in tasks}, self.backbone.placement.device
        for slot, entry in enumerate(checkpoint.slots):
            tensors = load_safetensors(folder / entry.file, device)
            if self.bank.load_slot(tensors, entry.kind, trainable=entry.trainable) != slot:
                raise ContinualPeftError(f"{folder}: slots are not numbered 0..n-1; it is damaged.")
        self.records = list(checkpoint.records)
        for index, entry in enumerate(checkpoint.tasks):
            record = self.records[index]
            head = load_safetensors(folder / "tasks" / entry.name / "head.safetensors", device)
            self.heads.restore(entry.name, record, head)
            task = given.get(entry.name)
            self.learned[entry.name] = learned_from(entry, index, record, task, self.heads)
        self.monitor = ForgettingMonitor.from_state(checkpoint.monitor)
        if checkpoint.router is not None:
            files = checkpoint.router
            self.router = load_router_files(
                folder / files.tensors,
                folder / files.meta,
                [folder / path for path in files.task_rows],
                self.backbone.device,
            )
        if checkpoint.strategy is not None:
            tensors = load_safetensors(folder / checkpoint.strategy.tensors, device)
            self.strategy.load_state(tensors, load_json(folder / checkpoint.strategy.meta))
        self.last_checkpoint = checkpoint
        self.status = checkpoint.status
        self.stream_plan = checkpoint.stream_plan

    def resume_into(
        self, run_dir: RunDir | None, stream_plan: dict, baseline: str | None = None
    ) -> None:
        """Write `run_dir` (new, or a run this learner was loaded from) while learning the
        stream `stream_plan` describes, with `baseline` run beside it (both recorded in every
        checkpoint)."""
        self.run_dir = run_dir
        self.stream_plan = stream_plan
        self.planned_baseline = baseline
        self.status = "running"

    def finish_baseline(self, strategy: str, report: dict) -> None:
        """The baseline run's matrix and metrics, for this run's report."""
        self.baseline = {
            "strategy": strategy,
            "accuracy_matrix": report["accuracy_matrix"],
            "metrics": report["metrics"],
        }

    def write_report(self) -> None:
        """The report into the run directory, if any (its plots as `reports.run.plots_due`
        says; `finish` always draws them)."""
        if self.run_dir:
            run, report, plots = self.run_dir, self.report, plots_due(len(self.records))
            run.write(lambda: write_reports(report, run.path, plots))

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
            self.monitor,
            self.records,
            self.config,
            status=self.status,
            stream=self.stream,
            fingerprint=self.fingerprint(),
            baseline=self.baseline,
            routed=self.router is not None,
            backbone=self.backbone.describe(),
            dev=self.dev,
            data=self.data,
            rejection=self.router.rejection() if self.router is not None else None,
        )


def _check_inputs(inputs: object) -> None:
    """A list of inputs, not one bare text (which would be read character by character)."""
    if isinstance(inputs, str | bytes):
        raise ContinualPeftError(
            f"inputs must be a list of texts (or images), got one {type(inputs).__name__}: "
            f"wrap it in a list, e.g. predict([{inputs[:20]!r}])"
        )


def monitor_modes(router: Router | None, strategy: Strategy) -> tuple[str, ...]:
    """The accuracy matrices a run keeps: oracle; routed with a router; and route-or-merge's
    column when the strategy falls back on rejected or unsure rows."""
    if router is None:
        return ("oracle",)
    return ("oracle", "routed", FALLBACK_MODE) if strategy.falls_back else ("oracle", "routed")
