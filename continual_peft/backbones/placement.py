"""Placement: the one place that decides where (device) and in what precision (dtype) tensors live.

The backbone owns a `Placement`; every other part (heads, slots, routers, strategy state, files
read back from a run) creates and loads its tensors through it, so nothing can end up on a device
the backbone is not on. The policy (`dtype = "auto"`):

- frozen backbone weights and frozen slots are stored in the compute dtype: bfloat16 on a CUDA
  device that supports it, float32 elsewhere;
- the trainable slot and the task's head keep float32 master weights (AdamW updates float32) and
  are cast to the compute dtype in the forward;
- losses, logits for metrics, router statistics (float64) and metrics stay in full precision.

Seeded initialisation draws on the CPU (a CPU generator gives the same numbers on every machine)
and then moves: `Placement.generator` and `Placement.put`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from continual_peft.errors import ContinualPeftError

DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
MASTER_DTYPE = torch.float32  # trainable slot and head: what the optimizer updates
CPU = torch.device("cpu")


def set_threads(threads: int = 0) -> str:
    """Set torch's CPU threads and say how many and why.

    Args:
        threads: A count, or 0 for "auto": torch's own setting (which follows OMP_NUM_THREADS),
            lowered to the CPUs this process may use (`usable_cpus`, split between the
            processes torchrun starts on the node), so a shared or containerised machine is not
            oversubscribed.

    Returns:
        What was set, e.g. "2 (auto: the CPUs this process may use)".

    Raises:
        ContinualPeftError: For a negative count.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ContinualPeftError(
            f"threads = {threads!r}: give a positive number of CPU threads, or 0 for auto"
        )
    usable, shared = _own_cpus()
    if threads:
        if threads > 4 * usable:
            raise ContinualPeftError(
                f"threads = {threads} is far more than the {usable} CPU(s) this process may use"
                f"{shared}; give at most {usable} (or 0 for auto)"
            )
        torch.set_num_threads(threads)
        if threads > usable:
            return (
                f"{threads} (as asked; more than the {usable} usable CPU(s){shared}: "
                "oversubscribed)"
            )
        return f"{threads} (as asked)"
    current = torch.get_num_threads()
    if current <= usable:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        why = "OMP_NUM_THREADS" if omp.isdigit() and int(omp) > 0 else "torch's default"
        return f"{current} (auto: {why}; {usable} CPU(s) usable{shared})"
    torch.set_num_threads(usable)
    return f"{usable} (auto: the CPUs this process may use, not torch's default {current})"


def _own_cpus() -> tuple[int, str]:
    """This process's share of the usable CPUs: under torchrun the node's processes
    (LOCAL_WORLD_SIZE) split them; and a note saying so, for messages."""
    usable, processes = usable_cpus(), os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(processes) if processes.isdigit() and int(processes) > 1 else 1
    if processes == 1:
        return usable, ""
    return max(1, usable // processes), f" ({usable} shared by {processes} processes)"


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, lowered to its cgroup's CPU quota
    (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            quota = Path(quota_file).read_text().split()
            period = Path(period_file).read_text().split() if period_file else quota[1:]
        except (OSError, IndexError):
            continue
        if quota and quota[0] not in ("max", "-1") and period:
            count = min(count or 1, math.ceil(int(quota[0]) / int(period[0])))
        break
    return max(1, count or 1)


DEVICE_CHOICES = "cpu, cuda, cuda:N (N counted from 0), or empty for CUDA when present"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU, unless `device` says otherwise.

    Raises:
        ContinualPeftError: For a device that is not the CPU or a CUDA device of this machine,
            naming the choices.
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ContinualPeftError(f"unknown device {device!r}; use {DEVICE_CHOICES}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ContinualPeftError(
            f"device {device!r} is not supported (a {chosen.type} device); use {DEVICE_CHOICES}"
        )
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ContinualPeftError(
            f"device {device!r} was asked for, but torch sees no CUDA device here "
            f"(torch {torch.__version__}); use cpu, or leave the device empty"
        )
    if chosen.type == "cuda" and chosen.index is not None:
        count = torch.cuda.device_count()
        if chosen.index >= count:
            raise ContinualPeftError(
                f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return chosen


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype that `name` means on `device`.

    Args:
        name: "auto", "bfloat16", "float16" or "float32". "auto" is bfloat16 on a CUDA device
            with bfloat16 support and float32 everywhere else (on the CPU float32 is both exact
            and the fastest).

    Raises:
        ContinualPeftError: For any other name.
    """
    if name not in DTYPES:
        raise ContinualPeftError(
            f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)} (auto = bfloat16 on a "
            "CUDA device that supports it, float32 elsewhere)"
        )
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16, and so on (the names `resolve_dtype` reads)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """Where a learner's tensors live and in which dtype its frozen weights compute.

    Attributes:
        device: The backbone's device; everything else follows it.
        dtype: Compute dtype of the frozen weights and frozen slots.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, device: str | torch.device | None = None, dtype: str = "auto") -> Placement:
        """The placement for a device name (automatic when empty) and a dtype name."""
        chosen = pick_device(device)
        return cls(chosen, resolve_dtype(dtype, chosen))

    @staticmethod
    def generator(seed: int) -> torch.Generator:
        """A seeded CPU generator: initial values are drawn on the CPU, then `put` moves them."""
        return torch.Generator(device=CPU).manual_seed(int(seed))

    def tensor(self, data: object, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`torch.tensor(data)` on this device."""
        return torch.tensor(data, dtype=dtype, device=self.device)

    def zeros(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def put(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor moved here (and cast to `dtype` if given)."""
        return value.to(device=self.device, dtype=dtype)

    def module(self, module: nn.Module) -> nn.Module:
        """A small trainable module (a head) moved here, keeping float32 weights."""
        return module.to(device=self.device, dtype=MASTER_DTYPE)
