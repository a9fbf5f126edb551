"""Rebuild a learner from a run directory (or a `learner.save` folder): to predict, or to resume.

Everything comes from the last `checkpoint.json` (see `store.checkpoint`), whose files are
checked against their sha256 first: slots in slot order (a shared slot from the folder of the
last task that trained it, still trainable if it was), heads, router statistics, strategy state
(replay buffer, EWC Fisher, joint's kept examples, ...), accuracy matrices and task records.
Task data is not in a run directory: to keep learning, pass the tasks again (`tasks=`); their
data hashes must match the ones recorded. The backbone is the one named in `config.json` unless
one is passed in, and must have the recorded fingerprint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from rich.console import Console

from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.placement import Placement
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.distributed import from_writer, on_writer
from continual_peft.engine.learner import LOADER, ContinualLearner, LearnedTask
from continual_peft.engine.monitor import ForgettingMonitor
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.routers import load_router
from continual_peft.store.checkpoint import CHECKPOINT_FILE, baseline_folders, read_checkpoint
from continual_peft.store.digests import (
    config_differences,
    run_config_sha256,
    stream_plan,
    task_digest,
    without_place,
)
from continual_peft.store.io import load_json, load_safetensors
from continual_peft.store.repair import resume_point
from continual_peft.store.rng import restore_rng
from continual_peft.store.rundir import RunDir
from continual_peft.tasks.streams import Stream
from continual_peft.tasks.task import Task


def load_learner(
    run_dir: str | Path,
    backbone: Backbone | None = None,
    tasks: list[Task] | None = None,
    console: Console | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> ContinualLearner:
    """A learner holding every finished task of a run, ready for `predict` (and, given the
    tasks' data, for `learn`). Nothing is written and no lock is taken.

    Args:
        run_dir: A run directory or a folder written by `ContinualLearner.save`.
        backbone: Use this backbone instead of loading the one the run names.
        tasks: The learned tasks with their data, to keep learning (see the module docstring).
        console: Where tables and progress go.
        device: Where to load it; None: CUDA when present, else the CPU. The device the run
            was trained on does not matter (a run made on a GPU loads on a CPU).
        dtype: The frozen weights' dtype to predict in; None: the one the run computed in
            (e.g. bfloat16 for a run made on a GPU, which is slow on most CPUs: pass
            "float32" there; predictions may then differ by bfloat16's rounding).
    """
    run = Path(run_dir)
    saved = _saved_config(run)
    checkpoint = read_checkpoint(run)
    config = LearnerConfig.from_dict(saved["config"], str(run / "config.json"))
    config.backbone.device = "" if device is None else device
    config.backbone.threads = 0  # where the run trained is not where it predicts: auto here
    if dtype is not None:
        config.backbone.dtype = dtype
    learner = ContinualLearner(
        backbone, config=config, stream=checkpoint["stream"], console=console
    )
    _check_backbone(saved, learner, run)
    _restore(learner, run, checkpoint, {task.name: task for task in tasks or []})
    return learner


LOADER.append(load_learner)  # what ContinualLearner.load calls


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run directory, and each baseline run inside it, holds a finished run whose
    files are all there and unchanged (read without the lock). A finished run that lost a file
    is not finished: resuming it re-trains what is lost (see `continual_peft.store.repair`)."""
    run = Path(run_dir)
    try:
        if read_checkpoint(run).get("status") != "finished":
            return False
    except ContinualPeftError:
        return False  # no checkpoint yet, or a damaged run: `open_run` names or repairs it
    _saved_config(run)  # a finished run whose config.json is damaged is named too
    return all(sub.is_dir() and run_finished(sub) for sub in baseline_folders(run))


def check_resume_config(run_dir: str | Path, config: LearnerConfig) -> None:
    """Refuse resuming a run with another configuration (as a learner resolves it: the
    backbone's recorded name, real max_length and dtype), naming each difference."""
    run = Path(run_dir)
    _check_config(run, _saved_config(run)["config"], config.to_dict())


def open_run(
    run_dir: str | Path,
    stream: Stream,
    config: LearnerConfig,
    backbone: Backbone | None = None,
    console: Console | None = None,
    resume: bool = False,
) -> ContinualLearner:
    """A learner writing `run_dir` for `stream`: a new run, or with `resume` the run already
    there continued from its last finished task (a folder without any is started afresh).

    Resuming refuses a configuration or a stream that differs from the run's, naming the
    difference; it takes the run's lock first, so a live writer is refused before anything
    is read.
    """
    run = Path(run_dir)
    if not resume:
        learner = ContinualLearner(
            backbone, config=config, run_dir=run, stream=stream.name, console=console
        )
        learner.stream_plan = stream_plan(stream)
        return learner
    # under torchrun rank 0 alone takes the lock, checks and repairs; every rank then reads
    writer = on_writer(lambda: RunDir(run, resume=True))
    try:
        learner = ContinualLearner(backbone, config=config, stream=stream.name, console=console)
        checkpoint = from_writer(on_writer(lambda: _resume_point(writer, stream, learner, console)))
        if checkpoint is not None:
            _restore(learner, run, checkpoint, {task.name: task for task in stream.tasks})
            restore_rng(checkpoint["rng"])
        learner.stream_plan = stream_plan(stream)
        learner.run_dir = writer
        learner.status = "running"
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    return learner


def _resume_point(
    writer: RunDir, stream: Stream, learner: ContinualLearner, console: Console | None
) -> dict | None:
    """The checkpoint a resumed run continues from (see `store.repair.resume_point`), after
    checking the run's configuration and backbone (its config.json written if it is lost)."""
    run = writer.path
    if (run / "config.json").is_file():
        saved = _saved_config(run)
        _check_config(run, saved["config"], learner.config.to_dict())
        _check_backbone(saved, learner, run)
    else:
        fingerprint = learner.fingerprint()
        writer.save_config({"config": learner.config.to_dict(), "backbone": fingerprint})
    return resume_point(run, stream, _teller(console))


def saved_config(run_dir: str | Path) -> LearnerConfig:
    """The configuration a run directory was started with."""
    run = Path(run_dir)
    return LearnerConfig.from_dict(_saved_config(run)["config"], str(run / "config.json"))


def _saved_config(run: Path) -> dict:
    """config.json, checked: an object with a config, unchanged since the last checkpoint."""
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
    if recorded and run_config_sha256(saved["config"]) != recorded:
        raise ContinualPeftError(
            f"{path} was edited: its configuration differs from the one {checkpoint} records, "
            "so the run's tasks were not made with it. Restore it from a copy of the run; to "
            "change settings, start a new run."
        )
    return saved


def _teller(console: Console | None):
    """Tells the user something: on the console (paths unbroken), else as a warning."""
    if console is None:
        return lambda message: warnings.warn(message, stacklevel=4)
    return lambda message: console.print(message, soft_wrap=True, highlight=False, markup=False)


def _check_config(run: Path, saved: dict, given: dict) -> None:
    # read through the config class, so keys added since the run was written take their defaults
    saved = LearnerConfig.from_dict(saved, str(run / "config.json")).to_dict()
    # where a run computes is not what it is: a run may resume on another device
    saved["backbone"] = without_place(saved["backbone"])
    if saved["backbone"].get("dtype") == "auto":  # written before the resolved dtype was
        saved["backbone"]["dtype"] = given["backbone"]["dtype"]
    given = {**given, "backbone": without_place(given["backbone"])}
    differences = config_differences(saved, given)
    if differences:
        raise ContinualPeftError(
            f"{run} was started with another configuration ({'; '.join(differences)}). A run "
            "resumes with its own configuration: leave out the options that differ, or start a "
            "new run."
        )


def _check_backbone(saved: dict, learner: ContinualLearner, run: Path) -> None:
    # The one place a saved run's backbone is checked, for load and resume alike.
    check_fingerprint(saved.get("backbone") or {}, learner.backbone, f"run {run}")


def _restore(
    learner: ContinualLearner, run: Path, checkpoint: dict, tasks: dict[str, Task]
) -> None:
    """Put a checkpoint's state into a fresh learner built with the run's configuration."""
    placement = learner.backbone.placement  # every tensor read back goes where the backbone is
    for slot, entry in enumerate(checkpoint["slots"]):
        state = _load_on(placement, run / entry["file"])
        if learner.bank.load_slot(state, entry["kind"], trainable=entry["trainable"]) != slot:
            raise ContinualPeftError(f"{run}: slots are not numbered 0..n-1; the run is damaged.")
    learner.records = list(checkpoint["records"])
    for index, entry in enumerate(checkpoint["tasks"]):
        name, record = entry["name"], learner.records[index]
        head = _load_on(placement, run / "tasks" / name / "head.safetensors")
        learner.heads.restore(name, record, head)
        task = tasks.get(name)
        if task is not None and task_digest(task) != entry["data_sha256"]:
            raise ContinualPeftError(
                f"{run}: the task {name!r} given has other data than the one the run learned "
                "(its data hash differs); pass the same task."
            )
        if task is None:
            state = LearnedTask(Task(name, list(record["labels"]), [], [], [], []), index,
                             entry["slot"], [], has_data=False)  # fmt: skip
        else:
            items = learner.heads.prompt_items(name, task.test_inputs).items
            state = LearnedTask(task, index, entry["slot"], items)
            state.raw_items = learner.heads.feature_items(task.test_inputs)
        state.data_sha256 = entry["data_sha256"]
        learner.learned[name] = state
    learner.monitor = ForgettingMonitor.from_state(checkpoint["monitor"])
    if checkpoint["router"]:
        folder = run / Path(checkpoint["router"][0]).parent
        learner.router = load_router(folder, learner.backbone.device)
    if checkpoint["strategy"]:
        tensors_file, meta_file = checkpoint["strategy"]
        tensors = _load_on(placement, run / tensors_file)
        learner.strategy.load_state(tensors, load_json(run / meta_file))
    learner.saved_files = dict(checkpoint["files"])
    learner.status = checkpoint["status"]
    learner.stream_plan = checkpoint.get("stream_plan")


def _load_on(placement: Placement, path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on `placement`'s device (dtypes as stored)."""
    return {name: value.to(placement.device) for name, value in load_safetensors(path).items()}
