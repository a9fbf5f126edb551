"""Elastic weight consolidation (Kirkpatrick et al. 2017) on one shared slot, online form.

After each task, the diagonal of the empirical Fisher information of the shared slot's trainable
parameters is estimated on (up to `fisher_samples` of) the task's training examples: the squared
gradient of log p(true label | x) for each example on its own, averaged over examples (per
example, not per batch: a batch's mean gradient would let examples cancel). It is measured in
eval mode (no dropout) through the task's own head. Fisher accumulates over tasks as in online
EWC (Schwarz et al. 2018), and the anchor θ* is the slot after the latest task:

    F ← decay · F + F_task          θ* ← θ after the task
    loss = CE + λ/2 · Σ F (θ − θ*)²

`decay = 1` (the default) sums the Fisher of every task, which equals classic EWC's one penalty
per task whenever the anchors coincide; `decay < 1` lets older tasks' constraints fade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.distributed import shard, sum_over_ranks
from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.base import STRATEGIES
from continual_peft.strategies.examples import check_option, is_int, is_number
from continual_peft.strategies.seq import Sequential

if TYPE_CHECKING:
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task


@STRATEGIES.register("ewc")
class EWC(Sequential):
    """One shared slot held near its earlier values by a diagonal-Fisher penalty.

    Args:
        lam: λ, the penalty's weight (0 = plain `seq`).
        fisher_samples: Training examples per task used to estimate the Fisher (all if fewer).
        decay: Online-EWC factor on the Fisher of earlier tasks, in (0, 1]; 1 = plain sum.
    """

    description = "one shared slot + an EWC penalty λ/2·ΣF(θ−θ*)² (diagonal empirical Fisher)"

    def __init__(self, lam: float = 1000.0, fisher_samples: int = 200, decay: float = 1.0) -> None:
        check_option("ewc", "lam", lam, ok=is_number(lam) and lam >= 0, valid="a number >= 0")
        check_option(
            "ewc",
            "fisher_samples",
            fisher_samples,
            ok=is_int(fisher_samples) and fisher_samples >= 1,
            valid="an integer >= 1",
        )
        check_option(
            "ewc",
            "decay",
            decay,
            ok=is_number(decay) and 0 < decay <= 1,
            valid="a number in (0, 1]",
        )
        self.lam = float(lam)
        self.fisher_samples = fisher_samples
        self.decay = float(decay)
        self.fisher: list[torch.Tensor] = []  # per trainable slot parameter; [] = no task yet
        self.anchor: list[torch.Tensor] = []  # θ* after the latest task

    def penalty(self, learner: Learner) -> torch.Tensor:
        """λ/2 · Σ F (θ − θ*)² over the shared slot's trainable parameters; 0 before any task."""
        params = learner.bank.trainable_parameters()
        if not self.fisher:
            return torch.zeros((), device=learner.backbone.device)
        shapes = [tuple(p.shape) for p in params]
        if shapes != [tuple(f.shape) for f in self.fisher]:
            raise ContinualPeftError(
                f"ewc: the trainable slot's parameters {shapes} do not match the saved Fisher's "
                f"{[tuple(f.shape) for f in self.fisher]} (a different module config?)"
            )
        pairs = zip(params, self.fisher, self.anchor, strict=True)
        total = sum((f.to(p.device) * (p - a.to(p.device)).pow(2)).sum() for p, f, a in pairs)
        return self.lam / 2 * total

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        if not self.fisher or self.lam == 0:
            return loss
        return loss + self.penalty(learner)

    def after_task(self, learner: Learner, task: Task) -> None:
        fisher = self.estimate_fisher(learner, task)
        if self.fisher:
            fisher = [self.decay * old + new for old, new in zip(self.fisher, fisher, strict=True)]
        self.fisher = fisher
        self.anchor = [p.detach().clone() for p in learner.bank.trainable_parameters()]

    def estimate_fisher(self, learner: Learner, task: Task) -> list[torch.Tensor]:
        """Diagonal empirical Fisher of the trainable slot on `task`: mean over examples of the
        squared gradient of log p(true label | x), one example at a time (under torchrun each
        rank takes a share of the examples, and the sums are added up over the ranks)."""
        params = learner.bank.trainable_parameters()
        backbone, slot = learner.backbone, learner.learned[task.name].slot
        items = learner.heads.prompt_items(task.name, task.train_inputs).items
        rng = np.random.default_rng(learner.task_seed(task, "ewc-fisher"))
        count = min(self.fisher_samples, len(items))
        rows = np.sort(rng.choice(len(items), size=count, replace=False))
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = backbone.training
        backbone.eval()  # dropout off: the Fisher of the model as it will be evaluated
        try:
            with learner.bank.use_slot(slot):
                for row in rows[shard(count)].tolist():  # under torchrun, a share per rank
                    label = task.train_labels[row]  # log p of the true label (its tokens')
                    log_p = -learner.heads.row_loss([items[row]], [task.name], [label])
                    grads = torch.autograd.grad(log_p, params, allow_unused=True)
                    for total, grad in zip(fisher, grads, strict=True):
                        if grad is not None:
                            total += grad.float().pow(2)
        finally:
            backbone.train(was_training)
        sum_over_ranks(fisher)
        return [f / count for f in fisher]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not self.fisher:
            return {}, {}
        tensors = {f"fisher.{i}": f for i, f in enumerate(self.fisher)}
        tensors |= {f"anchor.{i}": a for i, a in enumerate(self.anchor)}
        return tensors, {"parameters": len(self.fisher), "lam": self.lam, "decay": self.decay}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        count = int(meta["parameters"])
        self.fisher = [tensors[f"fisher.{i}"] for i in range(count)]
        self.anchor = [tensors[f"anchor.{i}"] for i in range(count)]
