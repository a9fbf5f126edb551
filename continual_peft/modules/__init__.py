"""Module kinds: what a task's parameter-efficient module is and where it is injected.

Every kind implements one interface, so the bank, router and engine never branch on kind:

- `kind.inject(backbone, routing) -> dict[site name, site]` wraps layers of `backbone.model` in
  place (or registers an input hook on the backbone, for prompts);
- each site has `add_slot(generator)`, `freeze_slot()`, `load_slot(tensors)`,
  `slot_tensors(slot)` and `trainable_parameters()`, and reads the shared `Routing` in forward.
"""

from continual_peft.modules import adapter, bitfit, ia3, lora, prefix, prompt, prompt_pool
from continual_peft.modules.base import (
    HYBRID,
    MODULE_KINDS,
    WHOLE_METHOD_KINDS,
    kind_parts,
    wrap_linear_layers,
)
from continual_peft.modules.routing import Routing

# each kind registers itself in MODULE_KINDS when its module is imported (above, one by one)
KINDS = (adapter, bitfit, ia3, lora, prefix, prompt, prompt_pool)

__all__ = [
    "HYBRID",
    "KINDS",
    "MODULE_KINDS",
    "WHOLE_METHOD_KINDS",
    "Routing",
    "kind_parts",
    "wrap_linear_layers",
]
