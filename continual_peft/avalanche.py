"""`from continual_peft.avalanche import ...`, the documented import path for the Avalanche
integration (an optional extra, so not imported by the package): see `integrations.avalanche`."""

from continual_peft.integrations.avalanche import (
    avalanche_strategy,
    stream_from_benchmark,
    tasks_from_benchmark,
)

__all__ = ["avalanche_strategy", "stream_from_benchmark", "tasks_from_benchmark"]
