"""Timing helpers shared by the benchmarks, and the name of the machine they ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def resolve_device(args) -> None:
    """Set `args.torch_device` from `args.device` (the library's choice when empty) and
    `args.device` to its name; exit with the library's message for a device this machine
    lacks."""
    import sys

    from continual_peft.backbones.placement import pick_device
    from continual_peft.errors import ContinualPeftError

    try:
        args.torch_device = pick_device(args.device)
    except ContinualPeftError as err:
        sys.exit(f"error: {err}")
    args.device = str(args.torch_device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            found = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        name = found[0] if found else name
    return name


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
