"""Experience replay: one shared slot (like `seq`) plus a bounded reservoir of past examples.

After each task, every one of its training examples passes through reservoir sampling (Vitter's
algorithm R, seeded per task), so the buffer always holds a uniform sample of at most
`buffer_size` examples of all tasks seen so far. While a later task trains, each step draws a
minibatch of `replay_batch_size` buffered examples (earlier tasks only: the buffer takes a task's
examples after it is learned), runs it through the shared slot, each row through its own task's
frozen head, and mixes its cross-entropy into the step's loss:

    loss = (1 - ratio) · CE(current batch) + ratio · CE(replayed batch)

so `ratio` is the share of each step's loss that comes from replayed examples (0.5 with equal
batch sizes = the mean over the concatenated batch, as in Chaudhry et al. 2019's ER).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.strategies.base import STRATEGIES
from continual_peft.strategies.examples import (
    Examples,
    check_option,
    encoded_examples,
    examples_loss,
    is_int,
    is_number,
)
from continual_peft.strategies.seq import Sequential

if TYPE_CHECKING:
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task


@STRATEGIES.register("replay")
class Replay(Sequential):
    """One shared slot; a reservoir buffer of past examples replayed at every training step.

    Args:
        buffer_size: Most examples the buffer holds, over all tasks.
        ratio: Share of each step's loss from replayed examples, in [0, 1).
        replay_batch_size: Replayed examples per step; None = the training batch size.
    """

    description = "one shared slot + a reservoir buffer of past examples replayed at each step"

    def __init__(
        self, buffer_size: int = 200, ratio: float = 0.5, replay_batch_size: int | None = None
    ) -> None:
        check_option(
            "replay",
            "buffer_size",
            buffer_size,
            ok=is_int(buffer_size) and buffer_size >= 1,
            valid="an integer >= 1",
        )
        check_option(
            "replay",
            "ratio",
            ratio,
            ok=is_number(ratio) and 0 <= ratio < 1,
            valid="a number in [0, 1)",
        )
        batch = replay_batch_size
        check_option(
            "replay",
            "replay_batch_size",
            batch,
            ok=batch is None or (is_int(batch) and batch >= 1),
            valid="an integer >= 1, or absent for the training batch size",
        )
        self.buffer_size = buffer_size
        self.ratio = float(ratio)
        self.replay_batch_size = replay_batch_size
        self.buffer = Examples()
        self.seen = 0  # training examples offered to the reservoir so far, all tasks
        self._draws = np.random.default_rng(0)

    def before_task(self, learner: Learner, task: Task) -> None:
        self._draws = np.random.default_rng(learner.task_seed(task, "replay-draw"))

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        if not len(self.buffer) or self.ratio == 0:
            return loss
        size = min(self.replay_batch_size or learner.config.train.batch_size, len(self.buffer))
        rows = self._draws.choice(len(self.buffer), size=size, replace=False)
        replayed = examples_loss(learner, self.buffer.select(rows.tolist()))
        return (1 - self.ratio) * loss + self.ratio * replayed

    def after_task(self, learner: Learner, task: Task) -> None:
        """Offer every training example of the task to the reservoir."""
        examples = encoded_examples(learner, task.name, task.train_inputs, task.train_labels)
        rng = np.random.default_rng(learner.task_seed(task, "replay-reservoir"))
        for item, label in zip(examples.items, examples.labels, strict=True):
            self.seen += 1
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(item, label, task.name)
            else:
                slot = int(rng.integers(self.seen))  # keep with probability size / seen
                if slot < self.buffer_size:
                    self.buffer.replace(slot, item, label, task.name)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.buffer.state("buffer.")
        return tensors, {"buffer": meta, "seen": self.seen, "buffer_size": self.buffer_size}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.buffer = Examples.from_state(tensors, meta["buffer"], "buffer.")
        self.seen = int(meta["seen"])
