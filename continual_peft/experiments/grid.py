"""Order x seed grids: one ordinary run per (task order, seed), then an aggregate over them.

    out_dir/
        <order>-seed<k>/     one run directory per combination (report.json, report.md, ...)
        aggregate.json       per-run metrics; mean, std and n per order and over all runs
        aggregate.md, aggregate.csv, aggregate.png

The seed is `LearnerConfig.seed`: it seeds slot and head initialisation, shuffling and dropout
(per task, independently of the task's position). The data is the same in every run: which
examples `max_train` / `max_test` keep is fixed by the stream spec's own `seed`, so runs differ
only in task order and training randomness. The std is the SAMPLE standard deviation (ddof=1)
over the n runs, shown with n; it is blank (null) for n = 1. "all" weights every run equally.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from continual_peft.backbones.text import Backbone
from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.runner import check_resumable, run_stream
from continual_peft.reports.data import is_missing, metric_stats
from continual_peft.reports.grid import console_aggregate, write_aggregate
from continual_peft.reports.run import load_report
from continual_peft.store.digests import config_differences, without_place
from continual_peft.store.io import load_versioned_json, timestamp
from continual_peft.store.rundir import check_free
from continual_peft.strategies import check_config
from continual_peft.tasks.streams import Stream

AGGREGATE_SCHEMA_VERSION = 1
# run-record key -> (where it comes from in a run's report.json: section, routing mode, metric).
# "metrics" is the run's own report; "baseline" its baseline's (only when a baseline ran).
METRIC_SOURCES: dict[str, tuple[str, str, str]] = {
    "acc": ("metrics", "oracle", "acc"),
    "bwt": ("metrics", "oracle", "bwt"),
    "forgetting": ("metrics", "oracle", "forgetting"),
    "routed_acc": ("metrics", "routed", "acc"),  # null when the run had no router
    # routed with route-or-merge's fallback (rejected or unsure rows through the merged slot)
    "route_or_merge_acc": ("metrics", "route_or_merge", "acc"),
    "baseline_acc": ("baseline", "oracle", "acc"),
    "baseline_bwt": ("baseline", "oracle", "bwt"),
    "baseline_forgetting": ("baseline", "oracle", "forgetting"),
}
ROUTING_KEYS = ("routing_acc", "routed_over_oracle", "dev_acc")  # see `routing_metrics`
STD_NOTE = "sample standard deviation (ddof=1) over the n runs; null when n < 2"
SEED_NOTE = (
    "seed = LearnerConfig.seed (slot/head init, shuffling, dropout); the data subset is fixed "
    "by the stream spec's own seed, identical in every run"
)


def parse_seeds(text: str) -> list[int]:
    """Seeds from a comma-separated list such as "0,1,2" (each at most once)."""
    items = [item.strip() for item in text.split(",")]
    seeds = []
    for item in items:
        try:
            seeds.append(int(item))
        except ValueError:
            raise ContinualPeftError(
                f"--seeds {text!r}: {item!r} is not an integer; give integers separated by "
                "commas, e.g. --seeds 0,1,2"
            ) from None
    if len(set(seeds)) != len(seeds):
        raise ContinualPeftError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def resolve_orders(stream: Stream, values: list[str]) -> list[str | list[str]]:
    """Orders from `--order` values: a named order, "all", or comma-separated names.

    A value without a comma names an order of the spec ("default" is the spec's `order`); "all"
    stands for every order of the spec's [orders] table. A comma-separated value is an explicit
    task order when every item is a task name, else a list of named orders. A task's name alone
    (or with a trailing comma, "agnews,") is a one-task order, unless an order has that name.
    """
    tasks = [task.name for task in stream.tasks]
    named = [name for name in stream.orders if name != "default"]
    choices = f"named orders: {sorted(stream.orders)}; tasks: {sorted(tasks)}"
    orders: list[str | list[str]] = []
    for value in values:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if value.strip() == "all":
            if not named:
                raise ContinualPeftError(
                    f"--order all: stream {stream.name!r} has no [orders] table; {choices}"
                )
            distinct = {}  # orders that coincide (after --exclude) run once
            for name in named:
                distinct.setdefault(tuple(stream.orders[name]), name)
            dropped = [name for name in named if name not in distinct.values()]
            if dropped:
                why = f" once {stream.excluded} are left out" if stream.excluded else ""
                warnings.warn(
                    f"--order all: order(s) {dropped} have the same tasks in the same order as "
                    f"an earlier one{why}; each distinct order runs once",
                    UserWarning,
                    stacklevel=2,
                )
            orders += list(distinct.values())
        elif "," not in value and value.strip() in stream.orders:
            orders.append(value.strip())
        elif "," not in value and value.strip() in tasks:  # one task: a one-task order
            orders.append([value.strip()])
        elif "," in value and items and all(item in tasks for item in items):
            orders.append(items)
        elif "," in value and items and all(item in stream.orders for item in items):
            orders += items
        else:
            raise ContinualPeftError(
                f"--order {value!r}: not a named order of stream {stream.name!r}, 'all', or a "
                f"comma-separated list of its tasks; {choices}"
            )
    return orders


def label_orders(stream: Stream, orders: list[str | list[str]]) -> list[tuple[str, Stream]]:
    """Each order as (unique name, reordered stream); explicit lists become custom1, custom2..."""
    labelled: list[tuple[str, Stream]] = []
    taken = set(stream.orders)
    custom = 0
    for order in orders:
        ordered = stream.with_order(order)  # checks names, duplicates and emptiness
        if isinstance(order, str):
            name = order
        else:
            custom += 1
            while f"custom{custom}" in taken:  # a spec may itself name an order "custom1"
                custom += 1
            name = f"custom{custom}"
        if name in [n for n, _ in labelled]:
            raise ContinualPeftError(f"order {name!r} is given twice; give each order once.")
        names = [t.name for t in ordered.tasks]
        same = [n for n, s in labelled if [t.name for t in s.tasks] == names]
        if same:
            why = f" once {stream.excluded} are left out" if stream.excluded else ""
            raise ContinualPeftError(
                f"order {name!r} has the same tasks in the same order as {same[0]!r}{why} "
                f"({names}); give each order once."
            )
        taken.add(name)
        labelled.append((name, ordered))
    return labelled


def run_grid(
    stream: Stream,
    config: LearnerConfig,
    orders: list[str | list[str]],
    seeds: list[int],
    out_dir: str | Path,
    baseline: str | None = None,
    console: Console | None = None,
    make_backbone: Callable[[], Backbone] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every (order, seed) combination with `run_stream`, then write the aggregate report.

    Orders are the outer loop. The aggregate is rewritten after every finished run, so if a run
    fails its error propagates and the finished runs, and an aggregate of them marked "failed",
    stay on disk.

    Args:
        stream: The tasks; orders are applied with `Stream.with_order`.
        config: The settings of every run; each run gets a copy with `seed` set.
        orders: Order names of the stream, or explicit lists of task names.
        seeds: Values of `config.seed`; see the module docstring for what they seed.
        out_dir: Gets one run directory per combination, `<order>-seed<k>/`, and aggregate.*.
        baseline: A second strategy run beside each run (see `run_stream`).
        console: Where progress and tables go.
        make_backbone: Builds a fresh backbone for each learner; from `config` if None.
        resume: Continue the grid in `out_dir` (killed, interrupted or failed) with the same
            stream, settings, orders and seeds (a difference is refused, naming it): finished
            runs are kept, each unfinished one continues from its last finished task (as
            `run --resume`), the others start.

    Returns:
        The aggregate (the contents of aggregate.json).
    """
    if not orders or not seeds:
        raise ContinualPeftError("a grid needs at least one order and one seed.")
    if len(set(seeds)) != len(seeds):
        raise ContinualPeftError(f"seeds {seeds}: a seed is listed twice")
    config = check_config(config)  # once: the runs below trust it
    labelled = label_orders(stream, orders)
    out = Path(out_dir)
    combos = [(name, ordered, seed) for name, ordered in labelled for seed in seeds]
    head = _grid_head(stream, config, baseline=baseline, seeds=seeds, labelled=labelled)
    folders = [f"{name}-seed{seed}" for name, _, seed in combos]
    _check_grid_folder(out, head, runs=folders, resume=resume)
    for name, ordered, seed in combos if resume else []:  # before the aggregate is rewritten
        if (out / f"{name}-seed{seed}").is_dir():
            check_resumable(out / f"{name}-seed{seed}", ordered)
    if console:
        console.print(f"grid directory: {out}", highlight=False, soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    write_aggregate(_aggregate(head, runs, "running"), out)  # a killed grid can be resumed
    for number, (name, ordered, seed) in enumerate(combos, start=1):
        if console:
            console.print(f"[bold]run {number}/{len(combos)}: {name}, seed {seed}[/]")
        seeded = LearnerConfig.from_dict({**config.to_dict(), "seed": seed})
        run_dir = out / f"{name}-seed{seed}"
        again = resume and run_dir.is_dir()
        try:
            run_stream(
                ordered,
                seeded,
                run_dir=run_dir,
                baseline=baseline,
                console=console,
                make_backbone=make_backbone,
                resume=again,
            )
        except BaseException as err:
            failed = {"order": name, "seed": seed, "error": f"{type(err).__name__}: {err}"}
            write_aggregate(_aggregate(head, runs, "failed", failed), out)
            raise
        runs.append(run_record(name, seed, run_dir.name, load_report(run_dir)))
        write_aggregate(_aggregate(head, runs, "running"), out)
    aggregate = _aggregate(head, runs, "finished")
    write_aggregate(aggregate, out)
    if console:
        console.print(console_aggregate(aggregate))
    return aggregate


def _grid_head(
    stream: Stream,
    config: LearnerConfig,
    *,
    baseline: str | None,
    seeds: list[int],
    labelled: list[tuple[str, Stream]],
) -> dict[str, Any]:
    """What a grid is (aggregate.json's head): what a resume must match."""
    return {
        "stream": stream.name,
        "strategy": config.strategy,
        "router": config.router,
        "baseline": baseline,
        "seeds": list(seeds),
        "orders": {name: [t.name for t in ordered.tasks] for name, ordered in labelled},
        "config": config.to_dict(),
    }


def _check_grid_folder(out: Path, head: dict[str, Any], runs: list[str], resume: bool) -> None:
    """A new grid: no grid in `out` yet and every run's folder free (before any run starts,
    not hours in). A resumed one: the same grid."""
    if resume:
        _check_same_grid(out, head)
        return
    if (out / "aggregate.json").exists():
        raise ContinualPeftError(
            f"{out} already holds a grid (aggregate.json); choose another --out, or continue "
            "it with --resume."
        )
    for name in runs:
        check_free(out / name)


def _check_same_grid(out: Path, head: dict[str, Any]) -> None:
    """Refuse resuming a grid folder with other settings than it was started with."""
    if not out.is_dir():
        raise ContinualPeftError(f"cannot resume {out}: there is no such grid folder.")
    if not (out / "aggregate.json").is_file():
        return  # killed before its first write: each run checks its own settings
    saved = load_aggregate(out)
    differences = config_differences(
        _comparable({key: saved.get(key) for key in head}), _comparable(head)
    )
    if differences:
        raise ContinualPeftError(
            f"{out} was started as another grid ({'; '.join(differences)}): resume it with the "
            "same stream, options, orders and seeds, or start a new grid."
        )


def _comparable(head: dict[str, Any]) -> dict[str, Any]:
    """A grid's head less where it computes (a grid may resume on another device)."""
    config = dict(head.get("config") or {})
    config["backbone"] = without_place(config.get("backbone"))
    return {**head, "config": config}


def grid_settings(out: str | Path, stream: Stream) -> dict[str, Any]:
    """What a grid folder was started with, to resume it on `stream`: its `config` (a
    LearnerConfig), `orders` (named orders of the stream by name, others as task lists, so
    they get the same labels), `seeds` and `baseline`."""
    saved = load_aggregate(out)
    config = LearnerConfig.from_dict(saved["config"], str(Path(out) / "aggregate.json"))
    named = stream.orders
    orders = [
        name if named.get(name) == tasks else tasks for name, tasks in saved["orders"].items()
    ]
    seeds, baseline = saved["seeds"], saved["baseline"]
    return {"config": config, "orders": orders, "seeds": seeds, "baseline": baseline}


def run_record(order: str, seed: int, run_dir: str, report: dict[str, Any]) -> dict[str, Any]:
    """One run's row of the aggregate: its order, seed, folder and final metrics (fractions)."""
    record: dict[str, Any] = {
        "order": order,
        "tasks": list(report["task_names"]),
        "seed": seed,
        "run_dir": run_dir,  # relative to the grid folder
        "status": report["status"],
    }
    for key, (section, mode, metric) in METRIC_SOURCES.items():
        source = report.get(section) or {}
        if section == "baseline":
            source = source.get("metrics") or {}
        value = (source.get(mode) or {}).get(metric)
        if section == "metrics" or report.get("baseline"):
            record[key] = None if is_missing(value) else float(value)
    for key, value in routing_metrics(report).items():
        record[key] = None if is_missing(value) else float(value)
    return record


def routing_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """A report's final routing accuracy (mean over tasks of the routing matrix's last row),
    routed ACC / oracle ACC, and dev ACC (the mean over tasks of the oracle accuracy on each
    task's dev split after the last task, only when every task has one); None where not
    measured."""
    rows = report.get("routing_accuracy") or []
    last = [v for v in (rows[-1] if rows else []) if not is_missing(v)]
    dev = report.get("dev") or {}
    whole = sorted(dev.get("tasks") or []) == sorted(report.get("task_names") or [])
    return {
        "routing_acc": float(np.mean(last)) if last else None,
        "routed_over_oracle": report.get("routed_over_oracle"),
        "dev_acc": dev.get("acc") if whole else None,  # a dev ACC over some tasks ranks nothing
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and n of every metric, per order and over all runs.

    Args:
        runs: Run records (`run_record`): each has "order" and metric keys (null = not measured,
            left out of that metric's n).

    Returns:
        {"std": how std is computed, "overall": {metric: {mean, std, n}}, "by_order": {order:
        {metric: {mean, std, n}}}}; orders in the order they first appear.
    """
    keys = [key for key in [*METRIC_SOURCES, *ROUTING_KEYS] if any(key in run for run in runs)]
    orders = list(dict.fromkeys(run["order"] for run in runs))
    return {
        "std": STD_NOTE,
        "overall": metric_stats(runs, keys),
        "by_order": {
            name: metric_stats([r for r in runs if r["order"] == name], keys) for name in orders
        },
    }


def _aggregate(
    head: dict[str, Any], runs: list[dict], status: str, failed: dict | None = None
) -> dict[str, Any]:
    return {
        "schema_version": AGGREGATE_SCHEMA_VERSION,
        "kind": "aggregate",
        "status": status,
        "updated": timestamp(),
        **head,
        "seed_note": SEED_NOTE,
        "runs": list(runs),
        "summary": summarise(runs),
        "failed": failed,
    }


def load_aggregate(path: str | Path) -> dict[str, Any]:
    """Read a grid's aggregate.json (pass the grid folder or the file)."""
    return load_versioned_json(
        path, "aggregate", AGGREGATE_SCHEMA_VERSION, "pass a grid folder from --seeds/--order."
    )
