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
    return paired_seconds(numerator, denominator, repeats)[0]


def paired_seconds(
    numerator: Callable[[], object], denominator: Callable[[], object], repeats: int = 7
) -> tuple[float, float, float]:
    """`paired_ratio`'s median ratio, and the median seconds of the numerator and of the
    denominator over the same pairs (after one warm-up run of each)."""
    numerator()
    denominator()
    ratios, tops, bottoms = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        numerator()
        middle = time.perf_counter()
        denominator()
        end = time.perf_counter()
        ratios.append((middle - start) / (end - middle))
        tops.append(middle - start)
        bottoms.append(end - middle)
    return statistics.median(ratios), statistics.median(tops), statistics.median(bottoms)
