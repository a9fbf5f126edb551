"""Run a whole stream: validate everything, then learn task after task, reporting after each.

The data and the configuration are checked before the run directory is created, so a bad input
leaves no run behind; a run that fails midway is marked `"status": "failed"` in its report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from continual_peft.backbone import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.learner import ContinualLearner
from continual_peft.rundir import check_free
from continual_peft.strategies import STRATEGIES
from continual_peft.streams import Stream


def run_stream(
    stream: Stream,
    config: LearnerConfig,
    run_dir: str | Path | None = None,
    baseline: str | None = None,
    console: Console | None = None,
    make_backbone: Callable[[], Backbone] | None = None,
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

    Returns:
        The learner, finished.
    """
    config.validate()  # module kinds and router included
    STRATEGIES.get(config.strategy)
    if baseline is not None:
        STRATEGIES.get(baseline)
    if run_dir is not None:
        check_free(run_dir)  # before any model is loaded
    learner = _learn_all(
        stream, config, run_dir, console, make_backbone, f"strategy {config.strategy}"
    )
    if baseline is not None:
        other = LearnerConfig.from_dict({**config.to_dict(), "strategy": baseline})
        sub = Path(run_dir) / f"baseline-{baseline}" if run_dir is not None else None
        base = _learn_all(stream, other, sub, console, make_backbone, f"baseline {baseline}")
        base.finish()
        report = base.report
        learner.baseline = {
            "strategy": baseline,
            "accuracy_matrix": report["accuracy_matrix"],
            "metrics": report["metrics"],
        }
    learner.finish()
    return learner


def _learn_all(stream, config, run_dir, console, make_backbone, title) -> ContinualLearner:
    backbone = make_backbone() if make_backbone else None
    learner = ContinualLearner(
        backbone, config=config, run_dir=run_dir, stream=stream.name, console=console
    )
    if console:
        console.rule(f"{stream.name}: {title}, {len(stream.tasks)} tasks")
    try:
        for task in stream.tasks:
            learner.learn(task)
    except BaseException:
        learner.finish(status="failed")
        raise
    return learner
