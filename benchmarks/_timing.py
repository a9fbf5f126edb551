"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(
    numerator: Callable[[], object], denominator: Callable[[], object], repeats: int = 7
) -> float:
    """Median over repeats of time(numerator) / time(denominator), the two run back to back.

    Timing the pair together keeps slow drifts of a shared machine out of the ratio.
    """
    numerator()
    denominator()
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        numerator()
        middle = time.perf_counter()
        denominator()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return statistics.median(ratios)
