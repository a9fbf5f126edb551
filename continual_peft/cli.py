"""The `continual-peft` command line. Each command parses options and calls one library function."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from continual_peft import __version__
from continual_peft.backbones.placement import set_threads
from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig, load_strategy_spec
from continual_peft.engine import progress
from continual_peft.engine.evaluation import (
    console_scores,
    evaluate_records,
    evaluate_stream,
    predict_records,
)
from continual_peft.engine.loading import load_learner, saved_config
from continual_peft.errors import ContinualPeftError, Terminated
from continual_peft.experiments.compare import compare, load_leaderboard
from continual_peft.experiments.entries import override, resolve_entries
from continual_peft.experiments.grid import (
    console_aggregate,
    grid_settings,
    load_aggregate,
    parse_seeds,
    resolve_orders,
    run_grid,
)
from continual_peft.experiments.runner import check_task_overrides, run_baseline, run_stream
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules import MODULE_KINDS
from continual_peft.reports.leaderboard import console_leaderboard
from continual_peft.reports.run import console_report, load_report
from continual_peft.routers import ROUTERS
from continual_peft.store.checkpoint import task_digest
from continual_peft.store.io import atomic_write_text, check_file
from continual_peft.store.rundir import new_run_path
from continual_peft.strategies import STRATEGIES, strategy_options
from continual_peft.tasks.streams import demo_spec_path, load_stream, shipped_folder
from continual_peft.tasks.task import read_records

# An argument's help line names its value (STREAM, RUN) and says what it is; typer would add a
# raw type tag ("<path>") that options do not show once they have a metavar.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None

app = typer.Typer(
    help="Continual learning with per-task PEFT modules on a frozen backbone.",
    add_completion=False,
    rich_markup_mode=None,
)
errors = Console(stderr=True)


class _Stdout:
    """Standard output that outlives its reader (a `| head`, a `tee` or logger that died): the
    first write that finds the pipe closed says so once on stderr, and the work goes on (a run
    keeps training and writing its run directory) with its tables going nowhere."""

    broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except BrokenPipeError:
                self.broken = True
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                errors.print(
                    "warning: standard output was closed (its reader exited); the command goes "
                    "on, and its files are written as usual",
                    highlight=False,
                    soft_wrap=True,
                )
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self.write("")

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()


STDOUT = _Stdout()
console = Console(file=STDOUT)
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
THREADS_HELP = (
    "CPU threads for torch. Default 0 = auto: torch's own count (it follows OMP_NUM_THREADS), "
    "lowered to the CPUs this process may use (affinity, cgroup quota)."
)
PACKAGE = Path(__file__).resolve().parent
DATA_ROOT = typer.Option(
    None, help="Folder the stream's task paths are relative to.", metavar="PATH"
)
MAX_TRAIN = typer.Option(None, help="Training examples per task (seeded subset).", metavar="N")
MAX_TEST = typer.Option(None, help="Test examples per task (seeded subset).", metavar="N")
DEVICE = typer.Option(None, help=DEVICE_HELP, metavar="DEVICE")
THREADS = typer.Option(None, help=THREADS_HELP, metavar="N")
# options predict and eval share
BATCH_SIZE = typer.Option(
    None, help="Inputs per forward pass. Default: the run's eval_batch_size.", metavar="N"
)
INFER_DTYPE = typer.Option(
    None,
    help="Frozen weights' dtype to compute in (auto, bfloat16, float16, float32). Default: the "
    "one the run computed in (bfloat16 for a GPU run: pass float32 on a CPU).",
    metavar="DTYPE",
)
MOVED_BACKBONE = typer.Option(None, help=MOVED_BACKBONE_HELP, metavar="PATH")


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,
        callback=lambda given: _version(given),
    ),
) -> None:
    """Continual learning with per-task PEFT modules on a frozen backbone.

    Paths given on the command line are relative to the current directory; paths inside a
    stream spec are relative to the spec's folder (or --data-root). Shipped strategy and stream
    names (`list strategies`, `list streams`) are found wherever you stand.
    """
    warnings.formatwarning = _format_warning
    progress.configure("lines")  # a live bar on a terminal, a line every 30 s in a log file


def _version(given: bool) -> None:
    if given:
        console.print(f"continual-peft {__version__}", highlight=False)
        raise typer.Exit()


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
    if strategy is not None and Path(strategy).is_dir():
        check_file(strategy, "strategy spec file", "give a strategy name or a .toml spec")
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


@app.command(short_help="Learn a stream of tasks; checkpoints and a report after each.")
@_stop_signals()
def run(
    stream: Path = typer.Argument(
        None, help="Stream spec (TOML). Default: the embedded demo stream.", metavar="STREAM"
    ),
    strategy: str = typer.Option(
        None,
        help="Strategy name (see `list strategies`; a name with a shipped spec of its own, "
        "l2p, runs with that spec) or spec file. Default: per_task.",
        metavar="NAME|FILE",
    ),
    module: str = typer.Option(None, help="Module kind (see `list modules`).", metavar="KIND"),
    data_root: Path = DATA_ROOT,
    out: Path = typer.Option(
        None,
        help="Run directory (grid folder for a grid). Default: runs/<time>-<stream>[-grid].",
        metavar="PATH",
    ),
    baseline: str = typer.Option(
        "auto",
        help="Also run this strategy for comparison; 'none' to skip, "
        "'auto' = seq on the demo stream, none otherwise (with --resume: the run's own).",
        metavar="TEXT",
    ),
    max_train: int = MAX_TRAIN,
    max_test: int = MAX_TEST,
    router_train: int = typer.Option(
        None,
        help="Training inputs per task that fit the router (default: the slot's).",
        metavar="N",
    ),
    epochs: int = typer.Option(None, metavar="N", help="Passes over each task's training set."),
    lr: float = typer.Option(None, metavar="LR", help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(None, metavar="N", help="Training examples per step."),
    rank: int = typer.Option(None, metavar="R", help="LoRA rank."),
    seed: int = typer.Option(
        None, help="Seeds slot/head init, shuffling and dropout.", metavar="N"
    ),
    order: list[str] = typer.Option(
        None,
        help="Task order; repeat for several. A named order of the spec ('default' = its "
        "`order`), 'all' (every order of the spec's orders table), names joined by commas "
        "(order1,order2), or an explicit order of tasks joined by commas "
        "(dbpedia,amazon,agnews,yelp).",
        metavar="TEXT",
    ),
    seeds: str = typer.Option(
        None,
        help="Seeds joined by commas, e.g. 0,1,2. More than one order x seed combination runs "
        "a grid: one run per combination in --out/<order>-seed<k>/, plus aggregate.json/.md/"
        ".csv/.png (mean ± sample std).",
        metavar="TEXT",
    ),
    router: str = typer.Option(
        None, help="Router (see `list routers`); default oracle.", metavar="NAME"
    ),
    max_length: int = typer.Option(None, help="Longest input in tokens.", metavar="N"),
    backbone: str = typer.Option(
        None, help="Model folder or name. Default: bundled all-MiniLM-L6-v2.", metavar="PATH"
    ),
    dtype: str = typer.Option(None, help=DTYPE_HELP, metavar="DTYPE"),
    device: str = DEVICE,
    threads: int = THREADS,
    resume: Path = typer.Option(
        None,
        help="Continue this run directory (or grid folder) from its last finished task (after "
        "a crash, kill or Ctrl-C), with the same stream arguments; the configuration is the "
        "run's own, and options that contradict it are refused. A run that lost or damaged a "
        "file is rolled back to the newest task whose files are intact and re-trained from "
        "there. A finished run: nothing to do.",
        metavar="PATH",
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
            "backbone.threads": threads,
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
        if rank is not None and "lora" not in {config.module, *config.task_modules.values()}:
            raise ContinualPeftError(
                f"--rank {rank} sets the LoRA rank, but this run trains {config.module} slots "
                "(no LoRA): leave --rank out, or choose --module lora."
            )
        orders = resolve_orders(tasks, order or []) or started.get("orders") or [tasks.order_name]
        seed_list = parse_seeds(seeds) if seeds is not None else [config.seed]
        seed_list = started.get("seeds", seed_list) if seeds is None and seed is None else seed_list
        grid = grid or len(orders) * len(seed_list) > 1
        if grid and resume is not None and not started:
            raise ContinualPeftError(
                f"{resume} is one run, and --resume continues it as it was: leave out --order "
                "and --seeds (several make a grid; start one with --out)."
            )
        errors.print(f"torch threads: {set_threads(config.backbone.threads)}", highlight=False)
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
            f"\nrun directory: [bold]{run_dir}[/] (report.md, report.json, accuracy_matrix.png, "
            "loss_curves.png)"
        )


@app.command("compare", short_help="Run several strategies on one stream; write a leaderboard.")
@_stop_signals()
def compare_(
    stream: Path = typer.Argument(
        None,
        help="Stream spec (TOML), as for `run`. Default: the embedded demo stream.",
        metavar="STREAM",
    ),
    stream_option: Path = typer.Option(
        None,
        "--stream",
        help="The stream spec, as an option (the same as the argument).",
        metavar="PATH",
    ),
    strategies: str = typer.Option(
        None,
        help="Entries joined by commas: registered strategy names (each with its single shipped "
        "spec strategies/<name>[_*].toml if there is one, else the default LoRA config) or "
        "strategy spec files (.toml). Default: every registered strategy.",
        metavar="TEXT",
    ),
    sweep: str = typer.Option(
        None,
        help="KEY=V1,V2,...: every entry once per value, e.g. lora.r=1,2,4,8,16, "
        "prompt.num_virtual_tokens=5,10, train.lr=1e-3,1e-2; adds sweep.png.",
        metavar="TEXT",
    ),
    seeds: str = typer.Option(
        None,
        help="Seeds joined by commas (each entry runs as an order x seed grid).",
        metavar="TEXT",
    ),
    order: list[str] = typer.Option(
        None,
        "--order",
        "--orders",
        help="Task order(s), as for `run --order`; repeatable.",
        metavar="TEXT",
    ),
    out: Path = typer.Option(
        None, help="Output folder. Default: runs/<time>-<stream>-compare.", metavar="PATH"
    ),
    resume: Path = typer.Option(
        None,
        help="Continue this comparison folder (after a kill or Ctrl-C), with the same stream, "
        "--strategies and budget options: finished entries are kept, unfinished runs continue "
        "from their last finished task.",
        metavar="PATH",
    ),
    data_root: Path = DATA_ROOT,
    max_train: int = MAX_TRAIN,
    max_test: int = MAX_TEST,
    epochs: int = typer.Option(
        None, metavar="N", help="Epochs for every entry (else the entries' must agree)."
    ),
    batch_size: int = typer.Option(
        None, metavar="N", help="Batch size for every entry (else the entries' must agree)."
    ),
    lr: float = typer.Option(
        None,
        metavar="LR",
        help="Learning rate for every entry, replacing each spec's own (unset: keep them).",
    ),
    router: str = typer.Option(
        None, help="Router for every entry (default: each entry's).", metavar="NAME"
    ),
    max_length: int = typer.Option(
        None, help="Longest input in tokens, for every entry.", metavar="N"
    ),
    backbone: str = typer.Option(
        None, help="Model folder or name, for every entry.", metavar="PATH"
    ),
    dtype: str = typer.Option(None, help=DTYPE_HELP, metavar="DTYPE"),
    device: str = DEVICE,
    threads: int = THREADS,
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
            "backbone.threads": threads,
        }
        if stream is not None and stream_option is not None and stream != stream_option:
            raise ContinualPeftError("give the stream spec once: as the argument or --stream.")
        stream = stream or stream_option
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
        errors.print(f"torch threads: {set_threads(threads or 0)}", highlight=False)
        console.print(f"comparison folder: {folder}", highlight=False, soft_wrap=True)
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


@app.command(short_help="Print a run's report, a grid's aggregate or a leaderboard.")
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
        _fail(str(err))


@app.command(short_help="Export one task's module and head (peft adapter or merged model).")
def export(
    run: Path = typer.Option(..., help="The run directory.", metavar="PATH"),
    task: str = typer.Option(..., help="The task to export.", metavar="NAME"),
    format_: str = typer.Option(
        "peft",
        "--format",
        help="peft (a LoRA adapter for peft.PeftModel) or merged (a standalone HF model folder).",
        metavar="TEXT",
    ),
    out: Path = typer.Option(
        ..., help="Folder to write; must not exist yet or be empty.", metavar="PATH"
    ),
    backbone: str = MOVED_BACKBONE,
) -> None:
    """Export one task's module (and head) for use outside continual-peft."""
    try:
        path = export_task(run, task, format_, out, backbone=backbone)
    except ContinualPeftError as err:
        _fail(str(err))
    console.print(
        f"exported task {task} ({format_}) to [bold]{escape(str(path))}[/]", highlight=False
    )


RUN_HELP = "The run directory."
INPUT_HELP = (
    'JSONL, one object per line: a "text", optionally a "task" (that task\'s module and head, '
    'not the router), and for eval a "label"; or - for standard input.'
)


@app.command(short_help="Predict task and label per input (the router's or a given task).")
@_stop_signals()
def predict(
    run: Path = typer.Option(..., help=RUN_HELP, metavar="PATH"),
    input_: str = typer.Option(..., "--input", help=INPUT_HELP, metavar="FILE"),
    task: str = typer.Option(
        None,
        help="Predict every input as this task (oracle routing; no router needed).",
        metavar="TEXT",
    ),
    output: Path = typer.Option(
        None, help="Write JSONL here instead of standard output.", metavar="PATH"
    ),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = INFER_DTYPE,
    backbone: str = MOVED_BACKBONE,
    threads: int = THREADS,
) -> None:
    """Predict task and label per input: through the task a line (or --task) names, else
    through the run's router, in batched routed forwards. Writes one JSON object per input:
    task, label, rejected, routing ("given" or "router"), and the router's score and topk."""
    try:
        _check_output(output, run, input_)
        learner, records = _open_run(run, input_, batch_size, device, dtype, backbone, threads)
        rows = predict_records(learner, records, task)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if output is None or str(output) == "-":
            STDOUT.write(lines)
        else:
            atomic_write_text(output, lines)
    except ContinualPeftError as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err, "nothing was written.")


@app.command("eval", short_help="Score a trained run on labelled data, without training.")
@_stop_signals()
def eval_(
    run: Path = typer.Option(..., help=RUN_HELP, metavar="PATH"),
    stream: Path = typer.Argument(
        None,
        help="A stream spec (TOML) whose tasks the run learned: each task's test set is "
        "scored. Or give --input.",
        metavar="STREAM",
    ),
    input_: str = typer.Option(None, "--input", help=INPUT_HELP, metavar="FILE"),
    task: str = typer.Option(
        None, help="With --input: every line is of this task.", metavar="NAME"
    ),
    data_root: Path = DATA_ROOT,
    max_train: int = typer.Option(
        None,
        help="As the run was given it: the test subset --max-test keeps depends on it too.",
        metavar="N",
    ),
    max_test: int = MAX_TEST,
    output: Path = typer.Option(
        None,
        help="Also write the scores here as JSON (fractions); - writes only the JSON, to "
        "standard output.",
        metavar="PATH",
    ),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = INFER_DTYPE,
    backbone: str = MOVED_BACKBONE,
    threads: int = THREADS,
) -> None:
    """Accuracy of a trained run on labelled data, without training: per task, with the task
    given (oracle) and, with a router, routed, plus routing accuracy."""
    try:
        if (stream is None) == (input_ is None):
            which = "both" if stream is not None else "neither"
            raise ContinualPeftError(
                f"got {which}: give what to evaluate on, a stream spec (its tasks' test sets) or "
                '--input FILE (JSONL with "text" and "label" per line)'
            )
        if task is not None and stream is not None:
            raise ContinualPeftError("--task goes with --input; a stream spec names its tasks")
        _check_output(output, run, input_)
        learner, records = _open_run(run, input_, batch_size, device, dtype, backbone, threads)
        if stream is not None:
            given = load_stream(stream, data_root, max_train=max_train, max_test=max_test)
            _warn_other_data(learner, given)
            scores = evaluate_stream(learner, given)
        else:
            scores = evaluate_records(learner, records, task)
        if output is not None and str(output) == "-":
            STDOUT.write(json.dumps(scores, indent=2) + "\n")
            return
        console.print(console_scores(scores))
        if output is not None:
            atomic_write_text(output, json.dumps(scores, indent=2) + "\n")
    except ContinualPeftError as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err, "nothing was written.")


def _check_output(output: Path | None, run: Path, input_: str | None) -> None:
    """Refuse an --output that cannot or must not be written, before any model loads."""
    if output is None or str(output) == "-":
        return
    if input_ not in (None, "-") and output.resolve() == Path(input_).resolve():
        raise ContinualPeftError(f"--output {output} is the --input file; write to another file")
    if output.resolve().is_relative_to(run.resolve()):
        raise ContinualPeftError(
            f"--output {output} is inside the run directory {run}, whose files only the run "
            "writes; write somewhere else"
        )
    if output.is_dir():
        raise ContinualPeftError(f"--output {output} is a folder; give a file name")
    if output.exists() and not output.resolve().is_file():
        raise ContinualPeftError(
            f"--output {output} is not a regular file (a device or pipe); for standard output "
            "give --output - (or leave --output out)"
        )
    if not output.resolve().parent.is_dir():
        raise ContinualPeftError(
            f"--output {output}: the folder {output.resolve().parent} does not exist"
        )


def _warn_other_data(learner, stream) -> None:
    """Say which of a stream's tasks are not the data the run learned (other subsets or files):
    their scores are on the data given, not on the run's test sets."""
    differ = [t.name for t in stream.tasks if t.name in learner.learned
              and task_digest(t) != learner.task_digest(t.name)]  # fmt: skip
    if differ:
        warnings.warn(
            f"task(s) {differ}: the data given is not what the run learned (another file, or "
            "other --max-train / --max-test / --data-root), so the scores are not on the run's "
            "test sets; give the run's own stream arguments to reproduce its report",
            UserWarning,
            stacklevel=2,
        )


def _open_run(run, input_, batch_size, device, dtype, backbone, threads):
    """The run's learner, ready to predict, and the records of `input_` (read first: a bad
    input is named before any model loads)."""
    saved = saved_config(run)
    records = read_records(input_) if input_ is not None else []
    saved.backbone.threads = threads or 0
    errors.print(f"torch threads: {set_threads(saved.backbone.threads)}", highlight=False)
    model = None
    if backbone is not None:  # the run's own model, moved: its fingerprint is checked
        model = Backbone.from_pretrained(
            backbone, saved.backbone.max_length, device=device or None,
            dtype=dtype or saved.backbone.dtype,
        )  # fmt: skip
    learner = load_learner(run, model, device=device, dtype=dtype)
    if batch_size is not None:
        if batch_size < 1:
            raise ContinualPeftError(f"--batch-size {batch_size}: give a positive number")
        learner.config.train.eval_batch_size = batch_size
    return learner, records


@app.command("list", short_help="List module kinds, strategies, routers or shipped streams.")
def list_(
    what: str = typer.Argument(..., help=f"One of: {', '.join(LISTS)}.", metavar="WHAT"),
) -> None:
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
