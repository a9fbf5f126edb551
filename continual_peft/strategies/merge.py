"""`merge`: a fresh LoRA slot per task, merged after each task into one consolidated slot that
answers every task, with no router (task arithmetic, TIES or DARE).

Each task trains its own slot from the frozen backbone, alone, as `per_task` does; after it, the
task vectors of every task learned so far are merged again, all at once, into the merged slot,
and every task is evaluated (and exported) through that slot and its own head. The task slots
are kept, frozen: the merge is recomputed from them, and `route_or_merge` routes to them.

A task vector, in the default `space = "delta"`, is the slot's weight update at each LoRA site,
τ_t = scale_t · B_t A_t (d_out, d_in); the merged update (`continual_peft.merging`)

    task_arithmetic (Ilharco et al. 2023):  Σ_t λ τ_t
    ties (Yadav et al. 2023):               trim each τ_t to its `density` largest entries, elect
                                            a sign per entry, mean of the agreeing entries · λ
    dare_linear / dare_ties (Yu et al. 2024): drop entries with probability 1 − density,
                                            rescale by 1/density, then sum / TIES-merge

is stored as `slots` LoRA slots of the config's rank r holding its best rank-(slots·r)
approximation (truncated SVD, split √S to each factor, scale 1): peft's `*_svd` combinations of
`add_weighted_adapter` at `svd_rank = slots·r`. `space = "factors"` merges the A and B matrices
instead, each weighted by √(λ · scale_t), as peft's `linear`, `ties`, `dare_linear` and
`dare_ties` combinations do (equal to them, tested): rank r, no SVD, but the product of merged
factors carries cross terms B_i A_j between tasks.

The merged slot lives in the bank after the task slots (slot indices: task 0, merged, task 1,
task 2, ...), is saved as `merged.safetensors` in the newest task's folder and is rebuilt after
every task (a task that fails is rolled back out of it too: `engine.rollback`). After each task
the record (report.json, `tasks[i].strategy`) holds the merge's settings and, in delta space,
`kept_energy`: the share of the merged update's squared Frobenius norm that the rank-(slots·r)
slot keeps, averaged over sites (1 = nothing lost to the truncation).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.merging import MERGES, SIGN_METHODS, merge_task_vectors
from continual_peft.strategies.base import STRATEGIES, Fallback, Strategy
from continual_peft.strategies.examples import check_option, is_int, is_number

if TYPE_CHECKING:
    from continual_peft.config import LearnerConfig
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task

SPACES = ("delta", "factors")
MAX_WEIGHT = 1e3  # larger λ overflow float32 in the merged update
MAX_SLOTS = 64
KIND = "lora"


@STRATEGIES.register("merge")
class Merge(Strategy):
    """A fresh LoRA slot per task; after each task all task slots are merged into one slot that
    answers every task (task arithmetic, TIES or DARE), so no router is needed.

    Args:
        method: "task_arithmetic", "ties", "dare_linear" or "dare_ties".
        density: For TIES and DARE, the share of each task vector's entries kept (TIES's k =
            20 % and DARE's drop rate p = 0.9 in their papers: 0.2 and 0.1); 1 keeps all.
        weight: λ, the weight of every task vector (1.0: TIES's default; task arithmetic's
            paper tunes it, ~0.3-0.5 for 8 tasks), or "mean" for 1/T over the T tasks merged.
        space: "delta" (merge each site's ΔW, keep its rank-(slots·r) SVD) or "factors" (merge
            A and B apart, as peft's non-SVD combinations).
        sign: The TIES sign election: "total" (sign of the sum, the paper's) or "frequency".
        slots: How many rank-r slots the merged update occupies in delta space (its rank is
            slots·r); 1 in factors space.
    """

    name = "merge"
    description = "a LoRA per task, all merged into one slot after each task (TIES/DARE/TA)"
    no_budget = (
        "rebuilds its merged slot from every task slot after each task, so each task slot must "
        "stay as trained (the merge's size is its `slots` option)"
    )

    def __init__(
        self,
        method: str = "ties",
        density: float = 0.2,
        weight: float | str = 1.0,
        space: str = "delta",
        sign: str = "total",
        slots: int = 1,
    ) -> None:
        name = self.name
        check_option(name, "method", method, ok=method in MERGES, valid=" | ".join(MERGES))
        ok = is_number(density) and 0 < density <= 1
        check_option(name, "density", density, ok=ok, valid="a number in (0, 1]")
        ok = weight == "mean" or (is_number(weight) and 0 < weight <= MAX_WEIGHT)
        check_option(
            name, "weight", weight, ok=ok, valid=f'a number in (0, {MAX_WEIGHT:g}] or "mean"'
        )
        check_option(name, "space", space, ok=space in SPACES, valid=" | ".join(SPACES))
        check_option(name, "sign", sign, ok=sign in SIGN_METHODS, valid=" | ".join(SIGN_METHODS))
        ok = is_int(slots) and 1 <= slots <= MAX_SLOTS and (space == "delta" or slots == 1)
        valid = f"an integer in [1, {MAX_SLOTS}] (exactly 1 with space = 'factors')"
        check_option(name, "slots", slots, ok=ok, valid=valid)
        self.method, self.density, self.weight = method, float(density), weight
        self.space, self.sign, self.slots = space, sign, int(slots)
        self.merged: list[int] = []  # the merged slots' indices, once the first task is merged

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        kinds = {config.module, *config.task_modules.values()}
        name = self.name
        if kinds != {KIND}:
            raise ContinualPeftError(
                f"{where}: strategy {name!r} merges LoRA task vectors (ΔW = B A · scale share "
                "one space across tasks; a bottleneck adapter is nonlinear and prompts are "
                f'positional); got module kind(s) {sorted(kinds)}: use module = "lora" and '
                "no per-task module"
            )
        if config.router != "oracle":
            raise ContinualPeftError(
                f"{where}: strategy 'merge' answers every task from the one merged slot, so "
                f"there is no slot for a router to choose; got router {config.router!r}: use "
                'router = "oracle", or strategy "route_or_merge" to route to the task slots '
                "and fall back to the merged one"
            )

    def allocate(self, learner: Learner, task: Task) -> int:
        return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind=KIND)

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        own = learner.learned[task].slot
        if not self.merged or (learner.bank.has_trainable and own == learner.bank.num_slots - 1):
            return [own], [1.0]  # the task trains (and is first measured) on its own slot
        return list(self.merged), [1.0] * len(self.merged)

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any]:
        learner.bank.freeze_slot()
        facts = self.merge(learner)
        return {
            "method": self.method,
            "density": self.density,
            "weight": self.weight,
            "space": self.space,
            "merged_tasks": len(learner.learned),
            "merged_slots": list(self.merged),
            **facts,
        }

    def derived_slots(self, learner: Learner) -> dict[int, str]:
        if len(self.merged) == 1:
            return {self.merged[0]: "merged"}
        return {slot: f"merged{k}" for k, slot in enumerate(self.merged)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"merged_slots": list(self.merged)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.merged = [int(slot) for slot in meta.get("merged_slots", [])]

    def merge(self, learner: Learner) -> dict[str, Any]:
        """Merge every learned task's slot into the merged slot(s), opening them the first
        time; returns facts for the record."""
        bank = learner.bank
        tasks = list(learner.learned.values())
        if bank.has_trainable:  # the newest task is still training: not merged yet
            tasks = tasks[:-1]
        if not tasks:
            return {}
        states, kept = merged_lora(
            [bank.slot_state(state.slot) for state in tasks],
            method=self.method,
            weight=1.0 / len(tasks) if self.weight == "mean" else float(self.weight),
            density=self.density,
            space=self.space,
            sign=self.sign,
            slots=self.slots,
            seed=learner.task_seed(tasks[-1].task, "merge"),  # the same draws when rebuilt
            device=learner.backbone.placement.device,
        )
        broken = [key for state in states for key, v in state.items() if not v.isfinite().all()]
        if broken:
            raise ContinualPeftError(
                f"strategy {self.name!r}: the merged slot is not finite (at {broken[0]}): lower "
                f"`weight` ({self.weight}) or raise `density` ({self.density})"
            )
        if not self.merged:
            self.merged = [bank.load_slot(state, KIND) for state in states]
        else:
            for slot, state in zip(self.merged, states, strict=True):
                bank.overwrite_slot(slot, state)
        return {} if kept is None else {"kept_energy": round(kept, 6)}


def merged_lora(
    task_states: list[dict[str, torch.Tensor]],
    *,
    method: str,
    weight: float,
    density: float,
    space: str,
    sign: str,
    slots: int,
    seed: int,
    device: torch.device,
) -> tuple[list[dict[str, torch.Tensor]], float | None]:
    """Merge T LoRA slots (`ModuleBank.slot_state` dicts: `<site>.lora_A` (r, d_in),
    `<site>.lora_B` (d_out, r), `<site>.scale` ()) into `slots` slots of the same shapes.

    Args:
        method, density, sign: `merging.merge_task_vectors`'s.
        weight: λ of every task vector.
        space: "delta" or "factors" (module docstring).
        slots: How many rank-r slots hold the merged update (delta space).
        seed: Seeds DARE's drops (a CPU generator: the same draws on every device).
        device: Where the SVDs run.

    Returns:
        The merged slots' states (scale 1, on `device`) and, in delta space, the share of the
        merged update's energy the truncation keeps (mean over sites); None in factors space.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sites = sorted(key.removesuffix(".lora_A") for key in task_states[0] if key.endswith(".lora_A"))
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
    kept: list[float] = []
    for site in sites:
        a = torch.stack([s[f"{site}.lora_A"].to("cpu", torch.float32) for s in task_states])
        b = torch.stack([s[f"{site}.lora_B"].to("cpu", torch.float32) for s in task_states])
        scale = torch.stack([s[f"{site}.scale"].to("cpu", torch.float32) for s in task_states])
        rank = a.shape[1]
        one = torch.ones((), dtype=torch.float32, device=device)
        if space == "factors":
            root = (weight * scale).abs().sqrt()  # peft: √(w·scale) on both, the sign on A's
            merged_a = merge_task_vectors(
                a, root * (weight * scale).sign(), method, density, sign, generator
            )
            merged_b = merge_task_vectors(b, root, method, density, sign, generator)
            out[0] |= {f"{site}.lora_A": merged_a.to(device), f"{site}.lora_B": merged_b.to(device)}
            out[0][f"{site}.scale"] = one
            continue
        deltas = scale[:, None, None] * (b @ a)  # (T, d_out, d_in)
        weights = torch.full((len(task_states),), weight, dtype=torch.float32, device="cpu")
        merged = merge_task_vectors(deltas, weights, method, density, sign, generator).to(device)
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        width = slots * rank
        root = s[:width].sqrt()
        up = u[:, :width] * root  # (d_out, ≤ width)
        down = root[:, None] * vh[:width]  # (≤ width, d_in)
        if up.shape[1] < width:  # a site narrower than slots·r: the rest stays zero
            up = torch.cat([up, up.new_zeros(up.shape[0], width - up.shape[1])], dim=1)
            down = torch.cat([down, down.new_zeros(width - down.shape[0], down.shape[1])])
        total = float(s.pow(2).sum())
        kept.append(float(s[:width].pow(2).sum()) / total if total > 0 else 0.0)  # 0: none
        for k in range(slots):
            part = slice(k * rank, (k + 1) * rank)
            out[k] |= {
                f"{site}.lora_A": down[part].contiguous(),
                f"{site}.lora_B": up[:, part].contiguous(),
                f"{site}.scale": one,
            }
    return out, (sum(kept) / len(kept) if kept else None)


@STRATEGIES.register("route_or_merge")
class RouteOrMerge(Merge):
    """Per-task LoRA slots and a router, as `per_task`, plus `merge`'s merged slot for the rows
    the router rejects or is unsure about, so an input of an unknown or ambiguous task gets the
    consolidated knowledge rather than no answer.

    A row falls back when the router rejects it (`reject_rate` in `[router_options]`) or when
    its two best tasks' router scores differ by less than `margin` (in the router's score
    units: a Gaussian router's are negative squared Mahalanobis distances, prototype's cosine
    similarities); it keeps its best task's head. The report shows it as its own routed
    column, `route_or_merge`, beside the plain router's `routed` (where a rejected row is
    wrong); with the task given (`oracle`) each task uses its own slot.

    Args:
        margin: Rows whose top-two score gap is below this fall back (0: rejected rows only).
        method, density, weight, space, sign, slots: The merge's (see `Merge`).
    """

    name = "route_or_merge"
    falls_back = True
    description = "per-task slots + router; rejected or unsure rows use the merged slot"

    def __init__(
        self,
        margin: float = 0.0,
        method: str = "ties",
        density: float = 0.2,
        weight: float | str = 1.0,
        space: str = "delta",
        sign: str = "total",
        slots: int = 1,
    ) -> None:
        ok = is_number(margin) and 0 <= margin < float("inf")
        check_option(self.name, "margin", margin, ok=ok, valid="a number >= 0")
        super().__init__(method, density, weight, space, sign, slots)
        self.margin = float(margin)

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        if config.router == "oracle":
            raise ContinualPeftError(
                f"{where}: strategy 'route_or_merge' falls back to the merged slot where a "
                'router rejects a row or is unsure, but router = "oracle" never is: pick a '
                'router (e.g. router = "mahalanobis", with reject_rate in [router_options]), '
                'or use strategy "merge"'
            )
        super().check(dataclasses.replace(config, router="oracle"), where)

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        return [learner.learned[task].slot], [1.0]

    def fallback(self, learner: Learner) -> Fallback | None:
        if not self.merged:
            return None
        return Fallback(list(self.merged), [1.0] * len(self.merged), self.margin)
