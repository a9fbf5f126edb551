"""Per-task classification heads over pooled backbone states.

A head is a linear layer from the pooled vector to the task's labels. It is trained with its task's
slot and frozen with it. A routed batch applies each row's own head; heads are tiny, so rows are
grouped by head rather than stacked.
"""

from __future__ import annotations

import torch
from torch import nn

from continual_peft.backbones.placement import CPU, MASTER_DTYPE, Placement


class Heads(nn.Module):
    """One linear classifier per task.

    Args:
        hidden_size: Width of the pooled vector.
        placement: Where heads live (the backbone's device); their weights stay float32.
    """

    def __init__(self, hidden_size: int, placement: Placement) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.placement = placement
        self.heads = nn.ModuleDict()

    def add(self, task: str, num_labels: int, seed: int) -> nn.Linear:
        """A fresh trainable head for `task`, initialised from `seed` on the CPU, then placed."""
        head = nn.Linear(self.hidden_size, num_labels, device=CPU, dtype=MASTER_DTYPE)
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.02, generator=self.placement.generator(seed))
            head.bias.zero_()
        self.heads[task] = self.placement.module(head)
        return self.heads[task]

    def freeze(self, task: str) -> None:
        self.heads[task].requires_grad_(False)

    def logits(self, pooled: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """Each row through its own task's head.

        Args:
            pooled: (B, d) pooled states.
            tasks: The head to use for each row.

        Returns:
            (B, C_max) logits, padded with -inf past each row's own label count.
        """
        width = max(self.heads[t].out_features for t in set(tasks))
        out = pooled.new_full((len(tasks), width), float("-inf"))
        for task in dict.fromkeys(tasks):
            rows = self.placement.tensor([i for i, t in enumerate(tasks) if t == task])
            head = self.heads[task]
            out[rows, : head.out_features] = head(pooled[rows])
        return out
