"""What `continual-peft run` and `compare` ask for, resolved once: the configuration (a
strategy name or spec, command-line overrides, a resumed run's own settings), one run or a
grid, the folder, the baseline; then the run, grid or comparison itself."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from continual_peft.config import LearnerConfig
from continual_peft.distributed import from_writer, world
from continual_peft.engine.loading import saved_config
from continual_peft.errors import ContinualPeftError, check_file
from continual_peft.experiments.compare import compare
from continual_peft.experiments.entries import Entry, override, resolve_entries
from continual_peft.experiments.grid import grid_settings, parse_seeds, resolve_orders, run_grid
from continual_peft.experiments.runner import check_task_overrides, run_baseline, run_stream
from continual_peft.store.rundir import new_run_path
from continual_peft.strategies import (
    STRATEGIES,
    check_config,
    load_strategy_spec,
    names_spec_file,
)
from continual_peft.tasks.streams import Stream, shipped_folder


def resolve_config(
    strategy: str | None, overrides: dict[str, Any], saved: LearnerConfig | None = None
) -> LearnerConfig:
    """A strategy name or spec file, with command-line overrides applied on top.

    With `saved` (a resumed run's or grid's own configuration) as the base: a strategy name
    only replaces its strategy, a spec file everything but the backbone (and the run refuses
    what differs). A name with a shipped spec of its own (l2p) runs that spec.

    Returns:
        The configuration, checked (`strategies.check_config`): the layers below trust it.

    Raises:
        ContinualPeftError: an unknown strategy, a bad spec or a bad override, named.
    """
    if strategy is not None and Path(strategy).is_dir():
        check_file(strategy, "strategy spec file", "give a strategy name or a .toml spec")
    if strategy is not None and names_spec_file(strategy):
        config = load_strategy_spec(strategy)
        if saved is not None:
            config.backbone = saved.backbone
    elif saved is not None:
        config = override(saved, {"strategy": strategy}, "command line")
    elif strategy is not None and (shipped_folder("strategies") / f"{strategy}.toml").is_file():
        config = load_strategy_spec(shipped_folder("strategies") / f"{strategy}.toml")  # l2p
    else:
        config = LearnerConfig(strategy=strategy or "per_task")
    return check_config(override(config, overrides, "command line"), "command line")


def with_stream_epochs(overrides: dict[str, Any], stream: Stream) -> dict[str, Any]:
    """The overrides with the stream's `epochs` (its protocol's budget) where the command line
    gives none: the spec's epochs replace a strategy's own, --epochs replaces both."""
    if stream.epochs is None or overrides.get("train.epochs") is not None:
        return overrides
    return {**overrides, "train.epochs": stream.epochs}


@dataclass(kw_only=True)
class RunRequest:
    """The `run` command's choices, as given (None: not given)."""

    stream: Stream
    demo: bool  # the embedded demo stream (its baseline defaults to seq)
    strategy: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys: "train.lr", ...
    orders: list[str] = field(default_factory=list)
    seed: int | None = None
    seeds: str | None = None  # "0,1,2"
    baseline: str = "auto"  # a strategy, "none", or "auto"
    out: Path | None = None
    resume: Path | None = None


@dataclass(kw_only=True)
class RunPlan:
    """One run or a grid, decided once."""

    stream: Stream
    config: LearnerConfig
    orders: list[str | list[str]]
    seeds: list[int]
    baseline: str | None
    folder: Path
    grid: bool
    resume: bool  # continue `folder`


def plan_run(request: RunRequest) -> RunPlan:
    """Resolve a `run` request: configuration, orders, seeds, baseline, folder, run or grid.

    Raises:
        ContinualPeftError: contradicting options, or what `resolve_config` refuses.
    """
    resume = request.resume
    if request.seeds is not None and request.seed is not None:
        raise ContinualPeftError("give --seed or --seeds, not both.")
    if resume is not None and request.out is not None and request.out != resume:
        raise ContinualPeftError("give --out or --resume, not both.")
    resumed_grid = resume is not None and (resume / "aggregate.json").is_file()
    started = grid_settings(resume, request.stream) if resumed_grid else {}
    saved = started.get("config") or (saved_config(resume) if resume is not None else None)
    overrides = (
        request.overrides if saved else with_stream_epochs(request.overrides, request.stream)
    )
    config = resolve_config(request.strategy, overrides, saved)
    check_task_overrides(config, request.stream)
    _check_rank(config, request.overrides.get("lora.r"))
    orders = resolve_orders(request.stream, request.orders) or started.get("orders")
    orders = orders or [request.stream.order_name]
    seeds = parse_seeds(request.seeds) if request.seeds is not None else [config.seed]
    if request.seeds is None and request.seed is None:
        seeds = started.get("seeds", seeds)
    grid = resumed_grid or len(orders) * len(seeds) > 1
    if grid and resume is not None and not started:
        raise ContinualPeftError(
            f"{resume} is one run, and --resume continues it as it was: leave out --order "
            "and --seeds (several make a grid; start one with --out)."
        )
    if grid and world().size > 1:
        raise ContinualPeftError(
            f"a grid ({len(orders)} order(s) x {len(seeds)} seed(s)) does not run under torchrun: "
            "launch one torchrun per order and seed (--order NAME --seed N)."
        )
    name = f"{request.stream.name}-grid" if grid else request.stream.name
    folder = from_writer(resume or request.out or new_run_path("runs", name))  # clock: rank 0's
    return RunPlan(
        stream=request.stream,
        config=config,
        orders=orders,
        seeds=seeds,
        baseline=_baseline(request, started),
        folder=folder,
        grid=grid,
        resume=resume is not None,
    )


def _baseline(request: RunRequest, started: dict[str, Any]) -> str | None:
    """--baseline: 'auto' is the resumed run's own, seq on the demo stream, else none."""
    if request.resume is not None:
        auto = run_baseline(request.resume)
    else:
        auto = "seq" if request.demo else None
    auto = started.get("baseline", auto)
    return {"auto": auto, "none": None}.get(request.baseline, request.baseline)


def _check_rank(config: LearnerConfig, rank: int | None) -> None:
    if rank is not None and "lora" not in config.part_kinds():
        raise ContinualPeftError(
            f"--rank {rank} sets the LoRA rank, but this run trains {config.module} slots "
            "(no LoRA): leave --rank out, or choose --module lora."
        )


def launch(plan: RunPlan, console: Console | None = None) -> Path:
    """Run the plan: `run_grid`, or `run_stream` with its one order and seed. Returns the folder."""
    if plan.grid:
        run_grid(
            plan.stream,
            plan.config,
            orders=plan.orders,
            seeds=plan.seeds,
            out_dir=plan.folder,
            baseline=plan.baseline,
            console=console,
            resume=plan.resume,
        )
        return plan.folder
    run_stream(
        plan.stream.with_order(plan.orders[0]),
        replace(plan.config, seed=plan.seeds[0]),
        run_dir=plan.folder,
        baseline=plan.baseline,
        console=console,
        resume=plan.resume,
    )
    return plan.folder


@dataclass(kw_only=True)
class CompareRequest:
    """The `compare` command's choices, as given (None: not given)."""

    stream: Stream
    strategies: list[str] = field(default_factory=list)  # entries; empty: every strategy
    overrides: dict[str, Any] = field(default_factory=dict)
    sweep: str | None = None  # "lora.r=1,2,4"
    orders: list[str] = field(default_factory=list)
    seeds: str | None = None
    out: Path | None = None
    resume: Path | None = None


@dataclass(kw_only=True)
class ComparePlan:
    """A comparison, resolved: its entries, orders, seeds and folder."""

    stream: Stream
    entries: list[Entry]
    orders: list[str | list[str]] | None
    seeds: list[int] | None
    folder: Path
    resume: bool


def plan_compare(request: CompareRequest) -> ComparePlan:
    """Resolve a `compare` request: entries (with overrides and sweep), orders, seeds, folder.

    Raises:
        ContinualPeftError: an unknown entry, a bad override or sweep, contradicting options.
    """
    overrides = with_stream_epochs(request.overrides, request.stream)
    entries = resolve_entries(request.strategies or STRATEGIES.names(), overrides, request.sweep)
    for entry in entries:
        check_task_overrides(entry.config, request.stream)
    orders = resolve_orders(request.stream, request.orders) or None
    seeds = parse_seeds(request.seeds) if request.seeds is not None else None
    if request.resume is not None and request.out is not None and request.out != request.resume:
        raise ContinualPeftError("give --out or --resume, not both.")
    folder = request.resume or request.out or new_run_path("runs", f"{request.stream.name}-compare")
    return ComparePlan(
        stream=request.stream,
        entries=entries,
        orders=orders,
        seeds=seeds,
        folder=folder,
        resume=request.resume is not None,
    )


def launch_compare(plan: ComparePlan, console: Console | None = None) -> dict:
    """Run the comparison. Returns the leaderboard (`experiments.compare.compare`)."""
    return compare(
        plan.stream,
        plan.entries,
        out_dir=plan.folder,
        seeds=plan.seeds,
        orders=plan.orders,
        console=console,
        resume=plan.resume,
    )
