"""SD-LoRA: every task's LoRA split into a frozen direction and a magnitude that keeps learning.

"SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning" (Wu et al.,
ICLR 2025, arXiv 2501.13198; code: github.com/WuYichen-97/SD-Lora-CL). At task t every wrapped
layer computes

    W = W0 + Σ_{j≤t} α_j · D_j,    D_j = ΔW_j / ||ΔW_j||_F,    ΔW_j = scale · B_j A_j

The directions D_j of earlier tasks are frozen; their magnitudes α_j keep training with every
later task; task t trains its own B_t, A_t and α_t. One scalar α per task is shared by every
site (the official code's `scaling_factor`, which starts at 0.8 there and here). At inference
every row goes through all slots, weighted by α: there is no slot for a router to choose.

How it sits in the bank: the strategy owns the magnitudes, a float32 `nn.Parameter` of shape
(T,) on the backbone's device, which trains with the task's slot and head (`parameters`).
While task t trains, each LoRA site's `gain` (per-slot multipliers the site recomputes every
forward) is α_j for the frozen slots, whose stored tensors are already unit directions, and
α_t / sqrt(||ΔW_t||_F² + ε²) for the new slot, differentiable in B_t, A_t and α_t (ε = 1e-6;
the slot starts with B = 0, so a fresh slot leaves the output unchanged). After the task, B_t
is rescaled per site so that ||scale · B_t A_t||_F = 1 and the slot is frozen: the stored slot
IS the direction D_t, and the gains go; `routing` then gives every slot with the α values as
weights, so exports (Σ_j weight_j · slot_j as one LoRA) and inference hold exactly the model
that trained. A site the task never moved (ΔW_t = 0) keeps a zero direction.

SD-LoRA-RR, the paper's rank-reduced variant, is the option `ranks`: the rank each task's LoRA
uses (rows of A and columns of B past it are zeroed when the slot opens, so they get zero
gradients and stay zero; the stored tensors keep the full r). The paper's schedule is rank 10
for tasks 1-4, 8 for tasks 5-8 and 6 from task 9 on, with r = 10: `ranks = [10, 10, 10, 10,
8, 8, 8, 8, 6]` (the same schedule sits, commented out, in the official models/sdlora.py).

Where the official code differs: it normalises an earlier direction by ||B|| · ||A|| (not
||BA||_F), trains the current task unnormalised, and builds a fresh α = 0.8 for every earlier
task each time a task starts; here the rule above holds at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.base import STRATEGIES, Strategy
from continual_peft.strategies.examples import check_option, is_int, is_number
from continual_peft.strategies.olora import check_summed_lora

if TYPE_CHECKING:
    from continual_peft.config import LearnerConfig
    from continual_peft.modules.lowrank import LowRankSite
    from continual_peft.strategies.base import Learner, SlotBank
    from continual_peft.tasks.task import Task

MAX_SCALE = 1e3  # larger magnitudes overflow float32 through a site's delta
EPS = 1e-6  # ε in α_t / sqrt(||ΔW_t||² + ε²): keeps the new slot's gain finite while B_t = 0


def delta_norm_squared(site: LowRankSite, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """||scale · B A||_F² of one slot's `tensors` at `site`, as trace((BᵀB)(AAᵀ)): two (r, r)
    products instead of the (d_out, d_in) matrix; float32, differentiable."""
    a, b = tensors["lora_A"].float(), tensors["lora_B"].float()  # (r, d_in), (d_out, r)
    scale = tensors["scale"].float()
    return (scale**2 * torch.trace((b.T @ b) @ (a @ a.T))).clamp(min=0)


def lora_sites(bank: SlotBank) -> dict[str, LowRankSite]:
    return bank.kind_sites["lora"]


@STRATEGIES.register("sdlora")
class SDLoRA(Strategy):
    """A fresh LoRA slot per task, frozen as a unit direction; every task's magnitude trains on.

    Args:
        magnitude_init: The value a new task's magnitude α starts from (0.8: the official
            code's `scaling_factor` init).
        ranks: SD-LoRA-RR: the rank each task's LoRA uses, in task order, the last value
            repeating for later tasks (each between 1 and the LoRA's r); None: every task
            uses the full r.

    Raises:
        ContinualPeftError: an option out of range (at construction), or a module kind other
            than LoRA, a router other than "oracle", a rank above the LoRA's r or float16
            weights (`check`; float16 also when a slot opens).
    """

    description = (
        "a LoRA direction per task, frozen; every task's magnitude keeps learning (SD-LoRA)"
    )
    no_budget = (
        "sends every row through all slots weighted by one trained magnitude per task over "
        "unit directions: a merged slot is no unit direction and has no single magnitude"
    )

    def __init__(self, magnitude_init: float = 0.8, ranks: list[int] | None = None) -> None:
        check_option(
            "sdlora",
            "magnitude_init",
            magnitude_init,
            ok=is_number(magnitude_init) and 0 < magnitude_init <= MAX_SCALE,
            valid=f"a number in (0, {MAX_SCALE:g}]",
        )
        check_option(
            "sdlora",
            "ranks",
            ranks,
            ok=ranks is None
            or (isinstance(ranks, list) and ranks and all(is_int(r) and r >= 1 for r in ranks)),
            valid="a non-empty list of integers >= 1 (the rank of each task's LoRA), or left out",
        )
        self.magnitude_init = float(magnitude_init)
        self.ranks = None if ranks is None else list(ranks)
        self.magnitudes: nn.Parameter | None = None  # (T,) float32: α of every slot so far
        self.training_slot = False  # between `allocate` and `after_task`: the newest slot trains

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        check_summed_lora(
            config,
            where,
            "sdlora",
            "its direction ΔW/||ΔW|| and magnitude are those of a linear low-rank delta",
            "weighted by their magnitudes",
        )
        if config.backbone.dtype == "float16":
            raise _float16_error(where)
        r = config.kind_config("lora").r
        if self.ranks is not None and max(self.ranks) > r:
            raise ContinualPeftError(
                f"{where}: strategy 'sdlora' option ranks = {self.ranks} asks for more than the "
                f"LoRA's r = {r}: lower the ranks to at most {r}, or raise [lora] r"
            )

    def rank_of(self, index: int) -> int | None:
        """The rank task number `index` (0-based) uses; None: the full r."""
        if self.ranks is None:
            return None
        return self.ranks[min(index, len(self.ranks) - 1)]

    def allocate(self, learner: Learner, task: Task) -> int:
        if learner.backbone.dtype == torch.float16:
            raise _float16_error(f"task {task.name!r}")
        bank = learner.bank
        slot = bank.add_slot(seed=learner.task_seed(task, "slot"), kind="lora")
        rank = self.rank_of(slot)
        if rank is not None:
            with torch.no_grad():
                for site in lora_sites(bank).values():
                    site.stack.trainable["lora_A"][rank:] = 0  # (r, d_in): rows past the rank
                    site.stack.trainable["lora_B"][:, rank:] = 0  # (d_out, r): columns
        device = learner.backbone.device
        earlier = (
            torch.zeros(0, dtype=torch.float32, device=device)
            if self.magnitudes is None
            else self.magnitudes.detach().to(device)
        )
        new = torch.full((1,), self.magnitude_init, dtype=torch.float32, device=device)
        self.magnitudes = nn.Parameter(torch.cat([earlier, new]))  # (T,)
        for site in lora_sites(bank).values():
            site.gain = self.gain
        self.training_slot = True
        return slot

    def gain(self, site: LowRankSite) -> torch.Tensor:
        """(T,) the slots' multipliers at `site` while the newest slot trains: α_j for the
        frozen (unit-direction) slots, α_t / sqrt(||ΔW_t||² + ε²) for the trainable one. A
        site whose trainable slot is gone (a failed task rolled back) gets 1 for every slot."""
        stack = site.stack
        if not len(stack.trainable):
            return torch.ones(stack.num_frozen, dtype=torch.float32, device=stack.scale.device)
        alphas = self.magnitudes
        assert len(alphas) == stack.num_frozen + 1, "one magnitude per slot"
        inverse = torch.rsqrt(delta_norm_squared(site, dict(stack.trainable)) + EPS**2)
        return torch.cat([alphas[:-1], alphas[-1:] * inverse])

    def parameters(self, learner: Learner) -> list[nn.Parameter]:
        return [] if self.magnitudes is None else [self.magnitudes]

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        slots = list(range(learner.bank.num_slots))
        if self.training_slot or self.magnitudes is None:  # the sites' gains carry the α's
            return slots, [1.0] * len(slots)
        return slots, [float(a) for a in self.magnitudes.detach().cpu().tolist()]

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any]:
        bank = learner.bank
        with torch.no_grad():
            for site in lora_sites(bank).values():
                tensors = dict(site.stack.trainable)
                norm = float(delta_norm_squared(site, tensors).sqrt())
                if norm > 0:  # a site the task never moved keeps a zero direction
                    tensors["lora_B"].div_(norm)
                site.gain = None
        bank.freeze_slot()
        self.training_slot = False
        alphas = self.magnitudes.detach().cpu().tolist()
        facts: dict[str, Any] = {
            "magnitudes": {
                name: round(alphas[state.slot], 6) for name, state in learner.learned.items()
            }
        }
        rank = self.rank_of(learner.learned[task.name].slot)
        if rank is not None:
            facts["rank"] = rank
        return facts

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.magnitudes is None:
            return {}, {}
        meta = {"tasks": len(self.magnitudes), "magnitude_init": self.magnitude_init}
        return {"magnitudes": self.magnitudes.detach()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "magnitudes" not in tensors:
            self.magnitudes = None
            return
        magnitudes = tensors["magnitudes"]
        if magnitudes.shape != (int(meta["tasks"]),):
            raise ContinualPeftError(
                f"sdlora: the saved magnitudes have shape {tuple(magnitudes.shape)}, not "
                f"({meta['tasks']},): the run's strategy state is damaged"
            )
        self.magnitudes = nn.Parameter(magnitudes.detach().to(torch.float32).clone())
        self.training_slot = False


def _float16_error(where: str) -> ContinualPeftError:
    return ContinualPeftError(
        f"{where}: strategy 'sdlora' normalises the new slot by its own norm, which is 0 when "
        f"the slot opens, so the gain on its r-wide intermediate (α/ε) overflows float16; got "
        f'dtype "float16": use dtype = "bfloat16" (float32\'s range) or "float32" in [backbone]'
    )
