"""Strategies: how a task gets its slot, and three hooks around its training (see `base`).

Every strategy is one module here, imported below one by one: importing it registers it in
`STRATEGIES`.
"""

from continual_peft.strategies import ewc, joint, l2p, olora, per_task, replay, seq
from continual_peft.strategies.base import (
    STRATEGIES,
    Learner,
    Strategy,
    build_strategy,
    check_config,
    load_strategy_spec,
    strategy_options,
)

PLUGINS = (ewc, joint, l2p, olora, per_task, replay, seq)

__all__ = [
    "PLUGINS",
    "STRATEGIES",
    "Learner",
    "Strategy",
    "build_strategy",
    "check_config",
    "load_strategy_spec",
    "strategy_options",
]
