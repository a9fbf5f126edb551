"""The oracle router: the task is given, so there is nothing to score."""

from __future__ import annotations

from typing import Any

import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.routers.base import ROUTERS, Router, check_features

_NEEDS_TASK = (
    "oracle routing needs the task of each input: the engine sends every input to its own task's "
    "slot itself. To route without the task, choose a task-agnostic router (prototype, "
    "mahalanobis, gate or topk)."
)


@ROUTERS.register("oracle")
class OracleRouter(Router):
    """Counts tasks so names validate and runs resume; routing is the engine's job."""

    name = "oracle"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.num_tasks = 0
        self.dim: int | None = None

    def add_task(self, features: torch.Tensor) -> None:
        self.dim = check_features(features, self.dim, "oracle.add_task").shape[1]
        self.num_tasks += 1

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        raise ContinualPeftError(_NEEDS_TASK)

    def route(
        self, features: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise ContinualPeftError(_NEEDS_TASK)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"options": {}, "num_tasks": self.num_tasks, "dim": self.dim}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Router:
        router = cls()
        router.num_tasks = int(meta["num_tasks"])
        router.dim = meta["dim"]
        return router
