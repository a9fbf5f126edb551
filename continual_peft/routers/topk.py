"""The topk router: soft mixing of the k best tasks of any scoring router."""

from __future__ import annotations

from typing import Any

import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.routers.base import (
    ROUTERS,
    Router,
    ScoringRouter,
    build_router,
    scoring_router_names,
)


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Wraps a scoring router; weights = softmax(scores / temperature) over its top k, renormalised.

    With k = 1, or as the temperature goes to 0, this is the base router's hard routing. Rejection
    is the base router's: pass `reject_rate` among the base options.

    Args:
        base: Name of the wrapped scoring router.
        k: Tasks mixed per row (the default for `route`).
        temperature: Softmax temperature over the base router's scores.
        **base_options: Options for the base router (e.g. `reject_rate`, `shrinkage`).
    """

    name = "topk"

    def __init__(
        self, base: str = "mahalanobis", k: int = 2, temperature: float = 1.0, **base_options: Any
    ) -> None:
        valid = scoring_router_names()
        if base not in valid:
            raise ContinualPeftError(
                f"topk: base router {base!r} cannot be wrapped; valid bases: {', '.join(valid)}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ContinualPeftError(f"topk: k must be a positive integer, got {k!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ContinualPeftError(f"topk: temperature must be a number, got {temperature!r}")
        if not temperature > 0:
            raise ContinualPeftError(f"topk: temperature must be > 0, got {temperature}")
        self.base = build_router(base, **base_options)
        assert isinstance(self.base, ScoringRouter)
        self.k, self.temperature = k, float(temperature)
        self.options = {"base": base, "k": k, "temperature": self.temperature, **base_options}

    @property
    def num_tasks(self) -> int:  # type: ignore[override]
        return self.base.num_tasks

    @property
    def layers(self) -> str | list[int]:  # type: ignore[override]
        return self.base.layers

    @property
    def block_width(self) -> int | None:  # type: ignore[override]
        return self.base.block_width

    @block_width.setter
    def block_width(self, width: int | None) -> None:
        self.base.block_width = width

    def to(self, device: str | torch.device) -> Router:
        self.device = torch.device(device)
        self.base.to(device)
        return self

    def add_task(self, features: torch.Tensor) -> None:
        self.base.add_task(features)

    def agree(self) -> None:
        self.base.agree()

    def rejection(self) -> dict[str, Any]:
        return self.base.rejection()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.base.scores(features)

    def route(
        self, features: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ranking = self.base.rank(features, self.k if k is None else k)
        # Columns beyond the number of tasks score -inf, so they get weight 0.
        weights = torch.softmax(ranking.scores / self.temperature, dim=1)  # (B, k)
        weights[ranking.rejected] = 0.0
        return ranking.indices.to(features.device), weights.float().to(features.device)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, base_meta = self.base.state()
        return tensors, {"options": dict(self.options), "base": base_meta}

    def task_rows(self) -> dict[str, list[int]]:
        return self.base.task_rows()

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Router:
        router = build_router(cls.name, **meta["options"])
        assert isinstance(router, TopKRouter)
        router.base = type(router.base).from_state(tensors, meta["base"])
        return router
