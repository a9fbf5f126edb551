"""`run` and `compare`: learn a stream (one run, or a grid of orders x seeds), or several
strategies on one stream. Each parses its options and hands them to `experiments.launch`."""

from __future__ import annotations

from pathlib import Path

import typer

from continual_peft.backbones.placement import set_threads
from continual_peft.cli.base import (
    BUDGET,
    DATA_ROOT,
    DEV_SHARE,
    DEVICE,
    DTYPE_HELP,
    EXCLUDE,
    MAX_SLOTS,
    MAX_TEST,
    MAX_TRAIN,
    QUANTIZE,
    STRICT_LABELS,
    THREADS,
    StreamOptions,
    console,
    errors,
    fail,
    interrupted,
    ranks,
    stop_signals,
)
from continual_peft.distributed import World, WriterError, from_writer, start, stop
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.launch import (
    CompareRequest,
    RunRequest,
    launch,
    launch_compare,
    plan_compare,
    plan_run,
)
from continual_peft.reports.leaderboard import console_leaderboard


@stop_signals()
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
        help="Training inputs per task that fit the router (default: every one, at most 10,000).",
        metavar="N",
    ),
    exclude: list[str] = EXCLUDE,
    budget: str = BUDGET,
    dev_share: float = DEV_SHARE,
    strict_labels: bool = STRICT_LABELS,
    epochs: int = typer.Option(
        None, metavar="N", help="Passes over each task's training set (else the spec's epochs)."
    ),
    lr: float = typer.Option(None, metavar="LR", help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(None, metavar="N", help="Training examples per step."),
    rank: int = typer.Option(None, metavar="R", help="LoRA rank."),
    max_slots: int = MAX_SLOTS,
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
    reject_rate: float = typer.Option(
        None,
        help="Turn away inputs unfamiliar to every task, at most this share of a known task's "
        "new inputs (e.g. 0.02; calibrated on held-out training inputs); needs --router.",
        metavar="RATE",
    ),
    max_length: int = typer.Option(None, help="Longest input in tokens.", metavar="N"),
    backbone: str = typer.Option(
        None, help="Model folder or name. Default: bundled all-MiniLM-L6-v2.", metavar="PATH"
    ),
    dtype: str = typer.Option(None, help=DTYPE_HELP, metavar="DTYPE"),
    quantize: str = QUANTIZE,
    device: str = DEVICE,
    threads: int = THREADS,
    eval_every: int = typer.Option(
        None,
        help="Re-evaluate the old tasks after every K-th task only (the newest task always; "
        "after the last task every task): unmeasured entries are blank. Default 1.",
        metavar="K",
    ),
    eval_sample: int = typer.Option(
        None,
        help="Re-evaluate old tasks on a fixed seeded sample of at most N test rows each (the "
        "newest task and the last task's row on all rows). Default 0: every row.",
        metavar="N",
    ),
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
    overrides = {
        "module": module,
        "router": router,
        "router_options.reject_rate": reject_rate,
        "seed": seed,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "lora.r": rank,
        "max_slots": max_slots,
        "backbone.max_length": max_length,
        "backbone.name": backbone,
        "backbone.dtype": dtype,
        "backbone.quantize": quantize,
        "backbone.device": device,
        "backbone.threads": threads,
        "evaluation.every": eval_every,
        "evaluation.sample": eval_sample,
    }
    here = World()
    try:
        here = start()  # under torchrun: this process's rank; rank 0 alone prints and writes
        options = StreamOptions(
            data_root=data_root,
            max_train=max_train,
            max_test=max_test,
            router_train=router_train,
            exclude=exclude,
            budget=budget,
            dev_share=dev_share,
            strict_labels=strict_labels,
        )
        tasks = options.load(stream)
        request = RunRequest(
            stream=tasks,
            demo=stream is None,
            strategy=strategy,
            overrides=overrides,
            orders=list(order or []),
            seed=seed,
            seeds=seeds,
            baseline=baseline,
            out=out,
            resume=resume,
        )
        plan = plan_run(request)
        threads = set_threads(plan.config.backbone.threads)
        if here.writer:
            errors.print(f"torch threads: {threads}{ranks(here)}", highlight=False, soft_wrap=True)
        folder = launch(plan, console if here.writer else None)
        from_writer(None)  # every rank leaves together, once rank 0 has written the last report
    except WriterError:
        raise typer.Exit(2) from None  # rank 0 failed, and said why
    except ContinualPeftError as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        interrupted(
            err, "the tasks finished so far are saved in the run directory: continue with --resume."
        )
    finally:
        stop()
    if not here.writer:
        return
    if plan.grid:
        console.print(
            f"\ngrid directory: [bold]{folder}[/] (aggregate.md, aggregate.json, aggregate.csv, "
            "aggregate.png; one run directory per order and seed)"
        )
    else:
        console.print(
            f"\nrun directory: [bold]{folder}[/] (report.md, report.json, accuracy_matrix.png, "
            "loss_curves.png)"
        )


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
    exclude: list[str] = EXCLUDE,
    budget: str = BUDGET,
    dev_share: float = DEV_SHARE,
    strict_labels: bool = STRICT_LABELS,
    epochs: int = typer.Option(
        None,
        metavar="N",
        help="Epochs for every entry (else the spec's epochs; else the entries' must agree).",
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
    max_slots: int = typer.Option(
        None,
        help="A slot budget for every entry (each must be a per_task one): at most N slots, the "
        "two most similar merged beyond it. Default: each entry's.",
        metavar="N",
    ),
    reject_rate: float = typer.Option(
        None,
        help="Turn away inputs unfamiliar to every task, at most this share of a known task's "
        "new inputs (e.g. 0.02; calibrated on held-out training inputs), for every entry; "
        "needs a router.",
        metavar="RATE",
    ),
    max_length: int = typer.Option(
        None, help="Longest input in tokens, for every entry.", metavar="N"
    ),
    backbone: str = typer.Option(
        None, help="Model folder or name, for every entry.", metavar="PATH"
    ),
    dtype: str = typer.Option(None, help=DTYPE_HELP, metavar="DTYPE"),
    quantize: str = QUANTIZE,
    device: str = DEVICE,
    threads: int = THREADS,
) -> None:
    """Run several strategies on the same stream and budget; write a leaderboard.

    Writes one run (or grid) folder per entry, leaderboard.json/.md/.csv, acc_vs_params.png and
    task_curves.png (and sweep.png with --sweep). A failed entry is recorded with its error and
    the others still run; the command then exits with status 1.
    """
    overrides = {
        "router": router,
        "max_slots": max_slots,
        "router_options.reject_rate": reject_rate,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "backbone.max_length": max_length,
        "backbone.name": backbone,
        "backbone.dtype": dtype,
        "backbone.quantize": quantize,
        "backbone.device": device,
        "backbone.threads": threads,
    }
    try:
        if stream is not None and stream_option is not None and stream != stream_option:
            raise ContinualPeftError("give the stream spec once: as the argument or --stream.")
        names = [s.strip() for s in (strategies or "").split(",") if s.strip()]
        options = StreamOptions(
            data_root=data_root,
            max_train=max_train,
            max_test=max_test,
            exclude=exclude,
            budget=budget,
            dev_share=dev_share,
            dev_needed=sweep is not None,  # a sweep chooses its setting on the dev split
            strict_labels=strict_labels,
        )
        tasks = options.load(stream or stream_option)
        request = CompareRequest(
            stream=tasks,
            strategies=names,
            overrides=overrides,
            sweep=sweep,
            orders=list(order or []),
            seeds=seeds,
            out=out,
            resume=resume,
        )
        plan = plan_compare(request)
        errors.print(f"torch threads: {set_threads(threads or 0)}", highlight=False)
        console.print(f"comparison folder: {plan.folder}", highlight=False, soft_wrap=True)
        board = launch_compare(plan, console)
    except ContinualPeftError as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        interrupted(err, "finished entries are in the leaderboard.")
    console.print(console_leaderboard(board))
    console.print(
        f"\ncomparison folder: [bold]{plan.folder}[/] (leaderboard.md, leaderboard.json, "
        "leaderboard.csv, acc_vs_params.png, task_curves.png; one folder per entry)"
    )
    failed = [e["label"] for e in board["entries"] if e["status"] != "finished"]
    if failed:
        total = len(board["entries"])
        fail(f"{len(failed)} of {total} entries failed: {', '.join(failed)} (leaderboard.md)", 1)
