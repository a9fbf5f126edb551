"""The README's CL_Benchmark table from the comparisons `benchmarks/cl_long.sh` wrote: one row per
strategy, mean ± sample std over the orders it finished (each order a comparison folder).

    python benchmarks/cl_long_table.py [OUT]     # OUT: cl_long.sh's output folder (runs/cl_long)

Every number comes from the leaderboards' per-run records (`leaderboard.json`); accuracies in %,
parameters as counted by the leaderboard's rule, seconds summed over a run's tasks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from continual_peft.experiments.compare import load_leaderboard
from continual_peft.reports.data import md_table, metric_stats
from continual_peft.reports.grid import mean_std
from continual_peft.reports.leaderboard import PERCENT_COLUMNS

# the leaderboard's own percent columns; no dev ACC: these runs choose nothing
PERCENT = tuple(column for column in PERCENT_COLUMNS if column[0] != "dev_acc")
COUNTS = (("trainable_parameters", "trainable params"), ("train_seconds", "train s"))


def runs_by_strategy(out: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Every finished run of every leaderboard under `out`, by entry label; the orders seen."""
    runs: dict[str, list[dict]] = {}
    orders: list[str] = []
    for path in sorted(out.glob("*/*/leaderboard.json")):
        board = load_leaderboard(path)
        for entry in board["entries"]:
            for run in entry.get("runs") or []:
                runs.setdefault(entry["label"], []).append(run)
                orders += [run["order"]] if run["order"] not in orders else []
    return runs, orders


def table(out: Path) -> str:
    runs, orders = runs_by_strategy(out)
    header = ["strategy", "orders", *(t for _, t, _ in PERCENT), *(t for _, t in COUNTS)]
    rows = []
    for label, mine in sorted(runs.items(), key=lambda item: -_mean(item[1], "acc")):
        stats = metric_stats(mine, [k for k, _, _ in PERCENT] + [k for k, _ in COUNTS])
        cells = [mean_std(stats[key], signed) for key, _, signed in PERCENT]
        cells += [_count(stats[key]) for key, _ in COUNTS]
        rows.append([label, ",".join(r["order"].removeprefix("order") for r in mine), *cells])
    lines = md_table(header, rows, left=2)
    note = f"orders found: {', '.join(orders)}; mean ± sample std (ddof=1) over a strategy's orders"
    return "\n".join([*lines, note]) + "\n"


def _mean(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return sum(values) / len(values) if values else 0.0


def _count(stats: dict) -> str:
    if stats["mean"] is None:
        return ""
    text = f"{stats['mean']:,.0f}"
    return text if not stats["std"] else f"{text} ± {stats['std']:,.0f}"


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cl_long")), end="")
