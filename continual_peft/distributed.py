"""Data parallelism over the processes `torchrun` starts, with `torch.distributed`.

    torchrun --nproc_per_node 2 -m continual_peft run STREAM ...

One process per device (a rank). Every rank holds the whole frozen backbone and every slot,
head, router and strategy state, and they stay identical: each rank starts from the same seeds
and applies the same averaged gradients. What is split is the rows:

- **Training.** Each step's batch is the GLOBAL batch (`batch_size` rows, the same rows in the
  same order as on one process). It is cut into `size` contiguous shards, one per rank; each
  rank computes its shard's loss, backpropagates, and one all-reduce averages the trainable
  gradients (`average_gradients`). `shard_mean` scales each shard's mean so that the average
  of the ranks' gradients is the gradient of the global batch's mean, also with uneven shards.
- **Evaluation.** Batches (the same length-sorted batches as on one process) are dealt
  round-robin to the ranks (`map_shards`); every rank gets every answer and feature back, so
  router statistics, accuracies and matrices are the same everywhere.
- **Writing.** Rank 0 alone writes the run directory; `on_writer` runs a write there and
  hands its outcome, or its error, to every rank.

Why an all-reduce over the trainable tensors and not `DistributedDataParallel`: the trainable
parameters are a few small tensors (the slot and the head, well under 1 % of the model), a
step's loss goes through routing contexts, the heads and the strategies' extra terms (a
replayed batch is a second forward), which DDP's single wrapped forward does not see, and with
so few gradients DDP's bucketing and overlap have nothing to win: one flat all-reduce per step
is the whole cost.

Without torchrun (or with one process) every function here is the single-process identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from continual_peft.errors import ContinualPeftError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int = 0  # 0 .. size-1; rank 0 writes the run directory
    size: int = 1  # processes taking part

    @property
    def writer(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0


def world() -> World:
    """The process group in force (one process when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE), 1 without torchrun."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ContinualPeftError(
            f"WORLD_SIZE={value!r} is not a number of processes; launch with torchrun "
            "(--nproc_per_node N), or unset WORLD_SIZE"
        ) from None


def start() -> World:
    """Join the process group torchrun describes in the environment, if it started several.

    Collectives on CPU tensors (and Python objects) go through gloo, on CUDA tensors through
    NCCL, so the run's device need not be known yet; each rank's CUDA device is its LOCAL_RANK.
    Multi-node launches work through torchrun's own options (--nnodes, --rdzv-endpoint):
    nothing here depends on the node count.

    Returns:
        The world joined (rank 0 of 1 without torchrun).
    """
    if launched_size() == 1 or world().size > 1:
        return world()
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun: nothing would bound the wait
        raise ContinualPeftError(
            f"WORLD_SIZE={launched_size()} asks for several processes, but torchrun did not start "
            "this one: launch with torchrun (torchrun --nproc_per_node N -m continual_peft run "
            "...), which starts, watches and stops them together, or unset WORLD_SIZE."
        )
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as err:  # e.g. WORLD_SIZE set, but no MASTER_ADDR
        raise ContinualPeftError(
            f"WORLD_SIZE={launched_size()} asks for several processes, but this one could not "
            f"join their process group ({err}). Launch with torchrun (torchrun --nproc_per_node "
            "N -m continual_peft run ...), or unset WORLD_SIZE for one process."
        ) from None
    return world()


def check_device(device: torch.device) -> None:
    """Under torchrun, each rank computes on its own GPU (CUDA device LOCAL_RANK) or the CPU.

    Raises:
        ContinualPeftError: A CUDA device with an index (every rank would share it), or a rank
            whose LOCAL_RANK has no GPU on its node.
    """
    size = launched_size()
    if size == 1 or device.type != "cuda":
        return
    if device.index is not None:
        raise ContinualPeftError(
            f"device {device} names one GPU, but torchrun started {size} processes, each on its "
            "own GPU (CUDA device LOCAL_RANK): give --device cuda, or leave the device empty"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ContinualPeftError(
            f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start at "
            "most that many processes per node (--nproc_per_node), or compute on the CPU"
        )


def stop() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class PeerLost(ContinualPeftError):
    """Another rank of the job stopped (its error, a kill) while this one waited for it."""


@contextlib.contextmanager
def _together(what: str) -> Iterator[None]:
    """A collective: gloo and NCCL raise RuntimeError when a peer process is gone."""
    try:
        yield
    except RuntimeError as err:
        raise PeerLost(
            f"another process of this torchrun job stopped while this one waited for it ({what}); "
            "its own output says why. The tasks finished so far are saved: fix the cause, then "
            "continue with --resume, on any number of processes."
        ) from err


def shard(count: int) -> slice:
    """This rank's contiguous share of `count` positions (as `np.array_split` cuts them)."""
    here = world()
    base, extra = divmod(count, here.size)
    begin = here.rank * base + min(here.rank, extra)
    return slice(begin, begin + base + (here.rank < extra))


def shard_mean(
    rows: np.ndarray,
    weights: np.ndarray,
    mean_loss: Callable[[np.ndarray], torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """This rank's part of a global batch's weighted mean loss.

    With shard r holding weight w_r of the batch's total w, its mean loss is scaled by
    size · w_r / w: the AVERAGE over ranks of these parts (and of their gradients, which is
    what `average_gradients` forms) is then exactly the global mean, whatever the shards' sizes.

    Args:
        rows: (n,) the global batch's row positions, the same on every rank.
        weights: (n,) each row's weight in the mean: 1 per row, or its target tokens for a
            token-mean loss (`TaskHeads.row_weights`).
        mean_loss: The weighted mean loss (0-dim) of the rows at some positions.
        device: Where an empty shard's zero lives.

    Returns:
        A 0-dim tensor; a constant zero for a rank whose shard is empty.
    """
    here = world()
    if here.size == 1:
        return mean_loss(rows)
    mine = shard(len(rows))
    if mine.start == mine.stop:
        return torch.zeros((), device=device)
    share = here.size * float(np.sum(weights[mine])) / float(np.sum(weights))
    return mean_loss(rows[mine]) * share


def shared_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`total / count` over the global batch when each rank holds only its rows' parts:
    this rank's part, size · total_r / Σ count, so that the ranks' average is the global mean
    (`shard_mean` for a mean whose row count is known only after the forward).

    Args:
        total: (0-dim) this rank's sum over its rows, with gradients.
        count: (0-dim) how many rows it summed (0 is fine).
    """
    here = world()
    if here.size == 1:
        return total / count.clamp(min=1)
    counted = count.detach().clone().float()
    with _together("the row count of a batch"):
        dist.all_reduce(counted)
    return here.size * total / counted.clamp(min=1)


def average_gradients(params: list[torch.Tensor], loss: torch.Tensor) -> float:
    """Average the gradients of `params` and the loss over the ranks, in ONE all-reduce.

    A parameter no rank produced a gradient for keeps none (as on one process, so AdamW skips
    it); otherwise a rank without one counts zeros.

    Args:
        params: The trainable tensors, in the same order on every rank.
        loss: This rank's loss (0-dim): the value returned is the mean over ranks.

    Returns:
        The averaged loss (what one process would have computed for the global batch).
    """
    here = world()
    if here.size == 1:
        return loss.item()
    device = params[0].device
    parts = [
        torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.reshape(-1)
        for p in params
    ]
    present = [float(p.grad is not None) for p in params]
    flat = torch.cat([part.float().to(device) for part in parts])
    extra = torch.tensor([loss.item(), *present], dtype=torch.float32, device=device)
    flat = torch.cat([flat, extra])
    with _together("a training step's gradients"):
        dist.all_reduce(flat)
    offset = 0
    for param, part in zip(params, parts, strict=True):
        reduced = flat[offset : offset + part.numel()] / here.size
        offset += part.numel()
        if param.grad is None:
            param.grad = torch.empty_like(param)
        param.grad.copy_(reduced.view_as(param))
    value, counts = float(flat[offset]) / here.size, flat[offset + 1 :].tolist()
    for param, count in zip(params, counts, strict=True):
        if count == 0:
            param.grad = None
    return value


def map_shards(jobs: list, work: Callable[[object], T]) -> tuple[list[T], list]:
    """`work(job)` for every job, the jobs dealt round-robin over the ranks.

    Every rank gets every result back (`all_gather_object`), in job order. Results must be
    plain values (strings, numbers, CPU tensors): they travel between processes.

    Returns:
        The results, and the jobs this rank did not run (for progress counting).
    """
    here = world()
    if here.size == 1:
        return [work(job) for job in jobs], []
    mine = [_portable(work(job)) for job in jobs[here.rank :: here.size]]
    parts: list = [None] * here.size
    with _together("evaluation results"):
        dist.all_gather_object(parts, mine)
    results: list = [None] * len(jobs)
    for rank, part in enumerate(parts):
        results[rank :: here.size] = part
    others = [job for i, job in enumerate(jobs) if i % here.size != here.rank]
    return results, others


def _portable(result: T) -> T:
    """A result as it can travel: a tensor on the CPU (a CUDA tensor would land on the
    sender's device index on every rank)."""
    return result.cpu() if isinstance(result, torch.Tensor) else result


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one all-reduce per tensor)."""
    if world().size > 1:
        with _together("a sum over the processes"):
            for tensor in tensors:
                dist.all_reduce(tensor)


def same_everywhere(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place: state every rank must hold alike."""
    if world().size > 1:
        with _together("state from rank 0"):
            for tensor in tensors:
                dist.broadcast(tensor, src=0)


class WriterError(ContinualPeftError):
    """Raised on the other ranks when rank 0 failed at something only it does (writing the
    run directory); rank 0 raises, and prints, the original error."""


def on_writer(action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 only; every rank waits for it, and fails if it failed.

    Returns:
        `action()` on rank 0, None elsewhere.

    Raises:
        Whatever `action` raised, on rank 0; `WriterError` with its message on the others.
    """
    here = world()
    if here.size == 1:
        return action()
    result, failure = None, None
    if here.writer:
        try:
            result = action()
        except BaseException as err:  # every rank must hear of it, then it propagates
            failure = err
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    try:
        with _together("rank 0 writing the run directory"):
            dist.broadcast_object_list(outcome, src=0)
    except PeerLost:
        if failure is not None:
            raise failure from None  # rank 0's own error is the one to tell
        raise
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise WriterError(f"rank 0 stopped the run: {outcome[0]}")
    return result


def from_writer(value: T) -> T:
    """Rank 0's `value` on every rank (e.g. a folder name made from the clock)."""
    if world().size == 1:
        return value
    box = [value]
    with _together("a value from rank 0"):
        dist.broadcast_object_list(box, src=0)
    return box[0]
