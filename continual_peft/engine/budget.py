"""A slot budget: at most `max_slots` slots in the bank, the two most similar merged beyond it.

Under `per_task` every task opens its own slot, so the bank grows by one slot per task. With
`max_slots = N` (a config key, `--max-slots N`), a task that would open slot N+1 first makes room
(`make_room`, called by `ContinualLearner.begin_task` before the strategy allocates):

1. Candidates: every frozen slot. Each slot's task vector is, for LoRA, the per-site update
   ΔW = scale · B A (d_out, d_in), flattened and concatenated over sites; for other kinds, the
   slot's trained tensors, flattened and concatenated (its fixed `scale` left out).
2. Among the pairs of slots of the same module kind and tensor shapes, the one whose task vectors
   have the highest cosine similarity is merged (ties: the lowest indices). For LoRA the inner
   products are taken through the factors, <B_i A_i, B_j A_j> = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ), so no
   (d_out, d_in) matrix is built to choose.
3. The merge, into the lower slot index ("kept"): for LoRA the weighted mean of the two ΔW,
   weights = how many tasks each slot serves, stored back as its best rank-r approximation
   (truncated SVD, √S on each factor, scale 1: `strategies.merge.merged_lora`'s task-arithmetic
   merge in delta space); `kept_energy` is the share of the mean's squared Frobenius norm the
   rank-r slot keeps (averaged over sites; 1 = nothing lost). Other kinds: the weighted mean of
   each tensor.
4. Every task of the other slot ("freed") now uses the kept slot (`LearnedTask.slot`; the
   strategy's routing reads it), and the freed slot is released: the new task's `add_slot`
   reopens that index, initialised exactly as a new slot from the same seed, so the bank never
   holds more than N slots.

If no two slots share a kind and shapes (a bank of N different kinds), the task is refused.
Each task keeps its own head. Routers route to tasks, not slots, so none is refitted: a router
still picks the task, whose rows then go through the merged slot. What the merge costs shows in
the accuracy matrix: the new task's row re-evaluates every task through its slot as it is now.
The new task's record holds `consolidation` (`Consolidation.record`), and the learner's
`merged_slots` names the slots whose values a consolidation rewrote (saved as new files).

Only strategies whose tasks each open their own slot, used alone, take a budget
(`strategies.base.Strategy.no_budget`); `check_config` refuses the others by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from continual_peft.engine.bank import ModuleBank
from continual_peft.engine.state import LearnedTask
from continual_peft.errors import ContinualPeftError
from continual_peft.strategies.merge import merged_lora

LORA_KEYS = (".lora_A", ".lora_B")  # a slot holding these per site is a LoRA: ΔW = scale · B A


@dataclass(kw_only=True)
class Consolidation:
    """Two slots merged to make room for a new task, and how to take it back."""

    kept: int  # the slot that holds the merge (the lower index)
    freed: int  # the slot released for the new task
    tasks: list[str]  # every task that uses the kept slot after the merge
    similarity: float  # cosine similarity of the two slots' task vectors
    kept_energy: float | None  # LoRA: the share of the merged ΔW the rank-r slot keeps
    before: dict[int, tuple[str, dict[str, torch.Tensor]]]  # both slots: kind, values before

    def record(self) -> dict:
        """The facts for the new task's record (report.json, `tasks[i].consolidation`)."""
        facts = {
            "slots": [self.kept, self.freed],
            "tasks": list(self.tasks),
            "similarity": round(self.similarity, 6),
        }
        if self.kept_energy is not None:
            facts["kept_energy"] = round(self.kept_energy, 6)
        return facts


def make_room(
    bank: ModuleBank, learned: dict[str, LearnedTask], max_slots: int, task: str
) -> Consolidation | None:
    """Merge the two most similar slots when the bank already holds `max_slots` (module
    docstring), updating `bank` and the tasks' slots in `learned` in place; None when there is
    room (or no budget).

    Raises:
        ContinualPeftError: the bank is full and no two of its slots share a kind and shapes.
    """
    if not max_slots or bank.num_slots < max_slots:
        return None
    served = {
        slot: [n for n, state in learned.items() if state.slot == slot]
        for slot in range(bank.num_slots)
    }
    states = {slot: bank.slot_state(slot) for slot in served}
    pair = most_similar_pair(bank.slot_kinds, states)
    if pair is None:
        raise ContinualPeftError(
            f"task {task!r}: the bank is full (max_slots = {max_slots}) and no two of its "
            f"slots share a module kind and shapes (kinds: {', '.join(bank.slot_kinds)}), so "
            "none can be merged to make room: raise max_slots, or give more tasks the same "
            "module kind"
        )
    kept, freed, similarity = pair
    weights = [float(len(served[kept])), float(len(served[freed]))]
    before = {slot: (bank.slot_kinds[slot], _copy(states[slot])) for slot in (kept, freed)}
    merged, energy = merge_slots(
        [states[kept], states[freed]], weights, device=bank.backbone.placement.device
    )
    bank.overwrite_slot(kept, merged)
    for name in served[freed]:
        learned[name].slot = kept
    bank.release(freed)
    return Consolidation(
        kept=kept,
        freed=freed,
        tasks=served[kept] + served[freed],
        similarity=similarity,
        kept_energy=energy,
        before=before,
    )


def merged_slots_from(records: list[dict]) -> dict[int, str]:
    """The learner's `merged_slots` (slot -> the task during whose `learn` a consolidation last
    rewrote it) as the tasks' records tell it, in learning order: a slot freed later is no
    longer a merged one (its new task owns it)."""
    merged: dict[int, str] = {}
    for record in records:
        facts = record.get("consolidation")
        if facts:
            kept, freed = facts["slots"]
            merged.pop(freed, None)
            merged[kept] = record["name"]
    return merged


def most_similar_pair(
    kinds: list[str], states: dict[int, dict[str, torch.Tensor]]
) -> tuple[int, int, float] | None:
    """The pair (i < j) of slots of one kind and shapes whose task vectors have the highest
    cosine similarity, with it; None when no two slots share a kind and shapes.

    Args:
        kinds: Each slot's module kind, by slot index.
        states: The candidate slots' `ModuleBank.slot_state`, by slot index.
    """
    best: tuple[int, int, float] | None = None
    slots = sorted(states)
    norms = {slot: math.sqrt(task_vector_dot(states[slot], states[slot])) for slot in slots}
    for a, i in enumerate(slots):
        for j in slots[a + 1 :]:
            if kinds[i] != kinds[j] or _shapes(states[i]) != _shapes(states[j]):
                continue
            scale = norms[i] * norms[j]
            cos = task_vector_dot(states[i], states[j]) / scale if scale > 0 else 0.0
            if best is None or cos > best[2]:
                best = (i, j, cos)
    return best


def task_vector_dot(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """The inner product of two slots' task vectors (module docstring), in float64."""
    total = 0.0
    if _is_lora(first):
        for site in _lora_sites(first):
            a1, b1, s1 = _factors(first, site)
            a2, b2, s2 = _factors(second, site)
            # <s1 B1 A1, s2 B2 A2>_F = s1 s2 Σ (B1ᵀ B2) ⊙ (A1 A2ᵀ): (r, r) products only
            total += float(s1 * s2 * ((b1.T @ b2) * (a1 @ a2.T)).sum())
        return total
    for key, value in first.items():
        if not _is_scale(key):
            total += float((value.double() * second[key].double()).sum())
    return total


def merge_slots(
    states: list[dict[str, torch.Tensor]], weights: list[float], device: torch.device
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The weighted mean of slots of one kind (weights normalised to sum 1), as one slot's
    values: for LoRA the mean ΔW stored as its best rank-r approximation (scale 1), with the
    share of energy kept; for other kinds the mean of each tensor, and None."""
    total = sum(weights)
    shares = [w / total for w in weights]
    if _is_lora(states[0]):
        # the weights ride on each slot's scale: Σ_t 1 · (w_t scale_t) B_t A_t is the mean
        scaled = [
            {
                **state,
                **{f"{site}.scale": state[f"{site}.scale"] * share for site in _lora_sites(state)},
            }
            for state, share in zip(states, shares, strict=True)
        ]
        merged, kept = merged_lora(
            scaled,
            method="task_arithmetic",
            weight=1.0,
            density=1.0,
            space="delta",
            sign="total",
            slots=1,
            seed=0,  # task arithmetic draws nothing
            device=device,
        )
        return merged[0], kept
    mean = {
        key: sum(share * state[key].float() for state, share in zip(states, shares, strict=True))
        for key in states[0]
    }
    return mean, None


def _is_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(LORA_KEYS[0]) for key in state)


def _lora_sites(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key.removesuffix(LORA_KEYS[0]) for key in state if key.endswith(LORA_KEYS[0]))


def _factors(state: dict[str, torch.Tensor], site: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    a = state[f"{site}.lora_A"].double()  # (r, d_in)
    b = state[f"{site}.lora_B"].double()  # (d_out, r)
    return a, b, float(state[f"{site}.scale"])


def _is_scale(key: str) -> bool:
    return key.rpartition(".")[2] == "scale"  # fixed per slot (adapters: 1), never trained


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}
