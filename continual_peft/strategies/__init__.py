"""Strategies: how a task gets its slot, and three hooks around its training (see `base`).

Every strategy is one module here, imported below one by one: importing it registers it in
`STRATEGIES`. The classes are re-exported, to subclass for a strategy of your own.
"""

from continual_peft.strategies.base import (
    NO_SLOT,
    STRATEGIES,
    CheckedConfig,
    Learner,
    Strategy,
    build_strategy,
    check_config,
    check_strategy,
    load_strategy_spec,
    names_spec_file,
    strategy_options,
)
from continual_peft.strategies.ewc import EWC
from continual_peft.strategies.inflora import InfLoRA
from continual_peft.strategies.joint import Joint
from continual_peft.strategies.l2p import L2P
from continual_peft.strategies.linear_probe import LinearProbe
from continual_peft.strategies.merge import Merge, RouteOrMerge
from continual_peft.strategies.olora import OLoRA
from continual_peft.strategies.per_task import PerTask
from continual_peft.strategies.replay import Replay
from continual_peft.strategies.sdlora import SDLoRA
from continual_peft.strategies.seq import Sequential

__all__ = [
    "EWC",
    "InfLoRA",
    "L2P",
    "LinearProbe",
    "Merge",
    "STRATEGIES",
    "Joint",
    "Learner",
    "NO_SLOT",
    "OLoRA",
    "PerTask",
    "Replay",
    "RouteOrMerge",
    "SDLoRA",
    "Sequential",
    "Strategy",
    "build_strategy",
    "CheckedConfig",
    "check_config",
    "check_strategy",
    "load_strategy_spec",
    "names_spec_file",
    "strategy_options",
]
