"""Run a whole stream: validate everything, then learn task after task, reporting after each.

The data and the configuration are checked before the run directory is created, so a bad input
leaves no run behind; a run that fails midway is marked `"status": "failed"` in its report (and
`"interrupted"` after Ctrl-C). Either way, and after a `kill -9`, `resume=True` continues it
from its last finished task, with the baseline run (if any) resumed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.distributed import from_writer
from continual_peft.engine.evaluation import score_dev
from continual_peft.engine.heads import check_kind
from continual_peft.engine.learner import ContinualLearner
from continual_peft.engine.loading import check_resume_config, load_learner, open_run, run_finished
from continual_peft.engine.state import build_backbone, resolve_backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.reports.run import console_headline, reports_intact, write_reports
from continual_peft.store.checkpoint import (
    CHECKPOINT_FILE,
    baseline_folders,
    read_checkpoint,
    recorded_baseline,
)
from continual_peft.store.digests import check_stream, stream_plan
from continual_peft.store.rundir import RunDir, check_free
from continual_peft.strategies import check_config
from continual_peft.tasks.streams import Stream


def run_stream(
    stream: Stream,
    config: LearnerConfig,
    run_dir: str | Path | None = None,
    baseline: str | None = None,
    console: Console | None = None,
    make_backbone: Callable[[], Backbone] | None = None,
    resume: bool = False,
) -> ContinualLearner:
    """Learn every task of `stream` in order; optionally run a baseline strategy beside it.

    Args:
        stream: The tasks, in training order.
        config: Strategy, module, backbone and training settings.
        run_dir: Where to write; nothing is written when None.
        baseline: A second strategy (e.g. "seq") run on the same stream into
            `run_dir/baseline-<name>/`; its matrix and metrics go into the main report.
        console: Where tables and progress go.
        make_backbone: Builds a fresh backbone (each learner wraps its own); from `config` if None.
        resume: Continue the run in `run_dir` from its last finished task, with the same stream
            and configuration (a difference is refused, naming it); a finished run is loaded and
            returned as it is, nothing written.

    Returns:
        The learner, finished.
    """
    config = check_config(config)  # once: every layer below trusts it
    other = None
    if baseline is not None:  # checked before the main run trains, not after it
        other = check_config(dataclasses.replace(config, strategy=baseline), "--baseline")
    if resume and (run_dir is None or not Path(run_dir).is_dir()):
        raise ContinualPeftError(f"cannot resume {run_dir}: there is no such run directory.")
    if from_writer(resume and run_finished(run_dir)):
        return _finished(
            Path(run_dir),
            config,
            stream=stream,
            baseline=baseline,
            console=console,
            make_backbone=make_backbone,
        )
    if run_dir is not None and not resume:
        check_free(run_dir)  # before any model is loaded
    if resume:
        _check_baseline(Path(run_dir), baseline)
    if console and run_dir is not None:
        console.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)
    title = f"strategy {config.strategy}"
    learner = _learn_all(
        stream,
        config,
        run_dir=run_dir,
        console=console,
        make_backbone=make_backbone,
        title=title,
        resume=resume,
        baseline=baseline,
    )
    try:
        score_dev(learner, stream.tasks)  # before the final report: a sweep chooses on it
        if baseline is not None:
            sub = Path(run_dir) / f"baseline-{baseline}" if run_dir is not None else None
            title = f"baseline {baseline}"
            again = resume and sub.is_dir()  # a lost baseline folder: run again
            base = _learn_all(
                stream,
                other,
                run_dir=sub,
                console=console,
                make_backbone=make_backbone,
                title=title,
                resume=again,
            )
            base.finish()
            learner.finish_baseline(baseline, base.report)
    except BaseException as err:
        _mark_stopped(learner, err)
        raise
    learner.finish()
    if console is not None and learner.baseline is not None:
        console.print(console_headline(learner.report))  # after the baseline's own tables
    return learner


def _learn_all(
    stream, config, *, run_dir, console, make_backbone, title, resume=False, baseline=None
) -> ContinualLearner:
    backbone = make_backbone() if make_backbone else None
    if run_dir is None:
        learner = ContinualLearner(backbone, config=config, stream=stream.name, console=console)
        learner.resume_into(None, stream_plan(stream), baseline)  # its last task: a full row
    else:
        learner = open_run(
            run_dir,
            stream,
            config,
            backbone=backbone,
            console=console,
            resume=resume,
            baseline=baseline,
        )
    learner.data = stream.protocol
    done = len(learner.learned)
    if console:
        start = f", resuming after task {done}" if done else ""
        console.rule(f"{stream.name}: {title}, {len(stream.tasks)} tasks{start}")
    try:
        for task in stream.tasks[done:]:  # before any training: not after the first tasks
            check_kind(task, learner.heads)
        for task in stream.tasks[done:]:
            learner.learn(task)
    except BaseException as err:
        _mark_stopped(learner, err)
        raise
    return learner


def check_resumable(run: Path, stream: Stream) -> None:
    """Refuse, before anything is written, resuming `run` with another stream than it learned
    (another order, data, dev split or budget; see `store.digests.check_stream`). A folder
    without a checkpoint has nothing to compare."""
    if (run / CHECKPOINT_FILE).is_file() or any(run.glob(f"tasks/*/{CHECKPOINT_FILE}")):
        checkpoint = read_checkpoint(run)
        check_stream(run, checkpoint.stream_plan, stream, checkpoint.tasks)


def run_baseline(run: Path) -> str | None:
    """The baseline strategy a run directory was started with, or None."""
    return recorded_baseline(run)


def _check_baseline(run: Path, baseline: str | None) -> None:
    """Refuse resuming with another baseline than the run was started with (as its checkpoint
    records it, or as its baseline folders show)."""
    found = [sub.name for sub in baseline_folders(run)]
    wanted = [f"baseline-{baseline}"] if baseline else []
    if any(name not in wanted for name in found):
        raise ContinualPeftError(
            f"{run} has a baseline run {found[0]}/, but this resume asks for "
            f"{baseline or 'no baseline'}: give the same baseline as the run was started with."
        )
    checkpoints = [run / CHECKPOINT_FILE, *run.glob(f"tasks/*/{CHECKPOINT_FILE}")]
    recorded = recorded_baseline(run)
    if any(path.is_file() for path in checkpoints) and recorded != baseline:
        raise ContinualPeftError(
            f"{run} was started with {recorded or 'no baseline'}, but this resume asks for "
            f"{baseline or 'no baseline'}: give the same baseline as the run was started with "
            "(or leave --baseline out), or start a new run."
        )


def _finished(run: Path, config, *, stream, baseline, console, make_backbone) -> ContinualLearner:
    """A finished run resumed: refused with another stream, baseline or settings; else nothing
    to do, but reports that were lost or damaged are written again from the checkpoint."""
    _check_baseline(run, baseline)
    checkpoint = read_checkpoint(run)  # before any model loads: a wrong stream costs nothing
    check_stream(run, checkpoint.stream_plan, stream, checkpoint.tasks)
    backbone = make_backbone() if make_backbone else build_backbone(config.backbone)
    backbone, resolved = resolve_backbone(backbone, config)
    check_resume_config(run, resolved)  # what the run would resume with, as a learner sees it
    learner = load_learner(run, backbone)
    if from_writer(reports_intact(run)):  # one answer: rank 0 may rewrite them
        if console:
            console.print(f"{run} is finished: nothing to do.", highlight=False, soft_wrap=True)
        return learner
    score_dev(learner, stream.tasks)
    recorded = recorded_baseline(run)
    if recorded:
        sub = load_learner(run / f"baseline-{recorded}", make_backbone() if make_backbone else None)
        learner.finish_baseline(recorded, sub.report)
    writer = RunDir(run, resume=True)
    try:
        report = learner.report
        writer.write(lambda: write_reports(report, writer.path))
    finally:
        writer.close()
    if console:
        message = f"{run} is finished; its reports were written again from the checkpoint."
        console.print(message, highlight=False, soft_wrap=True)
    return learner


def _mark_stopped(learner: ContinualLearner, err: BaseException) -> None:
    """Record why the run stopped; if even that cannot be written (the disk that failed is still
    full), the original error is the one worth reporting, so this one is dropped."""
    with contextlib.suppress(OSError, ContinualPeftError):
        learner.finish(status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed")


def check_task_overrides(config: LearnerConfig, stream: Stream) -> None:
    """Refuse `[tasks.<name>]` overrides that name no task of the (whole) stream."""
    unknown = sorted(set(config.task_modules) - {task.name for task in stream.tasks})
    if unknown:
        raise ContinualPeftError(
            f"[tasks.<name>] overrides name task(s) {unknown} that stream {stream.name!r} does "
            f"not have; its tasks: {[task.name for task in stream.tasks]}. Fix the names (a typo "
            "would silently leave the task on the default module)."
        )
