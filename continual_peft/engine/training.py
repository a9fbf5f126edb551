"""One task's training loop, and batched evaluation.

Training sees only the trainable slot's and the new head's parameters; everything else is frozen
or a buffer, so earlier tasks cannot move. Batches are padded to their own longest row.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from continual_peft.backbones.text import Backbone
from continual_peft.config import TrainConfig
from continual_peft.distributed import average_gradients, shard_mean, world
from continual_peft.engine.progress import meter
from continual_peft.errors import ContinualPeftError


@dataclass(kw_only=True)
class TrainResult:
    """What one task's training did."""

    final_loss: float  # mean loss over the last epoch
    steps: int
    seconds: float
    # {"steps": [...], "loss": [...]}: mean loss over the steps since the previous point
    # (1-based step numbers, at most CURVE_POINTS points); None from other training loops
    loss_curve: dict[str, list] | None = None


CURVE_POINTS = 200


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float):
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_task(
    backbone: Backbone,
    params: list[nn.Parameter],
    count: int,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    config: TrainConfig,
    seed: int,
    adjust_loss: Callable[[torch.Tensor], torch.Tensor],
    description: str = "train",
    row_weights: np.ndarray | None = None,
) -> TrainResult:
    """Train `params` (the trainable slot and head) on one task with AdamW.

    Under torchrun each step's global batch of `config.batch_size` rows is split over the
    ranks and their gradients averaged (`continual_peft.distributed`): the same steps, on the
    same rows, as on one process.

    Args:
        backbone: The backbone, already routed to the task's slot by the caller.
        params: Everything that may change.
        count: How many training examples the task has.
        batch_loss: The task's loss (0-dim float32) on the examples at these positions
            (`TaskHeads.row_loss`: cross-entropy of the labels, or of the target tokens).
        config: Epochs, batch size, learning rate, warm-up, clipping.
        seed: Seeds shuffling and dropout, so a rerun gives the same numbers.
        adjust_loss: The strategy's `loss` hook.
        description: Progress-bar label.
        row_weights: (count,) each example's weight in a batch's mean loss (`TaskHeads.
            row_weights`); None: 1 each. Only a split batch needs them.
    """
    here = world()
    torch.manual_seed(seed if here.rank == 0 else zlib.crc32(f"{seed}/rank{here.rank}".encode()))
    order_rng = np.random.default_rng(seed)
    weights = np.ones(count) if row_weights is None else np.asarray(row_weights, dtype=float)
    per_epoch = math.ceil(count / config.batch_size)
    total = per_epoch * config.epochs
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, total, config.warmup)
    # float16 weights: gradients through them can underflow, so the loss is scaled (bfloat16
    # has float32's range and needs none; disabled, the scaler passes everything through)
    scaler = torch.amp.GradScaler(backbone.device.type, enabled=backbone.dtype == torch.float16)
    start, step, epoch_losses, curve = time.perf_counter(), 0, [], LossCurve(total)
    backbone.train()
    with meter(f"{description}: training", total, "steps") as progress:
        for _ in range(config.epochs):
            epoch_losses = []
            for rows in np.array_split(order_rng.permutation(count), per_epoch):
                loss = adjust_loss(shard_mean(rows, weights[rows], batch_loss, backbone.device))
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # not so for a rank whose share of a tiny batch is empty
                    scaler.scale(loss).backward()
                value = average_gradients(params, loss.detach())  # the step's one host sync
                if not math.isfinite(value):  # the same value on every rank: all stop alike
                    backbone.eval()
                    raise _diverged(description, value, step, config.lr)
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                epoch_losses.append(value)
                curve.add(step, value)
                progress.advance(1, loss=value)
    backbone.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        final_loss=float(np.mean(epoch_losses)),
        steps=step,
        seconds=seconds,
        loss_curve=curve.points,
    )


def _diverged(description: str, value: float, step: int, lr: float) -> ContinualPeftError:
    return ContinualPeftError(
        f"{description}: the loss became {value} at step {step}; the task was stopped and "
        f"rolled back, earlier tasks are untouched. Lower the learning rate (now {lr}) and "
        "learn the task again."
    )


class LossCurve:
    """The training loss as at most `CURVE_POINTS` points: the mean of each window of steps."""

    def __init__(self, total_steps: int) -> None:
        self.window = max(1, math.ceil(total_steps / CURVE_POINTS))
        self.total = total_steps
        self.points: dict[str, list] = {"steps": [], "loss": []}
        self.pending: list[float] = []

    def add(self, step: int, loss: float) -> None:
        """Step `step` (1-based) had loss `loss`; a full window (or the last step) adds a point."""
        self.pending.append(loss)
        if len(self.pending) == self.window or step == self.total:
            self.points["steps"].append(step)
            self.points["loss"].append(float(np.mean(self.pending)))
            self.pending = []
