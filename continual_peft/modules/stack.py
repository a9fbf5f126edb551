"""SlotStack: every slot's copy of a few named tensors, stacked on a leading slot axis.

Frozen slots live in buffers `(T, *shape)` in the backbone's compute dtype (bfloat16 on a GPU by
default), so no optimizer can ever touch them. The slot being trained, if any, is a set of float32
Parameters (master weights) that `stacked()` appends at index T, cast to the compute dtype.
Freezing a slot casts it onto the buffers; its values never change after that. Every tensor lives
on the device of the layer the stack belongs to.
"""

from __future__ import annotations

import torch
from torch import nn

from continual_peft.backbones.placement import MASTER_DTYPE


class SlotStack(nn.Module):
    """Stacked per-slot tensors.

    Args:
        shapes: Tensor name -> per-slot shape, e.g. {"lora_A": (r, d_in), "scale": ()}.
        like: A tensor whose dtype (for frozen slots) and device the stack takes.
        fixed: Names that are stored per slot but never trained (e.g. a scale).
    """

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], like: torch.Tensor, fixed: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.names = list(shapes)
        self.fixed = set(fixed)
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(0, *shape, dtype=like.dtype, device=like.device))
        self.trainable = nn.ParameterDict()

    @property
    def num_frozen(self) -> int:
        return len(getattr(self, self.names[0]))

    def open(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start a trainable slot (index `num_frozen`) from initial values, in float32."""
        device = getattr(self, self.names[0]).device
        self.trainable = nn.ParameterDict(
            {
                name: nn.Parameter(
                    tensors[name].detach().to(device, MASTER_DTYPE).clone(),
                    requires_grad=name not in self.fixed,
                )
                for name in self.names
            }
        )

    def freeze(self) -> None:
        """Move the trainable slot onto the frozen buffers."""
        self.load({name: p.detach() for name, p in self.trainable.items()})
        self.trainable = nn.ParameterDict()

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append a frozen slot."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"slot tensors miss {missing}")
        for name in self.names:
            stack = getattr(self, name)
            setattr(self, name, torch.cat([stack, tensors[name].to(stack)[None]]))

    def overwrite(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Replace frozen slot `index`'s values (a merged slot rebuilt after each task)."""
        if not 0 <= index < self.num_frozen:
            raise IndexError(f"slot {index} is not a frozen slot ({self.num_frozen} frozen)")
        for name in self.names:
            stack = getattr(self, name)
            updated = stack.clone()  # a new tensor: views taken earlier keep the old values
            updated[index] = tensors[name].to(stack)
            setattr(self, name, updated)

    def slot(self, index: int) -> dict[str, torch.Tensor]:
        """One slot's tensors (the trainable ones as Parameters)."""
        if len(self.trainable) and index == self.num_frozen:
            return dict(self.trainable.items())
        return {name: getattr(self, name)[index] for name in self.names}

    def stacked(self) -> dict[str, torch.Tensor]:
        """Every slot, frozen and trainable, as `(T, *shape)` tensors."""
        if not len(self.trainable):
            return {name: getattr(self, name) for name in self.names}
        return {
            name: torch.cat([frozen, self.trainable[name][None].to(frozen.dtype)])
            for name in self.names
            for frozen in [getattr(self, name)]
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable.values() if p.requires_grad]

    def drop_newest(self) -> None:
        """Remove the newest slot: the trainable one if any, else the last frozen one."""
        if len(self.trainable):
            self.trainable = nn.ParameterDict()
            return
        for name in self.names:
            setattr(self, name, getattr(self, name)[:-1].clone())


def wrapped_layer(module: nn.Module) -> nn.Module:
    """The original layer under any sites wrapping it (each site keeps what it wraps as
    `base_layer`; two kinds on one layer nest)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


class StackedSite(nn.Module):
    """The site interface every module kind implements, for sites whose slots live in `self.stack`.

    A subclass sets `self.stack` (a SlotStack) and implements `add_slot(generator)` and `forward`.
    """

    stack: SlotStack

    def add_slot(self, generator: torch.Generator) -> None:
        """Open a trainable slot, initialised from `generator`."""
        raise NotImplementedError

    def freeze_slot(self) -> None:
        self.stack.freeze()

    def load_slot(self, tensors: dict[str, torch.Tensor], trainable: bool = False) -> None:
        """Append a slot from `slot_tensors` output: frozen, or the trainable one (a shared slot
        that later tasks keep training, restored at full precision)."""
        if trainable:
            self.stack.open(tensors)
        else:
            self.stack.load(tensors)

    def overwrite_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Replace a frozen slot's values with `slot_tensors`-shaped `tensors`."""
        self.stack.overwrite(slot, tensors)

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.stack.slot(slot).items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.stack.trainable_parameters()

    def drop_newest_slot(self) -> None:
        """Forget the newest slot (a task that failed is rolled back)."""
        self.stack.drop_newest()
