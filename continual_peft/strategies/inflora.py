"""InfLoRA: each task's LoRA reads only the input directions earlier tasks left unused.

Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning" (CVPR 2024).
Per LoRA site, with x the site's input (..., d_in) and C = the mean over tokens of x xᵀ
(d_in × d_in), collected over the task's training inputs through the model as it is (every slot
summed at weight 1; the new slot's B is 0, so it adds nothing):

- **Before task t trains** (`allocate`), the new slot's down-projection is designed and FIXED:

      A_t = U_r((I − M Mᵀ) C)ᵀ / √3        (r, d_in)

  the top-r left singular vectors of the covariance projected off M, the (d_in, k) orthonormal
  basis of what earlier tasks' inputs span at the site. Only B_t trains. As A_t M = 0, the new
  slot's delta B_t A_t x is zero on every input in span(M): it cannot disturb what earlier tasks
  send through the site.
- **After task t** (`after_task`), C is collected again through the trained model and M grows
  as in GPM (Saha et al. 2021, Eq. 8-9), with ε_t = lamb + (lame − lamb)·t/T (t = the task's
  index from 0, T = the stream's length): C̃ = C − M Mᵀ C, and C̃'s top left singular vectors
  are appended until (‖C‖² − ‖C̃‖² + Σ σ_added²)/‖C‖² ≥ ε_t (Frobenius norms: sums of σ²), at
  most d_in columns in all. For the first task (M empty) that is the smallest k with
  Σ_{i≤k} σ_i² / Σ σ² ≥ ε, as the paper states it; the official code keeps one direction fewer.

At inference every row goes through all slots summed at weight 1, as in the paper, so no router
chooses among slots (`router = "oracle"`): the task given picks only the head.

Where this follows the official code (github.com/liangyanshuo/InfLoRA) and where it departs:

- T is the length of the stream the learner was given to learn (a `run` of a stream spec knows
  it); a learner fed tasks one by one without a stream plan does not, and then ε = lamb for
  every task (the record's `stream_length` is then null).
- M itself is kept (at most d_in² float32 per site). DualGPM stores M's complement instead once
  k > d_in/2: a memory saving that spans the same subspace.
- C uses `samples` training rows per task (drawn with the task's seed), each run alone so that no
  padding token enters it; the paper uses the whole training set.
- Our LoRA delta carries the scale alpha/r; the paper's has none. It only rescales B's step.
- When (I − M Mᵀ) C has fewer than r non-zero singular values, the remaining singular vectors
  are arbitrary and may reach into span(M); A_t is projected off M once more so that A_t M = 0
  holds even then (a no-op otherwise), and directions with σ = 0 are never added to M.
- A frozen slot is stored in the compute dtype (bfloat16 on a GPU by default), so A_t M = 0
  holds to that precision there.

After each task the record (report.json, `tasks[i].strategy`) gives the threshold used and the
basis dimension k over the sites (mean, min, max), beside d_in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from continual_peft.distributed import shard, sum_over_ranks
from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.base import STRATEGIES, Strategy
from continual_peft.strategies.examples import check_option, is_int, is_number
from continual_peft.strategies.olora import check_summed_lora

if TYPE_CHECKING:
    from continual_peft.config import LearnerConfig
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task


def designed_down_projection(
    covariance: torch.Tensor, basis: torch.Tensor | None, rank: int
) -> torch.Tensor:
    """InfLoRA's A_t = U_r((I − M Mᵀ) C)ᵀ / √3, projected off M once more (see the module).

    Args:
        covariance: C, (d_in, d_in).
        basis: M, (d_in, k) orthonormal columns; None or k = 0 for no earlier task.
        rank: r, the LoRA rank.

    Returns:
        (r, d_in) float64 on C's device; rows past d_in (r > d_in) are zero.
    """
    c = covariance.double()
    d_in = c.shape[0]
    m = None if basis is None or basis.shape[1] == 0 else basis.to(c)
    if m is not None:
        c = c - m @ (m.T @ c)  # (I − M Mᵀ) C
    u = torch.linalg.svd(c, full_matrices=False).U  # (d_in, d_in), σ descending
    a = u[:, :rank].T / math.sqrt(3)  # (min(r, d_in), d_in)
    if m is not None:
        a = a - (a @ m) @ m.T  # exact A M = 0 even for directions with σ = 0
    if a.shape[0] < rank:
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], d_in)])
    return a


def extended_basis(
    covariance: torch.Tensor, basis: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """GPM's basis update (Saha et al. 2021, Eq. 8-9) of M by the covariance C of one task.

    C̃ = C − M Mᵀ C; C̃'s top left singular vectors are appended to M until
    (‖C‖² − ‖C̃‖² + Σ σ_added²) / ‖C‖² ≥ threshold, keeping at most d_in columns; with M empty
    this is the smallest k with Σ_{i≤k} σ_i² / Σ σ² ≥ threshold. Directions with σ = 0 are
    never added.

    Args:
        covariance: C, (d_in, d_in).
        basis: M, (d_in, k) orthonormal columns; None for no earlier task.
        threshold: ε in (0, 1].

    Returns:
        The new basis, (d_in, k') float64 on C's device, k <= k' <= d_in; M's columns first.
    """
    c = covariance.double()
    d_in = c.shape[0]
    m = c.new_zeros(d_in, 0) if basis is None else basis.to(c)
    total = c.pow(2).sum()  # ‖C‖_F² = Σ σ² of C
    if float(total) == 0.0 or m.shape[1] >= d_in:
        return m
    projected = c - m @ (m.T @ c)  # C̃, (d_in, d_in)
    u, s, _ = torch.linalg.svd(projected, full_matrices=False)
    held = (total - projected.pow(2).sum()) / total  # share of ‖C‖² that M already holds
    reached = held + torch.cumsum(s.pow(2) / total, 0)  # share after adding 1, 2, ... vectors
    count = 0 if held >= threshold else int((reached < threshold).sum()) + 1
    nonzero = int((s > total.sqrt() * d_in * torch.finfo(torch.float64).eps).sum())
    count = min(count, nonzero, d_in - m.shape[1])
    return torch.cat([m, u[:, :count]], dim=1)


@STRATEGIES.register("inflora")
class InfLoRA(Strategy):
    """A fresh LoRA per task whose A is fixed off earlier tasks' input subspace (InfLoRA).

    Update rule: A_t = U_r((I − M Mᵀ) C)ᵀ / √3 before task t, only B_t trains; afterwards M grows
    by GPM's rule with threshold lamb + (lame − lamb)·t/T. Every slot is summed at inference.

    Args:
        lamb: ε for the first task (the paper's cifar config: 0.95).
        lame: ε approached by the last task (1.0 there); ε = lamb throughout when the stream's
            length is unknown.
        samples: Training rows per task whose site inputs form each covariance (all if fewer;
            the paper uses every row).

    Raises:
        ContinualPeftError: an option out of range (0 < lamb <= lame <= 1, samples >= 1).
    """

    description = (
        "a LoRA per task whose fixed A avoids earlier tasks' input subspace; every slot summed "
        "(InfLoRA)"
    )
    no_budget = (
        "sends every row through the sum of all slots, each A fixed off the earlier tasks' "
        "input subspace: a merged slot would leave that subspace and change every task's output"
    )

    def __init__(self, lamb: float = 0.95, lame: float = 1.0, samples: int = 256) -> None:
        ok = is_number(lamb) and 0 < lamb <= 1
        check_option("inflora", "lamb", lamb, ok=ok, valid="a number in (0, 1]")
        ok = is_number(lame) and is_number(lamb) and lamb <= lame <= 1
        check_option("inflora", "lame", lame, ok=ok, valid="a number in [lamb, 1]")
        ok = is_int(samples) and samples >= 1
        check_option("inflora", "samples", samples, ok=ok, valid="an integer >= 1")
        self.lamb = float(lamb)
        self.lame = float(lame)
        self.samples = samples
        # per LoRA site: M, (d_in, k) orthonormal float32 columns on the backbone's device
        self.bases: dict[str, torch.Tensor] = {}

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        check_summed_lora(
            config,
            where,
            "inflora",
            "it designs LoRA's A from each site's input covariance",
            "summed",
        )

    def allocate(self, learner: Learner, task: Task) -> int:
        slot = learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind="lora")
        covariances = self.covariances(learner, task)
        with torch.no_grad():
            for name, site in learner.bank.kind_sites["lora"].items():
                a = site.stack.trainable["lora_A"]  # (r, d_in) float32 master weights
                designed = designed_down_projection(covariances[name], self.bases.get(name), len(a))
                a.copy_(designed.to(a))
                a.requires_grad_(False)  # fixed: only lora_B trains
        return slot

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        slots = list(range(learner.bank.num_slots))
        return slots, [1.0] * len(slots)

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any]:
        learner.bank.freeze_slot()
        threshold, length = self.threshold(learner, task)
        for name, covariance in self.covariances(learner, task).items():
            basis = extended_basis(covariance, self.bases.get(name), threshold)
            self.bases[name] = basis.float().contiguous()
        dims = [basis.shape[1] for basis in self.bases.values()]
        return {
            "threshold": round(threshold, 6),
            "stream_length": length,
            "basis_dim": {
                "mean": round(float(np.mean(dims)), 3),
                "min": min(dims),
                "max": max(dims),
            },
            "d_in": round(float(np.mean([b.shape[0] for b in self.bases.values()])), 3),
        }

    def threshold(self, learner: Learner, task: Task) -> tuple[float, int | None]:
        """ε_t = lamb + (lame − lamb)·t/T for the task just learned, and T; (lamb, None) when
        the learner does not know the stream's length."""
        plan = getattr(learner, "stream_plan", None)  # known to a learner given a whole stream
        if not plan or not plan.get("tasks"):
            return self.lamb, None
        length = len(plan["tasks"])
        index = learner.learned[task.name].index
        return self.lamb + (self.lame - self.lamb) * min(index / length, 1.0), length

    def covariances(self, learner: Learner, task: Task) -> dict[str, torch.Tensor]:
        """Each LoRA site's input covariance C = mean over tokens of x xᵀ, (d_in, d_in) float64,
        over `samples` of the task's training rows, each run alone through the task's loss with
        every slot summed at weight 1, in eval mode (under torchrun each rank runs a share of
        the rows and the sums are added over the ranks)."""
        sites = learner.bank.kind_sites["lora"]
        device = learner.backbone.device
        rng = np.random.default_rng(learner.task_seed(task, "inflora"))
        count = min(self.samples, len(task.train_inputs))
        rows = np.sort(rng.choice(len(task.train_inputs), size=count, replace=False))
        mine = rows[shard(count)].tolist()  # under torchrun, a share per rank
        items = learner.heads.prompt_items(task.name, [task.train_inputs[i] for i in mine]).items
        sums = {
            name: torch.zeros(site.d_in, site.d_in, dtype=torch.float64, device=device)
            for name, site in sites.items()
        }
        tokens = {name: torch.zeros((), dtype=torch.float64, device=device) for name in sites}

        def recorder(name: str) -> Callable:
            def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs["input"]
                flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
                sums[name] += (flat.T @ flat).to(sums[name])
                tokens[name] += flat.shape[0]

            return record

        handles = [
            site.register_forward_pre_hook(recorder(name), with_kwargs=True)
            for name, site in sites.items()
        ]
        backbone, slots = learner.backbone, list(range(learner.bank.num_slots))
        was_training = backbone.training
        backbone.eval()  # dropout off: the inputs of the model as it is evaluated
        try:
            with torch.no_grad(), learner.bank.use_slots(slots):
                for item, row in zip(items, mine, strict=True):  # one row: no padding token
                    learner.heads.row_loss([item], [task.name], [task.train_labels[row]])
        finally:
            for handle in handles:
                handle.remove()
            backbone.train(was_training)
        sum_over_ranks([*sums.values(), *tokens.values()])
        return {name: sums[name] / tokens[name].clamp(min=1) for name in sites}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not self.bases:
            return {}, {}
        tensors = {name: basis.contiguous() for name, basis in self.bases.items()}
        meta = {
            "sites": {name: basis.shape[1] for name, basis in self.bases.items()},
            "lamb": self.lamb,
            "lame": self.lame,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        bases = {}
        for name, k in meta.get("sites", {}).items():
            if name not in tensors or tensors[name].shape[1] != k:
                raise ContinualPeftError(
                    f"inflora: the saved state lacks the basis of site {name!r} (or its size "
                    f"differs from the {k} columns its meta names): the strategy files are "
                    "damaged; resume from an earlier checkpoint"
                )
            bases[name] = tensors[name].float()
        self.bases = bases
