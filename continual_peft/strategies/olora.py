"""O-LoRA: a new LoRA per task, kept orthogonal to the earlier tasks' (Wang et al. 2023).

"Orthogonal Subspace Learning for Language Model Continual Learning" (EMNLP Findings 2023).
Each task trains a fresh LoRA slot while every earlier slot, frozen, stays in the forward pass
(the paper merges them into the model), and the loss gains

    λ_orth · L_orth,   L_orth = Σ_sites Σ_{j<t} ||A_j A_t^T||_F²

(the paper's Σ_{i<t} ||A_i^T A_t||², with A stored here as (r, d_in)): it pushes the rows of
the new A, the directions the new task reads its input along, out of the earlier tasks' spans.
At inference every row goes through all slots learned so far, summed at weight 1, as in the
paper, so no router chooses among slots: the task given picks only the head.

After each task the new slot's overlap with each earlier slot is measured and lands in the
task's record (report.json, `tasks[i].strategy`):

- `subspace_overlap`: mean over sites of ||Q_j^T Q_t||_F² / r, where Q are orthonormal bases of
  the row spaces of A_j and A_t: the mean squared cosine of their r principal angles. 0 means
  orthogonal subspaces, 1 the same subspace; it ignores the matrices' scale, so shrinking A_t
  alone cannot lower it. `random_overlap` is its expected value for random subspaces (r/d_in).
- `orth_penalty`: the raw Σ_sites ||A_j A_t^T||_F² term of L_orth for that earlier task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.base import STRATEGIES, Strategy

if TYPE_CHECKING:
    from continual_peft.config import LearnerConfig
    from continual_peft.strategies.base import Learner, SlotBank
    from continual_peft.tasks.task import Task


def check_summed_lora(
    config: LearnerConfig, where: str, strategy: str, why_lora: str, how_summed: str
) -> None:
    """Refuse what a strategy that sends every row through all its LoRA slots cannot work with:
    another module kind (`why_lora` says why LoRA) or a router (the slots are `how_summed`).

    Raises:
        ContinualPeftError: naming the setting and the fix.
    """
    kinds = {config.module, *config.task_modules.values()}
    if kinds != {"lora"}:
        raise ContinualPeftError(
            f"{where}: strategy {strategy!r} trains LoRA slots only ({why_lora}); got module "
            f'kind(s) {sorted(kinds)}: use module = "lora" and no per-task module'
        )
    if config.router != "oracle":
        raise ContinualPeftError(
            f"{where}: strategy {strategy!r} sends every row through all slots {how_summed}, as "
            f"in the paper, so there is no slot for a router to choose; got router "
            f'{config.router!r}: use router = "oracle"'
        )


def lora_a_stacks(bank: SlotBank) -> dict[str, torch.Tensor]:
    """Every LoRA site's A matrices (T, r, d_in) by site name; the newest slot, trainable or
    not, is last (so gradients reach it while it trains)."""
    return {name: site.stack.stacked()["lora_A"] for name, site in bank.kind_sites["lora"].items()}


def orthogonality_penalty(bank: SlotBank) -> torch.Tensor:
    """L_orth = Σ_sites Σ_{j<t} ||A_j A_t^T||_F² between the newest slot t and every earlier j."""
    terms = []
    for stack in lora_a_stacks(bank).values():
        stack = stack.float()  # a loss term: float32 whatever the slots' storage dtype
        products = torch.einsum("jrd,sd->jrs", stack[:-1], stack[-1])  # (t-1, r, r)
        terms.append(products.pow(2).sum())
    return torch.stack(terms).sum()


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of `a` and `b`
    (r, d each): 0 for orthogonal subspaces, 1 for the same one."""
    qa = torch.linalg.qr(a.double().T).Q  # (d, r) orthonormal basis
    qb = torch.linalg.qr(b.double().T).Q
    return float((qa.T @ qb).pow(2).sum() / min(a.shape[0], b.shape[0]))


@STRATEGIES.register("olora")
class OLoRA(Strategy):
    """A fresh LoRA slot per task, trained orthogonal to the earlier ones; all slots summed.

    Args:
        lam_orth: Weight λ_orth of the orthogonality loss (the paper's λ1; 0.5 there).
        lam_l2: Weight of Σ ||W||_2 over the new slot's LoRA tensors (the paper's λ2 term; 0
            turns it off).
    """

    description = "a fresh LoRA per task, orthogonal to earlier ones; every slot summed (O-LoRA)"
    no_budget = (
        "sends every row through the sum of all slots, with each new A kept orthogonal to the "
        "earlier ones: merging two slots would change every task's output and undo that "
        "orthogonality"
    )

    def __init__(self, lam_orth: float = 0.5, lam_l2: float = 0.0) -> None:
        if lam_orth < 0 or lam_l2 < 0:
            raise ValueError(f"lam_orth and lam_l2 must be >= 0, got {lam_orth} and {lam_l2}")
        self.lam_orth = float(lam_orth)
        self.lam_l2 = float(lam_l2)

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        check_summed_lora(config, where, "olora", "its penalty is on LoRA's A matrices", "summed")

    def allocate(self, learner: Learner, task: Task) -> int:
        return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind="lora")

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        slots = list(range(learner.bank.num_slots))
        return slots, [1.0] * len(slots)

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        if self.lam_orth > 0 and learner.bank.num_slots > 1:
            loss = loss + self.lam_orth * orthogonality_penalty(learner.bank).to(loss)
        if self.lam_l2 > 0:
            norms = [p.norm() for p in learner.bank.trainable_parameters()]
            loss = loss + self.lam_l2 * torch.stack(norms).sum().to(loss)
        return loss

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any]:
        learner.bank.freeze_slot()
        stacks = lora_a_stacks(learner.bank)
        earlier = [s for s in learner.learned.values() if s.task.name != task.name]
        overlap, penalty = {}, {}
        for state in earlier:
            pairs = [(stack[state.slot], stack[-1]) for stack in stacks.values()]
            overlap[state.task.name] = _mean([subspace_overlap(a, b) for a, b in pairs])
            penalty[state.task.name] = float(sum((a @ b.T).pow(2).sum() for a, b in pairs))
        random = _mean([stack.shape[1] / stack.shape[2] for stack in stacks.values()])
        return {"subspace_overlap": overlap, "orth_penalty": penalty, "random_overlap": random}


def _mean(values: list[float]) -> float:
    return round(float(sum(values) / len(values)), 6)
