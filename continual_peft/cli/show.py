"""`report` and `list`: print a saved report, aggregate or leaderboard; list what is
registered or shipped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import typer

from continual_peft.cli.base import console, fail
from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.compare import load_leaderboard
from continual_peft.experiments.grid import console_aggregate, load_aggregate
from continual_peft.modules import HYBRID, MODULE_KINDS, WHOLE_METHOD_KINDS
from continual_peft.reports.leaderboard import console_leaderboard
from continual_peft.reports.run import console_report, load_report
from continual_peft.routers import ROUTERS
from continual_peft.strategies import STRATEGIES, strategy_options
from continual_peft.tasks.streams import demo_spec_path, shipped_folder


def report(
    run_dir: Path = typer.Argument(
        ...,
        help="A run directory or its report.json, a grid folder or its aggregate.json, or a "
        "comparison folder or its leaderboard.json.",
        metavar="RUN",
    ),
) -> None:
    """Print a saved run's report, a grid's aggregate, or a comparison's leaderboard."""
    try:
        if run_dir.name == "leaderboard.json" or (run_dir / "leaderboard.json").is_file():
            console.print(console_leaderboard(load_leaderboard(run_dir)))
        elif run_dir.name == "aggregate.json" or (run_dir / "aggregate.json").is_file():
            console.print(console_aggregate(load_aggregate(run_dir)))
        else:
            console.print(console_report(load_report(run_dir)))
    except ContinualPeftError as err:
        fail(str(err))


def _registered(registry) -> list[str]:
    """Each registered name with the first line of its docstring."""
    return [f"{n}: {_summary(registry.get(n))}" for n in registry.names()]


def _strategies() -> list[str]:
    """Registered strategies with their options, then the shipped strategy specs."""
    lines = [_strategy_summary(n) for n in STRATEGIES.names()]
    return lines + [_strategy_line(p) for p in sorted(shipped_folder("strategies").glob("*.toml"))]


def _streams() -> list[str]:
    """The embedded demo streams (the encoder demo, the toy generative stream) and the
    shipped stream specs."""
    generative = demo_spec_path().with_name("generative.toml")
    specs = [demo_spec_path(), generative, *sorted(shipped_folder("streams").glob("*.toml"))]
    return [_stream_line(p) for p in specs]


HYBRID_LINE = (
    f"a hybrid slot: kinds joined by '{HYBRID}' (module = \"lora{HYBRID}prompt\"), every part "
    f"trained, routed and saved together; any kind but {', '.join(WHOLE_METHOD_KINDS)}"
)

# what `list` can list, in the order its help names them
LISTS = {
    "modules": lambda: [*_registered(MODULE_KINDS), HYBRID_LINE],
    "strategies": _strategies,
    "streams": _streams,
    "routers": lambda: _registered(ROUTERS),
}


def list_(
    what: str = typer.Argument(..., help=f"One of: {', '.join(LISTS)}.", metavar="WHAT"),
) -> None:
    """List registered module kinds, strategies, routers, or the shipped stream specs."""
    if what not in LISTS:
        fail(f"cannot list {what!r}; choose one of: {', '.join(LISTS)}")
    for line in LISTS[what]():
        console.print(line, highlight=False, soft_wrap=True)


def _summary(item: object) -> str:
    """The first line of a registered item's docstring."""
    return (item.__doc__ or "").strip().splitlines()[0] if item.__doc__ else ""


def _strategy_summary(name: str) -> str:
    """A registered strategy: its description and its options with their defaults."""
    options = ", ".join(f"{k}={v}" for k, v in strategy_options(name).items())
    return f"{name}: {STRATEGIES.get(name).description}" + (
        f"; options: {options}" if options else ""
    )


def _stream_line(path: Path) -> str:
    """A shipped stream spec: its file, tasks and named orders (read without loading data)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        return f"{path}: unreadable ({err})"
    tasks = [t.get("name", "?") for t in data.get("tasks", [])]
    tasks += [f"{s.get('prefix', '?')}-*" for s in data.get("class_split", [])]
    shown = "demo (embedded)" if path == demo_spec_path() else _shown_path(path)
    if path == demo_spec_path().with_name("generative.toml"):
        shown = f"{_shown_path(path)} (embedded; needs a causal or seq2seq --backbone)"
    orders = sorted(data.get("orders", {}))
    named = f"; orders: {', '.join(orders)}" if orders else ""
    return f"{shown}: {data.get('name', '?')}, tasks {', '.join(tasks)}{named}"


def _shown_path(path: Path) -> str:
    """A shipped spec's path as a command line here can use it: relative to the working
    directory when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _strategy_line(path: Path) -> str:
    """A shipped strategy spec: its file and the strategy, module kind and router it sets."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        return f"{path}: unreadable ({err})"
    keys = ("strategy", "module", "router")
    values = {k: data.get(k, LearnerConfig.__dataclass_fields__[k].default) for k in keys}
    strategy = values["strategy"]
    if strategy in STRATEGIES and not STRATEGIES.get(strategy).trains_modules:
        values["module"] = "none"  # its tasks open no slot (linear_probe)
    return f"{_shown_path(path)}: " + ", ".join(f"{k} {v}" for k, v in values.items())
