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

from rich.console import Console

from continual_peft.backbones.fingerprint import check_fingerprint
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.engine.learner import ContinualLearner
from continual_peft.engine.saved_run import check_same_config, read_config_json, saved_config
from continual_peft.errors import ContinualPeftError
from continual_peft.store.checkpoint import Checkpoint, baseline_folders, read_checkpoint
from continual_peft.store.digests import stream_plan
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
    batch_size: int | None = None,
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
        batch_size: Rows per forward pass while predicting; None: the run's eval_batch_size.
    """
    return ContinualLearner.load(
        run_dir,
        backbone,
        tasks=tasks,
        console=console,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run directory, and each baseline run inside it, holds a finished run whose
    files are all there and unchanged (read without the lock). A finished run that lost a file
    is not finished: resuming it re-trains what is lost (see `continual_peft.store.repair`)."""
    run = Path(run_dir)
    try:
        if read_checkpoint(run).status != "finished":
            return False
    except ContinualPeftError:
        return False  # no checkpoint yet, or a damaged run: `open_run` names or repairs it
    read_config_json(run)  # a finished run whose config.json is damaged is named too
    return all(sub.is_dir() and run_finished(sub) for sub in baseline_folders(run))


def check_resume_config(run_dir: str | Path, config: LearnerConfig) -> None:
    """Refuse resuming a run with another configuration (as a learner resolves it: the
    backbone's recorded name, real max_length and dtype), naming each difference."""
    check_same_config(Path(run_dir), saved_config(run_dir), config)


def open_run(
    run_dir: str | Path,
    stream: Stream,
    config: LearnerConfig,
    backbone: Backbone | None = None,
    console: Console | None = None,
    resume: bool = False,
    baseline: str | None = None,
) -> ContinualLearner:
    """A learner writing `run_dir` for `stream`: a new run, or with `resume` the run already
    there continued from its last finished task (a folder without any is started afresh).
    `baseline` is the strategy a runner runs beside it (recorded in each checkpoint).

    Resuming refuses a configuration or a stream that differs from the run's, naming the
    difference; it takes the run's lock first, so a live writer is refused before anything
    is read.
    """
    run = Path(run_dir)
    if not resume:
        learner = ContinualLearner(
            backbone, config=config, run_dir=run, stream=stream.name, console=console
        )
        learner.resume_into(learner.run_dir, stream_plan(stream), baseline)
        return learner
    writer = RunDir(run, resume=True)  # under torchrun: rank 0 takes the lock and repairs
    try:
        learner = ContinualLearner(backbone, config=config, stream=stream.name, console=console)
        checkpoint = writer.write(lambda: _resume_point(writer, stream, learner, console))
        if checkpoint is not None:
            learner.load_state_dict(checkpoint, run, stream.tasks)
            restore_rng(checkpoint.rng)
        learner.resume_into(writer, stream_plan(stream), baseline)
    except BaseException:
        writer.close()
        raise
    return learner


def _resume_point(
    writer: RunDir, stream: Stream, learner: ContinualLearner, console: Console | None
) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (see `store.repair.resume_point`), after
    checking the run's configuration and backbone (its config.json written if it is lost)."""
    run = writer.path
    if (run / "config.json").is_file():
        saved = read_config_json(run)
        check_same_config(run, LearnerConfig.from_dict(saved["config"]), learner.config)
        check_fingerprint(saved.get("backbone") or {}, learner.backbone, f"run {run}")
    else:
        writer.save_config(learner.run_config())
    return resume_point(run, stream, _teller(console))


def _teller(console: Console | None):
    """Tells the user something: on the console (paths unbroken), else as a warning."""
    if console is None:
        return lambda message: warnings.warn(message, stacklevel=4)
    return lambda message: console.print(message, soft_wrap=True, highlight=False, markup=False)
