"""Compare strategies on one stream: the same tasks, backbone, budget, seeds and orders for all.

    out_dir/
        <entry>/             one run directory per entry, or a grid folder (order x seed)
        leaderboard.json     every entry: ACC, BWT, forgetting, routed ACC, trainable parameters,
                             train/eval seconds (mean, sample std, n), curves, status, runs
        leaderboard.md, leaderboard.csv, acc_vs_params.png, task_curves.png
        sweep.png            with a sweep: ACC against parameters and against the swept value

The leaderboard is rewritten after every entry. An entry that fails is recorded as failed with its
error and the others still run; `compare` returns normally (the CLI then exits with status 1).
Trainable parameters: see `PARAMETER_RULE`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from continual_peft.backbones.text import Backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.entries import (
    BUDGET_KEYS,
    Entry,
    common_budget,
    entry_from,
    override,
)
from continual_peft.experiments.grid import (
    STD_NOTE,
    label_orders,
    run_grid,
    run_record,
)
from continual_peft.experiments.runner import check_resumable, run_stream
from continual_peft.metrics import METRIC_DEFINITIONS
from continual_peft.reports.data import is_missing, matrix_of, metric_stats
from continual_peft.reports.leaderboard import console_leaderboard, write_leaderboard
from continual_peft.reports.run import load_report
from continual_peft.store.checkpoint import CHECKPOINT_FILE
from continual_peft.store.io import load_safetensors, load_versioned_json, nan_to_none, timestamp
from continual_peft.store.rundir import check_free
from continual_peft.strategies import NO_SLOT, STRATEGIES, check_config
from continual_peft.tasks.streams import Stream

LEADERBOARD_SCHEMA_VERSION = 1
ENTRY_METRICS = (
    "acc",
    "bwt",
    "forgetting",
    "routed_acc",
    "route_or_merge_acc",
    "routing_acc",
    "routed_over_oracle",
    "dev_acc",
    "trainable_parameters",
    "stored_parameters",
    "train_seconds",
    "eval_seconds",
)
PARAMETER_RULE = (
    "trainable parameters = every parameter trained over the whole stream, from the report's "
    "per-task records: each slot counted once, at the largest count of any task trained on it "
    "(record's trainable_parameters minus that task's head), plus every task's head (its "
    "head.safetensors). per_task: T x (slot + head); a shared-slot strategy (seq): one slot + "
    "T heads; linear_probe (no slot): T heads."
)
STORED_RULE = (
    "stored parameters = every number the run's final checkpoint holds in its safetensors "
    "files: slots (a merged slot too), heads, the router's statistics and the strategy's state "
    "(a replay buffer's token ids, EWC's Fisher, InfLoRA's subspace bases)"
)
TIME_RULE = "train/eval seconds: sums over the tasks of a run (per-task records)"


def compare(
    stream: Stream,
    entries: Sequence[Entry | str],
    out_dir: str | Path,
    seeds: list[int] | None = None,
    orders: list[str | list[str]] | None = None,
    console: Console | None = None,
    make_backbone: Callable[[], Backbone] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every entry on `stream` into `out_dir/<entry>/`, then write the leaderboard.

    Everything is checked before the first run: entries, the shared budget, orders and folders.

    Args:
        stream: The tasks (their max_train / max_test subsets are the same for every entry).
        entries: `Entry`s (see `resolve_entries`), or strategy names / spec files.
        out_dir: Gets one folder per entry and the leaderboard files.
        seeds: Seeds for every entry; None = the entries' common `seed`.
        orders: Orders for every entry; None = the stream's order. More than one order x seed
            combination runs each entry as a grid (`run_grid`): mean ± sample std.
        console: Where progress, each run's tables and the leaderboard go.
        make_backbone: Builds a fresh backbone for each learner; from each config if None.
        resume: Continue the comparison in `out_dir` (killed, interrupted, or with failed
            entries), given the same stream, entries and budget: finished entries are kept,
            each unfinished run continues from its last finished task (as `run --resume`).
            An unfinished order x seed grid entry is run again only if its folder holds no run.

    Returns:
        The leaderboard (the contents of leaderboard.json).
    """
    plan = _plan(stream, entries, out=Path(out_dir), seeds=seeds, orders=orders, resume=resume)
    plan.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for number, entry in enumerate(plan.entries, start=1):
        if console:
            where = entry.spec or "default config"
            console.rule(f"[bold]strategy {number}/{len(plan.entries)}: {entry.label}[/] ({where})")
        try:
            runs = _run_entry(entry, plan, console, make_backbone)
            results.append(_result(entry, runs, "finished"))
        except KeyboardInterrupt:
            results.append(_result(entry, [], "failed", "interrupted"))
            write_leaderboard(leaderboard(plan.head, results, "interrupted"), plan.out)
            raise
        except Exception as err:  # one broken entry must not cost the others their runs
            results.append(_result(entry, [], "failed", f"{type(err).__name__}: {err}"))
            if console:
                console.print(f"[bold red]{entry.label} failed:[/] {err}; continuing")
        board = leaderboard(plan.head, results, "running")
        write_leaderboard(board, plan.out)
        if console and number < len(plan.entries):  # the caller prints the final board
            console.print(console_leaderboard(board))
    board = leaderboard(plan.head, results, "finished")
    write_leaderboard(board, plan.out)
    return board


@dataclass(kw_only=True)
class _Plan:
    """A checked comparison: what runs where."""

    entries: list[Entry]
    stream: Stream  # its orders include the one it is in
    orders: list[str | list[str]]  # as given to run_grid
    labelled: list[tuple[str, Stream]]  # (order name, reordered stream)
    seeds: list[int]
    out: Path
    head: dict[str, Any]  # comparison-wide facts for the leaderboard
    resume: bool = False


def _plan(stream, entries, *, out, seeds, orders, resume=False) -> _Plan:
    """Check everything before the first run: entries, the shared budget, orders, folders."""
    chosen = [e if isinstance(e, Entry) else entry_from(e) for e in entries]
    # checked once, here: the runs below trust these configs (the caller's entries unchanged)
    chosen = [replace(e, config=check_config(e.config, e.label)) for e in chosen]
    if not chosen:
        raise ContinualPeftError("a comparison needs at least one entry.")
    if len({e.label for e in chosen}) != len(chosen):
        raise ContinualPeftError(f"entry labels repeat: {[e.label for e in chosen]}")
    swept = {e.sweep["key"] for e in chosen if e.sweep}
    if swept:
        check_dev(stream, f"--sweep {sorted(swept)[0]}")
    keys = [k for k in [*BUDGET_KEYS, *(["seed"] if seeds is None else [])] if k not in swept]
    budget = common_budget(chosen, keys)
    seeds = list(seeds) if seeds is not None else [budget["seed"]]
    if orders is None:  # the stream's own order, named (a hand-built Stream names none)
        names = [t.name for t in stream.tasks]
        stream = replace(stream, orders={**stream.orders, stream.order_name: names})
        orders = [stream.order_name]
    labelled = label_orders(stream, orders)
    if resume and not (out / "leaderboard.json").exists():
        raise ContinualPeftError(f"cannot resume {out}: it holds no comparison (leaderboard.json).")
    if not resume and (out / "leaderboard.json").exists():
        raise ContinualPeftError(
            f"{out} already holds a comparison; choose another --out, or continue it with --resume."
        )
    for entry in chosen:
        if not resume:
            check_free(out / entry.label)
    budget |= {"max_train": _largest(stream, "train"), "max_test": _largest(stream, "test")}
    head = {
        "stream": stream.name,
        "tasks": [t.name for t in stream.tasks],
        "seeds": seeds,
        "orders": {name: [t.name for t in s.tasks] for name, s in labelled},
        "budget": budget,
        "sweep": next(({"key": k} for k in swept), None),
        "planned": [e.label for e in chosen],  # every entry, run or not yet
        "data": stream.protocol,
    }
    if resume:
        _check_same_comparison(out, head, [e.label for e in chosen])
        for entry in chosen:  # every run against the stream, before any file is rewritten
            single = len(labelled) * len(seeds) == 1
            for name, ordered in labelled:
                for seed in seeds:
                    folder = out / entry.label / ("" if single else f"{name}-seed{seed}")
                    if folder.is_dir():
                        check_resumable(folder, ordered)
    return _Plan(
        entries=chosen,
        stream=stream,
        orders=orders,
        labelled=labelled,
        seeds=seeds,
        out=out,
        head=head,
        resume=resume,
    )


def check_dev(stream: Stream, why: str) -> None:
    """Refuse choosing on a dev split that some task lacks (before anything trains)."""
    lacking = [task.name for task in stream.tasks if not task.dev_inputs]
    if lacking:
        raise ContinualPeftError(
            f"{why} chooses its setting on the dev split, but task(s) {lacking} of stream "
            f"{stream.name!r} have none (choosing on the test set would overstate the winner): "
            "carve one from the training data with --dev-share 0.1 (load_stream(dev_share=0.1)), "
            "set dev_share in the stream spec, or give each task a dev file."
        )


def _check_same_comparison(out: Path, head: dict[str, Any], labels: list[str]) -> None:
    """Refuse resuming with another stream, budget, seeds, orders or entries than the run had."""
    saved = load_leaderboard(out / "leaderboard.json")
    keys = ("stream", "tasks", "seeds", "orders", "sweep")
    same = json.loads(json.dumps(head))  # as it reads back from JSON (tuples become lists)
    keys += ("data",) if "data" in saved else ()  # comparisons started before recorded none
    differ = [
        f"{k}: {saved.get(k)!r} in it, {same[k]!r} here" for k in keys if saved.get(k) != same[k]
    ]
    budget, given = saved.get("budget") or {}, same["budget"]
    for key in sorted(set(budget) | set(given)):
        if budget.get(key) != given.get(key):
            differ.append(f"budget {key}: {budget.get(key)!r} in it, {given.get(key)!r} here")
    had = saved.get("planned") or [entry["label"] for entry in saved.get("entries", [])]
    if sorted(had) != sorted(labels):
        differ.append(f"entries {sorted(had)} in it, {sorted(labels)} here")
    if differ:
        what = "; ".join(differ)
        raise ContinualPeftError(
            f"{out} was started as another comparison ({what}); resume it with the same "
            "stream, --strategies and budget options, or start a new one with another --out."
        )


def _largest(stream: Stream, split: str) -> int:
    """The most examples any task has in `split` (what --max-train / --max-test left)."""
    return max((len(getattr(t, f"{split}_inputs")) for t in stream.tasks), default=0)


def _run_entry(entry: Entry, plan: _Plan, console, make_backbone) -> list[dict]:
    """Train one entry (a run, or a grid for several orders/seeds); its runs' records."""
    folder = plan.out / entry.label
    if len(plan.labelled) * len(plan.seeds) == 1:
        (name, ordered), seed = plan.labelled[0], plan.seeds[0]
        config = override(entry.config, {"seed": seed}, entry.label)
        again = plan.resume and folder.is_dir()  # continued from its last finished task
        run_stream(
            ordered, config, folder, console=console, make_backbone=make_backbone, resume=again
        )
        dirs = [(name, seed, folder)]
    else:
        aggregate = run_grid(
            plan.stream,
            entry.config,
            orders=plan.orders,
            seeds=plan.seeds,
            out_dir=folder,
            console=console,
            make_backbone=make_backbone,
            resume=plan.resume and folder.is_dir(),
        )
        dirs = [(run["order"], run["seed"], folder / run["run_dir"]) for run in aggregate["runs"]]
    return [
        run_row(
            load_report(d),
            run_head_parameters(d),
            order=name,
            seed=seed,
            run_dir=str(d.relative_to(plan.out)),
            stored=stored_parameters(d),
        )
        for name, seed, d in dirs
    ]


def _result(entry: Entry, runs: list[dict], status: str, error: str | None = None) -> dict:
    config = entry.config
    # a strategy whose tasks open no slot (linear_probe) trains no module, whatever the config
    no_module = not STRATEGIES.get(config.strategy).trains_modules
    return {
        "label": entry.label,
        "strategy": config.strategy,
        "spec": entry.spec,
        "module": "none" if no_module else config.module,
        "router": config.router,
        "lr": config.train.lr,
        "sweep": entry.sweep,
        "base": entry.base or entry.label,
        "run_dir": entry.label,
        "status": status,
        "error": error,
        "runs": runs,
    }


def run_head_parameters(run_dir: str | Path) -> dict[str, int]:
    """Parameters of each task's head in a run directory (tasks/<task>/head.safetensors)."""
    heads = {}
    for path in sorted(Path(run_dir).glob("tasks/*/head.safetensors")):
        heads[path.parent.name] = sum(t.numel() for t in load_safetensors(path).values())
    return heads


def parameter_counts(report: dict[str, Any], head_parameters: dict[str, int]) -> dict[str, Any]:
    """Trainable parameters of a run by part: {"slots": {slot: n}, "heads": n, "total": n}.

    Args:
        report: A run's report (its per-task records: name, slot, trainable_parameters).
        head_parameters: Each task's head size (`run_head_parameters`).
    """
    slots: dict[str, int] = {}
    heads = 0
    for record in report.get("tasks") or []:
        if record["name"] not in head_parameters:
            raise ContinualPeftError(f"no head size for task {record['name']!r}")
        head = head_parameters[record["name"]]
        heads += head
        if record["slot"] == NO_SLOT:  # its head alone trained (linear_probe)
            continue
        slot = str(record["slot"])
        slots[slot] = max(slots.get(slot, 0), record["trainable_parameters"] - head)
    return {"slots": slots, "heads": heads, "total": sum(slots.values()) + heads}


def stored_parameters(run_dir: str | Path) -> int | None:
    """Numbers held by the safetensors files a run's `checkpoint.json` lists (`STORED_RULE`);
    None when the run has no checkpoint (it failed before its first task ended)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    files = json.loads(path.read_text(encoding="utf-8")).get("files") or {}
    tensors = [Path(run_dir) / name for name in files if name.endswith(".safetensors")]
    return sum(t.numel() for file in tensors for t in load_safetensors(file).values())


def total_trainable_parameters(report: dict[str, Any], head_parameters: dict[str, int]) -> int:
    """Every parameter trained over the stream, each shared slot once (see `PARAMETER_RULE`)."""
    return parameter_counts(report, head_parameters)["total"]


def run_row(
    report: dict[str, Any],
    head_parameters: dict[str, int],
    *,
    order: str,
    seed: int,
    run_dir: str,
    stored: int | None = None,
) -> dict[str, Any]:
    """One run's leaderboard record: the grid's run record plus parameters, times and curves."""
    row = run_record(order, seed, run_dir, report)
    counts = parameter_counts(report, head_parameters)
    records = report.get("tasks") or []
    matrix = matrix_of(report, "oracle") if report.get("task_names") else np.zeros((0, 0))
    seen = [float(np.nanmean(matrix[i, : i + 1])) for i in range(len(records))]
    return {
        **row,
        "trainable_parameters": counts["total"],
        "stored_parameters": stored,
        "parameters": counts,
        "train_seconds": float(sum(r["train_seconds"] for r in records)),
        "eval_seconds": float(sum(r["eval_seconds"] for r in records)),
        "seen_acc": seen,  # mean accuracy over the tasks seen so far, after each task
        "matrix": nan_to_none(matrix),
    }


def _mean_curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (over runs, by task position) of the seen-task accuracy and of R."""
    if not runs or len({len(r["seen_acc"]) for r in runs}) != 1:
        return {"seen_acc": [], "matrix": [], "tasks": []}
    stack = np.array(
        [[[np.nan if is_missing(v) else v for v in row] for row in r["matrix"]] for r in runs],
        dtype=float,
    )  # (runs, T, T)
    measured = (~np.isnan(stack)).sum(axis=0)
    matrix = np.where(measured > 0, np.nansum(stack, axis=0) / np.maximum(measured, 1), np.nan)
    orders = {tuple(r["tasks"]) for r in runs}
    return {
        "seen_acc": np.mean([r["seen_acc"] for r in runs], axis=0).tolist(),
        "matrix": nan_to_none(matrix),
        "tasks": list(runs[0]["tasks"]) if len(orders) == 1 else [],  # [] = positions only
    }


def leaderboard(
    head: dict[str, Any], results: list[dict[str, Any]], status: str = "finished"
) -> dict[str, Any]:
    """The leaderboard (contents of leaderboard.json) from each entry's runs; pure.

    Args:
        head: Comparison-wide facts (stream, tasks, seeds, orders, budget, sweep).
        results: Per entry: label, strategy, spec, module, router, sweep, base, run_dir, status,
            error and "runs" (`run_row` records; none for a failed entry).
        status: "running", "finished" or "interrupted".

    Returns:
        Entries with mean/std/n per metric (`ENTRY_METRICS`), sorted by mean dev ACC when every
        finished entry has one, else by mean (test) ACC (highest first; failed entries last),
        and ranked; "ranked_by" says which. With a sweep, "chosen" names, per swept entry, the
        value with the best mean dev ACC beside its test ACC.
    """
    entries = []
    for result in results:
        runs = result.get("runs") or []
        entry = {**result, **metric_stats(runs, list(ENTRY_METRICS)), "curves": _mean_curves(runs)}
        entries.append(entry)
    finished = [e for e in entries if e["status"] == "finished"]
    on_dev = bool(finished) and all(not is_missing(e["dev_acc"]["mean"]) for e in finished)
    ranked_by = "dev_acc" if on_dev else "acc"
    entries.sort(key=lambda entry: _sort_key(entry, ranked_by))
    for rank, entry in enumerate(entries, start=1):
        entry["rank"] = rank
    definitions = {k: METRIC_DEFINITIONS[k] for k in ("acc", "bwt", "forgetting", "routing")}
    definitions |= {k: METRIC_DEFINITIONS[k] for k in ("routing_accuracy", "dev")}
    definitions |= {"trainable_parameters": PARAMETER_RULE, "stored_parameters": STORED_RULE}
    definitions |= {"seconds": TIME_RULE, "std": STD_NOTE}
    return {
        "schema_version": LEADERBOARD_SCHEMA_VERSION,
        "kind": "leaderboard",
        "status": status,
        "updated": timestamp(),
        **head,
        "definitions": definitions,
        "ranked_by": ranked_by,
        "chosen": chosen_on_dev(entries) if head.get("sweep") else [],
        "entries": entries,
    }


def _sort_key(entry: dict[str, Any], key: str) -> tuple:
    value = entry[key]["mean"]
    return (entry["status"] != "finished", is_missing(value), -(value or 0.0))


def chosen_on_dev(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per swept entry (its `base`), the sweep point with the best mean dev ACC among the
    finished ones (the first in sweep order on a tie), with its mean test ACC beside it:
    the setting a clean protocol reports."""
    chosen = []
    for base in dict.fromkeys(e["base"] for e in entries if e.get("sweep")):
        points = [
            e
            for e in entries
            if e["base"] == base
            and e.get("sweep")
            and e["status"] == "finished"
            and not is_missing(e["dev_acc"]["mean"])
        ]
        if not points:
            continue
        best = max(points, key=lambda e: e["dev_acc"]["mean"])
        chosen.append(
            {
                "base": base,
                "label": best["label"],
                "key": best["sweep"]["key"],
                "value": best["sweep"]["value"],
                "dev_acc": best["dev_acc"]["mean"],
                "acc": best["acc"]["mean"],
            }
        )
    return chosen


def load_leaderboard(path: str | Path) -> dict[str, Any]:
    """Read a comparison's leaderboard.json (pass the comparison folder or the file)."""
    return load_versioned_json(
        path, "leaderboard", LEADERBOARD_SCHEMA_VERSION, "pass a folder from `compare`."
    )
