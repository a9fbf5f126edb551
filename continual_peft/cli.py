"""The `continual-peft` command line. Each command parses options and calls one library function."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from continual_peft._compare_entries import override, resolve_entries
from continual_peft._io import atomic_write_text
from continual_peft._leaderboard_report import console_leaderboard
from continual_peft.backbone import Backbone
from continual_peft.compare import compare, load_leaderboard
from continual_peft.config import LearnerConfig, load_strategy_spec
from continual_peft.errors import ContinualPeftError, Terminated
from continual_peft.export import export_task
from continual_peft.grid import (
    console_aggregate,
    grid_finished,
    grid_settings,
    load_aggregate,
    parse_seeds,
    resolve_orders,
    run_grid,
)
from continual_peft.loading import load_learner, run_finished, saved_config
from continual_peft.modules import MODULE_KINDS
from continual_peft.reports import console_report, load_report
from continual_peft.routers import ROUTERS
from continual_peft.rundir import new_run_path
from continual_peft.runner import check_task_overrides, run_baseline, run_stream
from continual_peft.strategies import STRATEGIES, strategy_options
from continual_peft.streams import demo_spec_path, load_stream, shipped_folder
from continual_peft.tasks import read_texts

app = typer.Typer(
    help="Continual learning with per-task PEFT modules on a frozen backbone.", add_completion=False
)
console = Console()
errors = Console(stderr=True)
LISTS = ["modules", "strategies", "streams", "routers"]
DTYPE_HELP = (
    "Frozen weights' dtype: auto (bfloat16 on a CUDA device that supports it, float32 on the CPU), "
    "bfloat16, float16 or float32. Trainable slot and head stay float32 (README: Precision)."
)
MOVED_BACKBONE_HELP = (
    "The run's backbone from another folder (a moved model); it must be the same model: its "
    "fingerprint is checked. Default: the folder the run recorded."
)
DEVICE_HELP = "Device, e.g. cpu, cuda, cuda:1. Default: CUDA when present, else CPU."
PACKAGE = Path(__file__).resolve().parent


@app.callback()
def _main() -> None:
    """Continual learning with per-task PEFT modules on a frozen backbone."""
    warnings.formatwarning = _format_warning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one `warning:` line (on stderr, as errors are: a log file reads alike);
    another library's names its kind and place."""
    text = str(message)
    if not Path(filename).resolve().is_relative_to(PACKAGE) and category is not UserWarning:
        text = f"{text} ({category.__name__}, {Path(filename).name}:{lineno})"
    return f"warning: {text}\n"


def _fail(message: str, code: int = 2) -> None:
    # escape: "[train]" in a message is a spec table, not rich markup. soft_wrap: never break a
    # file:line path at the console width when stderr is piped.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While a command works, SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt), so
    a scheduler's kill stops a run as cleanly as Ctrl-C."""

    def stop(signum: int, frame: object) -> None:
        for sig in previous:  # a second signal must not cut the clean stop short
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError):  # signals work in the main thread only
                previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(err: KeyboardInterrupt, kept: str) -> None:
    """Ctrl-C: exit 130; a termination signal: exit 128 + its number, the signal named."""
    if isinstance(err, Terminated):
        _fail(f"stopped by {err} (a termination signal); {kept}", code=128 + err.signum)
    _fail(f"interrupted; {kept}", code=130)


def _config(
    strategy: str | None, overrides: dict, saved: LearnerConfig | None = None
) -> LearnerConfig:
    """A strategy name or spec file, with command-line overrides applied on top.

    With `saved` (a resumed run's or grid's own configuration) as the base: a strategy name
    only replaces its strategy, a spec file everything but the backbone (and the run refuses
    what differs).
    """
    if strategy is not None and strategy.endswith(".toml"):
        config = load_strategy_spec(strategy)
        if saved is not None:
            config.backbone = saved.backbone
    elif saved is not None:
        config = override(saved, {"strategy": strategy}, "command line")
    elif strategy is not None and (shipped_folder("strategies") / f"{strategy}.toml").is_file():
        config = load_strategy_spec(shipped_folder("strategies") / f"{strategy}.toml")  # l2p
    else:
        STRATEGIES.get(strategy or "per_task")
        config = LearnerConfig(strategy=strategy or "per_task")
    return override(config, overrides, "command line")


@app.command()
@_stop_signals()
def run(
    stream: Path = typer.Argument(
        None, help="Stream spec (TOML). Default: the embedded demo stream."
    ),
    strategy: str = typer.Option(
        None,
        help="Strategy name (see `list strategies`; a name with a shipped spec of its own, "
        "l2p, runs with that spec) or spec file. Default: per_task.",
    ),
    module: str = typer.Option(None, help="Module kind (see `list modules`)."),
    data_root: Path = typer.Option(None, help="Folder the stream's task paths are relative to."),
    out: Path = typer.Option(
        None, help="Run directory (grid folder for a grid). Default: runs/<time>-<stream>[-grid]."
    ),
    baseline: str = typer.Option(
        "auto",
        help="Also run this strategy for comparison; 'none' to skip, "
        "'auto' = seq on the demo stream, none otherwise (with --resume: the run's own).",
    ),
    max_train: int = typer.Option(None, help="Training examples per task (seeded subset)."),
    max_test: int = typer.Option(None, help="Test examples per task (seeded subset)."),
    router_train: int = typer.Option(
        None, help="Training inputs per task that fit the router (default: the slot's)."
    ),
    epochs: int = typer.Option(None),
    lr: float = typer.Option(None),
    batch_size: int = typer.Option(None),
    rank: int = typer.Option(None, help="LoRA rank."),
    seed: int = typer.Option(None, help="Seeds slot/head init, shuffling and dropout."),
    order: list[str] = typer.Option(
        None,
        help="Task order; repeat for several. A named order of the spec ('default' = its "
        "`order`), 'all' (every order of the spec's orders table), names joined by commas "
        "(order1,order2), or an explicit order of tasks joined by commas "
        "(dbpedia,amazon,agnews,yelp).",
    ),
    seeds: str = typer.Option(
        None,
        help="Seeds joined by commas, e.g. 0,1,2. More than one order x seed combination runs "
        "a grid: one run per combination in --out/<order>-seed<k>/, plus aggregate.json/.md/"
        ".csv/.png (mean ± sample std).",
    ),
    router: str = typer.Option(None, help="Router (see `list routers`); default oracle."),
    max_length: int = typer.Option(None, help="Longest input in tokens."),
    backbone: str = typer.Option(
        None, help="Model folder or name. Default: bundled all-MiniLM-L6-v2."
    ),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    resume: Path = typer.Option(
        None,
        help="Continue this run directory (or grid folder) from its last finished task (after "
        "a crash, kill or Ctrl-C), with the same stream arguments; the configuration is the "
        "run's own, and options that contradict it are refused. A run that lost or damaged a "
        "file is rolled back to the newest task whose files are intact and re-trained from "
        "there. A finished run: nothing to do.",
    ),
) -> None:
    """Learn every task of a stream, writing checkpoints and a forgetting report after each.

    With several orders (--order) or seeds (--seeds): one run per order x seed, plus an aggregate.
    """
    try:
        if seeds is not None and seed is not None:
            raise ContinualPeftError("give --seed or --seeds, not both.")
        if resume is not None and out is not None and out != resume:
            raise ContinualPeftError("give --out or --resume, not both.")
        if resume is not None and (run_finished(resume) or grid_finished(resume)):
            console.print(f"{resume} is finished: nothing to do.", highlight=False, soft_wrap=True)
            return
        overrides = {
            "module": module,
            "router": router,
            "seed": seed,
            "train.epochs": epochs,
            "train.lr": lr,
            "train.batch_size": batch_size,
            "lora.r": rank,
            "backbone.max_length": max_length,
            "backbone.name": backbone,
            "backbone.dtype": dtype,
            "backbone.device": device,
        }
        tasks = load_stream(stream, data_root, max_train, max_test, router_max_train=router_train)
        grid = resume is not None and (resume / "aggregate.json").is_file()
        started = grid_settings(resume, tasks) if grid else {}
        saved = started.get("config") or (saved_config(resume) if resume is not None else None)
        config = _config(strategy, overrides, saved)
        auto = run_baseline(resume) if resume is not None else "seq" if stream is None else None
        auto = started.get("baseline", auto)
        chosen = {"auto": auto, "none": None}.get(baseline, baseline)
        check_task_overrides(config, tasks)
        orders = resolve_orders(tasks, order or []) or started.get("orders") or [tasks.order_name]
        seed_list = parse_seeds(seeds) if seeds is not None else [config.seed]
        seed_list = started.get("seeds", seed_list) if seeds is None and seed is None else seed_list
        grid = grid or len(orders) * len(seed_list) > 1
        if grid and resume is not None and not started:
            raise ContinualPeftError(
                f"{resume} is one run, and --resume continues it as it was: leave out --order "
                "and --seeds (several make a grid; start one with --out)."
            )
        if grid:
            run_dir = resume or out or new_run_path("runs", f"{tasks.name}-grid")
            run_grid(tasks, config, orders, seed_list, run_dir, baseline=chosen, console=console,
                     resume=bool(started))  # fmt: skip
        else:
            config.seed = seed_list[0]
            tasks = tasks.with_order(orders[0])
            run_dir = resume or out or new_run_path("runs", tasks.name)
            run_stream(
                tasks, config, run_dir=run_dir, baseline=chosen, console=console,
                resume=resume is not None,
            )  # fmt: skip
    except ContinualPeftError as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(
            err, "the tasks finished so far are saved in the run directory: continue with --resume."
        )
    if grid:
        console.print(
            f"\ngrid directory: [bold]{run_dir}[/] (aggregate.md, aggregate.json, aggregate.csv, "
            "aggregate.png; one run directory per order and seed)"
        )
    else:
        console.print(
            f"\nrun directory: [bold]{run_dir}[/] (report.md, report.json, accuracy_matrix.png)"
        )


@app.command("compare")
@_stop_signals()
def compare_(
    stream: Path = typer.Option(None, help="Stream spec (TOML). Default: the embedded demo."),
    strategies: str = typer.Option(
        None,
        help="Entries joined by commas: registered strategy names (each with its single shipped "
        "spec strategies/<name>[_*].toml if there is one, else the default LoRA config) or "
        "strategy spec files (.toml). Default: every registered strategy.",
    ),
    sweep: str = typer.Option(
        None,
        help="KEY=V1,V2,...: every entry once per value, e.g. lora.r=1,2,4,8,16, "
        "prompt.num_virtual_tokens=5,10, train.lr=1e-3,1e-2; adds sweep.png.",
    ),
    seeds: str = typer.Option(
        None, help="Seeds joined by commas (each entry runs as an order x seed grid)."
    ),
    order: list[str] = typer.Option(
        None, "--order", "--orders", help="Task order(s), as for `run --order`; repeatable."
    ),
    out: Path = typer.Option(None, help="Output folder. Default: runs/<time>-<stream>-compare."),
    resume: Path = typer.Option(
        None,
        help="Continue this comparison folder (after a kill or Ctrl-C), with the same stream, "
        "--strategies and budget options: finished entries are kept, unfinished runs continue "
        "from their last finished task.",
    ),
    data_root: Path = typer.Option(None, help="Folder the stream's task paths are relative to."),
    max_train: int = typer.Option(None, help="Training examples per task (seeded subset)."),
    max_test: int = typer.Option(None, help="Test examples per task (seeded subset)."),
    epochs: int = typer.Option(None, help="For every entry (else they must agree)."),
    batch_size: int = typer.Option(None, help="For every entry (else they must agree)."),
    lr: float = typer.Option(
        None, help="For every entry, replacing each spec's own lr (leave unset to keep them)."
    ),
    router: str = typer.Option(None, help="Router for every entry (default: each entry's)."),
    max_length: int = typer.Option(None, help="Longest input in tokens, for every entry."),
    backbone: str = typer.Option(None, help="Model folder or name, for every entry."),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Run several strategies on the same stream and budget; write a leaderboard.

    Writes one run (or grid) folder per entry, leaderboard.json/.md/.csv, acc_vs_params.png and
    task_curves.png (and sweep.png with --sweep). A failed entry is recorded with its error and
    the others still run; the command then exits with status 1.
    """
    try:
        overrides = {
            "router": router,
            "train.epochs": epochs,
            "train.lr": lr,
            "train.batch_size": batch_size,
            "backbone.max_length": max_length,
            "backbone.name": backbone,
            "backbone.dtype": dtype,
            "backbone.device": device,
        }
        names = [s.strip() for s in (strategies or "").split(",") if s.strip()]
        entries = resolve_entries(names or STRATEGIES.names(), overrides, sweep)
        tasks = load_stream(stream, data_root, max_train, max_test)
        for entry in entries:
            check_task_overrides(entry.config, tasks)
        orders = resolve_orders(tasks, order or []) or None
        seed_list = parse_seeds(seeds) if seeds is not None else None
        if resume is not None and out is not None and out != resume:
            raise ContinualPeftError("give --out or --resume, not both.")
        folder = resume or out or new_run_path("runs", f"{tasks.name}-compare")
        board = compare(
            tasks, entries, folder, seed_list, orders, console=console, resume=resume is not None
        )
    except ContinualPeftError as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err, "finished entries are in the leaderboard.")
    console.print(console_leaderboard(board))
    console.print(
        f"\ncomparison folder: [bold]{folder}[/] (leaderboard.md, leaderboard.json, "
        "leaderboard.csv, acc_vs_params.png, task_curves.png; one folder per entry)"
    )
    failed = [e["label"] for e in board["entries"] if e["status"] != "finished"]
    if failed:
        total = len(board["entries"])
        _fail(f"{len(failed)} of {total} entries failed: {', '.join(failed)} (leaderboard.md)", 1)


@app.command()
def report(
    run_dir: Path = typer.Argument(
        ...,
        help="A run directory or its report.json, a grid folder or its aggregate.json, or a "
        "comparison folder or its leaderboard.json.",
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
        _fail(str(err))


@app.command()
def export(
    run: Path = typer.Option(..., help="The run directory."),
    task: str = typer.Option(..., help="The task to export."),
    format_: str = typer.Option(
        "peft",
        "--format",
        help="peft (a LoRA adapter for peft.PeftModel) or merged (a standalone HF model folder).",
    ),
    out: Path = typer.Option(..., help="Folder to write; must not exist yet or be empty."),
    backbone: str = typer.Option(None, help=MOVED_BACKBONE_HELP),
) -> None:
    """Export one task's module (and head) for use outside continual-peft."""
    try:
        path = export_task(run, task, format_, out, backbone=backbone)
    except ContinualPeftError as err:
        _fail(str(err))
    console.print(
        f"exported task {task} ({format_}) to [bold]{escape(str(path))}[/]", highlight=False
    )


@app.command()
def predict(
    run: Path = typer.Option(..., help="The run directory (trained with a router)."),
    input_: str = typer.Option(
        ..., "--input", help='JSONL with a "text" per line, or - for stdin.'
    ),
    output: Path = typer.Option(None, help="Write JSONL here instead of standard output."),
    device: str = typer.Option(None, help=DEVICE_HELP),
    dtype: str = typer.Option(
        None,
        help="Frozen weights' dtype to predict in (auto, bfloat16, float16, float32). Default: "
        "the one the run computed in (bfloat16 for a GPU run: pass float32 on a CPU).",
    ),
    backbone: str = typer.Option(None, help=MOVED_BACKBONE_HELP),
) -> None:
    """Predict task and label per input with the run's router, in batched routed forwards."""
    try:
        if saved_config(run).router == "oracle":
            raise ContinualPeftError(
                f"{run} was trained without a router (router 'oracle'), so nothing can pick a "
                "task per input: train it with --router mahalanobis (or another router: "
                "`continual-peft list routers`), or call learner.predict(texts, task=...) in "
                "Python"
            )
        if output is not None and input_ != "-" and output.resolve() == Path(input_).resolve():
            raise ContinualPeftError(
                f"--output {output} is the --input file; write the predictions to another file"
            )
        if output is not None and output.resolve().is_relative_to(run.resolve()):
            raise ContinualPeftError(
                f"--output {output} is inside the run directory {run}, whose files only the run "
                "writes; write the predictions somewhere else"
            )
        texts = read_texts(input_)  # a bad input is named before any model loads
        model = None
        if backbone is not None:  # the run's own model, moved: its fingerprint is checked
            length = saved_config(run).backbone.max_length
            model = Backbone.from_pretrained(
                backbone,
                length,
                device=device or None,
                dtype=dtype or saved_config(run).backbone.dtype,
            )
        learner = load_learner(run, model, device=device, dtype=dtype)
        rows = learner.predict_details(texts)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if output is None:
            sys.stdout.write(lines)
        else:
            atomic_write_text(output, lines)
    except ContinualPeftError as err:
        _fail(str(err))


@app.command("list")
def list_(what: str = typer.Argument(..., help=f"One of: {', '.join(LISTS)}.")) -> None:
    """List registered module kinds, strategies, routers, or the shipped stream specs."""
    if what == "modules":
        names = [f"{n}: {_summary(MODULE_KINDS.get(n))}" for n in MODULE_KINDS.names()]
    elif what == "strategies":
        names = [_strategy_summary(n) for n in STRATEGIES.names()]
        names += [_strategy_line(p) for p in sorted(shipped_folder("strategies").glob("*.toml"))]
    elif what == "routers":
        names = [f"{n}: {_summary(ROUTERS.get(n))}" for n in ROUTERS.names()]
    elif what == "streams":
        specs = [demo_spec_path(), *sorted(shipped_folder("streams").glob("*.toml"))]
        names = [_stream_line(p) for p in specs]
    else:
        _fail(f"cannot list {what!r}; choose one of: {', '.join(LISTS)}")
    for name in names:
        console.print(name, highlight=False, soft_wrap=True)


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
    return f"{_shown_path(path)}: " + ", ".join(
        f"{k} {data.get(k, LearnerConfig.__dataclass_fields__[k].default)}" for k in keys
    )
