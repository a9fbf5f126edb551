"""Which entries a re-evaluation after a task measures (`EvaluationConfig`).

By default every learned task on every test row: the full, exact matrix row. With `every = k`
the old tasks are re-evaluated after every k-th task only; with `sample = n` on a fixed sample
of at most n of their test rows, drawn once from a seed of the run's seed and the task's name,
so a task is measured on the same rows each time. The newest task (the diagonal) is always
measured on all its rows, and the last task of a known stream gets a full row on every row of
every task, so the final ACC and BWT are exact.
"""

from __future__ import annotations

import numpy as np

from continual_peft.config import EvaluationConfig

Rows = dict[str, list[int] | None]  # measured task -> its test rows (None: all of them)


def reevaluation_rows(
    settings: EvaluationConfig,
    sizes: dict[str, int],
    seeds: dict[str, int],
    *,
    last: bool,
) -> Rows:
    """The tasks measured after the newest one, and the test rows of each.

    Args:
        settings: The schedule.
        sizes: Every learned task's test rows, in learning order (the newest last).
        seeds: A seed per task (its sample's), for the old tasks at least.
        last: Whether the newest task is the last of the stream: a full row.

    Returns:
        Measured task -> its test rows in increasing order, or None for all of them; a task
        left out is not measured. In learning order.
    """
    *old, newest = sizes
    due = last or len(sizes) % settings.every == 0
    rows: Rows = {}
    for name in old if due else []:
        whole = last or not settings.sample or sizes[name] <= settings.sample
        rows[name] = None if whole else fixed_sample(sizes[name], settings.sample, seeds[name])
    rows[newest] = None
    return rows


def fixed_sample(size: int, count: int, seed: int) -> list[int]:
    """`count` of the rows 0..size-1, drawn without replacement by `seed`, in increasing order:
    the same rows for the same arguments."""
    picked = np.random.default_rng(seed).choice(size, size=count, replace=False)
    return sorted(int(i) for i in picked)


def reevaluation_record(rows: Rows, sizes: dict[str, int]) -> dict:
    """What a task's record says about its re-evaluation: how many tasks and test rows were
    run, and whether any task was measured on a sample of its rows."""
    counts = [sizes[name] if picked is None else len(picked) for name, picked in rows.items()]
    return {
        "tasks": len(rows),
        "rows": sum(counts),
        "sampled": any(picked is not None for picked in rows.values()),
    }


def schedule_note(settings: EvaluationConfig) -> str | None:
    """The schedule in words for reports; None for the default (every entry measured)."""
    if settings == EvaluationConfig():
        return None
    if settings.every == 1:
        text = "old tasks re-evaluated after every task"
    else:
        text = f"old tasks re-evaluated after every {ordinal(settings.every)} task only"
    if settings.sample:
        text += (
            f", on a fixed sample of at most {settings.sample} test rows each (the same rows "
            "each time: where a test set is larger, its entries are estimates, shown but left "
            "out of the metrics)"
        )
    text += (
        "; the newest task is always measured on all its test rows, and after the last task "
        "of a known stream every task is, on all its rows"
    )
    if settings.every > 1:
        text += "; old tasks' entries of the rows in between are not measured (blank)"
    return text + "."


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 22nd, ..."""
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{'th' if 10 <= number % 100 <= 20 else suffix}"
