"""Routers: task-agnostic inference from frozen features.

After each task a router learns to recognise that task from the frozen backbone's features of
its training inputs; at inference it maps each row's features to (indices, weights) over tasks,
with index -1 meaning "no module" (an unfamiliar input). Routers are registered by name in
`ROUTERS` and keep statistics only, never raw features:

- `oracle`: the task is given (the engine routes; the router only counts tasks);
- `prototype`: nearest task mean of L2-normalised features (cosine);
- `mahalanobis`: per-task Gaussians with one shared shrunk covariance (Ledoit-Wolf or OAS);
- `gate`: a small softmax gate refitted after every task on pseudo-features from the Gaussians;
- `topk`: soft mixing of the k best tasks of any scoring router.

Every scoring router takes `reject_rate`, the share of in-distribution training inputs it may
reject when it turns unfamiliar inputs away, and `layers`, which hidden layers its frozen
features come from (`backbones.features`: "last", "auto" or a list of depths; the engine
computes them, a router only records the setting).
"""

from continual_peft.routers.base import (
    ROUTERS,
    Ranking,
    Router,
    ScoringRouter,
    build_router,
    scoring_router_names,
)
from continual_peft.routers.gate import GateRouter
from continual_peft.routers.gaussian import GaussianStats, MahalanobisRouter, ledoit_wolf, oas
from continual_peft.routers.oracle import OracleRouter
from continual_peft.routers.persist import (
    load_router,
    load_router_files,
    router_parts,
    router_state,
    save_router,
)
from continual_peft.routers.prototype import PrototypeRouter
from continual_peft.routers.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "GateRouter",
    "GaussianStats",
    "MahalanobisRouter",
    "OracleRouter",
    "PrototypeRouter",
    "Ranking",
    "Router",
    "ScoringRouter",
    "TopKRouter",
    "build_router",
    "ledoit_wolf",
    "load_router",
    "load_router_files",
    "oas",
    "router_parts",
    "router_state",
    "save_router",
    "scoring_router_names",
]
