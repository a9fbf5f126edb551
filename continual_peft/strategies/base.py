"""Strategies: how a task gets its slot, and three hooks around its training.

A strategy chooses the slot for each task (`allocate`) and may act at three points, all no-ops by
default: `before_task`, `loss` (adjust each batch's loss) and `after_task` (which may return facts
for the task's record). None of them forks the engine's loop. Each task always gets its own head,
frozen after its task.

`routing` says which slots a task's rows go through, with which weights, in training and at
inference alike: by default its own slot at weight 1; O-LoRA sums every slot. A task may have no
slot at all (`allocate` returns `NO_SLOT`, as `linear_probe` does): its routing is then empty and
its rows go through the bare backbone, only its head learning. `check` refuses a configuration
the strategy cannot work with, when the config is validated.

A strategy's options (`[strategy_options]` in a strategy spec, e.g. a replay buffer's size) are
its constructor's keyword arguments; `build_strategy` refuses unknown ones by name. State that
must outlive the process (a replay buffer, EWC's Fisher) goes through `state` / `load_state` and
is saved with every checkpoint as `tasks/<task>/strategy.safetensors` + `strategy.json`.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from continual_peft.backbones.placement import pick_device
from continual_peft.config import LearnerConfig
from continual_peft.distributed import check_device
from continual_peft.errors import ContinualPeftError, readable_file
from continual_peft.registry import Registry
from continual_peft.spec import read_toml

if TYPE_CHECKING:
    from continual_peft.backbones.text import Backbone
    from continual_peft.tasks.task import Task

STRATEGIES: Registry = Registry("strategy", "[strategy_options] in a strategy spec")
NO_SLOT = -1  # a task without a slot of its own: no module (the bank's -1 in a routing)


class SlotBank(Protocol):
    """What strategies use of the module bank (`engine.bank.ModuleBank` is one)."""

    kind_sites: dict[str, dict[str, nn.Module]]  # module kind -> its injected sites

    @property
    def num_slots(self) -> int: ...

    def add_slot(self, seed: int, kind: str | None = None) -> int: ...

    def local_slot(self, slot: int, kind: str) -> int: ...

    def freeze_slot(self) -> None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def use_slot(self, slot: int) -> AbstractContextManager[None]: ...


class LossHeads(Protocol):
    """What strategies use of the per-task heads (`engine.heads.TaskHeads` is a superset)."""

    def prompt_items(self, task: str, inputs: list, where: str = "input") -> Any: ...

    def row_loss(self, items: list, tasks: list[str], labels: list[int]) -> torch.Tensor: ...


class Learner(Protocol):
    """What a strategy's hooks may use of the learner they serve (the engine's
    `ContinualLearner` is one); strategies type against this, not against the engine."""

    bank: SlotBank
    backbone: Backbone
    config: LearnerConfig
    heads: LossHeads
    learned: dict[str, Any]  # task name -> its learned state (`.task`, `.index`, `.slot`)

    def task_seed(self, task: Task, purpose: str) -> int: ...

    def features(self, inputs: list) -> torch.Tensor: ...


class Fallback(NamedTuple):
    """Where a router's rejected or unsure rows go instead (route-or-merge): the slots and
    weights every such row takes, and the top-two score gap under which a row is unsure."""

    slots: list[int]
    weights: list[float]
    margin: float


class Strategy:
    """The base strategy: every hook does nothing."""

    description = ""
    falls_back = False  # whether `fallback` may send routed rows elsewhere (route-or-merge)
    trains_modules = True  # False: no task ever opens a slot (linear_probe: heads alone)
    # why a slot budget (`max_slots`) cannot apply, completing "strategy X ..."; "" = it can:
    # every task opens its own slot and is routed to it alone (`engine.budget`)
    no_budget = "does not give every task a slot of its own that its rows use alone"

    def allocate(self, learner: Learner, task: Task) -> int:
        """The slot that `task` trains and is routed to; `NO_SLOT` for none (only the task's
        head trains, on the bare backbone)."""
        raise NotImplementedError

    def routing(self, learner: Learner, task: str) -> tuple[list[int], list[float]]:
        """The slots every row of `task` goes through and their weights, for training and
        inference alike (the bank sums the slots' deltas); the task's own slot by default, and
        none (the bare backbone) for a task allocated `NO_SLOT`."""
        slot = learner.learned[task].slot
        return ([], []) if slot == NO_SLOT else ([slot], [1.0])

    def parameters(self, learner: Learner) -> list[nn.Parameter]:
        """Trainable tensors of the strategy's own that train with the task's slot and head
        (SD-LoRA's magnitudes); none by default. Called once the task's slot is allocated."""
        return []

    def fallback(self, learner: Learner) -> Fallback | None:
        """Where routed rows the router rejects or is unsure about go (`Fallback`); None (the
        default): a rejected row gets no answer, and no route-or-merge column is reported."""
        return None

    def derived_slots(self, learner: Learner) -> dict[int, str]:
        """Slots that no task trained but the strategy built from others (a merged slot), by
        index, with the file stem each is saved under (in the newest task's folder); none by
        default."""
        return {}

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        """Refuse a configuration this strategy cannot work with; anything goes by default."""

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone this strategy cannot work with, once it is loaded and before any
        run folder is made; any by default."""

    def before_task(self, learner: Learner, task: Task) -> None:
        """Called before the task's slot is chosen."""

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise for one batch, given the task's own loss."""
        return loss

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any] | None:
        """Called after training, before evaluation; JSON-ready facts it returns go into the
        task's record (and report.json) under `strategy`."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-ready data to save with each checkpoint; nothing by default."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state` returned (when a run is loaded to continue or predict)."""


def strategy_options(name: str) -> dict[str, Any]:
    """The options of the strategy registered as `name`, with their defaults."""
    return STRATEGIES.options(name)


def build_strategy(name: str, options: dict[str, Any] | None = None, where: str = "") -> Strategy:
    """The strategy registered as `name`, built with keyword `options` (`STRATEGIES.build`:
    unknown options are refused, naming the valid ones).

    Raises:
        ContinualPeftError: an unknown name, unknown options or invalid values.
    """
    return STRATEGIES.build(name, options, where)


def check_strategy(config: LearnerConfig, where: str = "config") -> Strategy:
    """The config's strategy, built with its options, after it has checked the config (e.g. a
    strategy that works with one module kind only).

    Raises:
        ContinualPeftError: naming the bad strategy, option or setting.
    """
    if config.strategy not in STRATEGIES:
        raise ContinualPeftError(
            f"{where}: unknown strategy {config.strategy!r}; valid names: "
            f"{', '.join(STRATEGIES.names())}"
        )
    strategy = build_strategy(config.strategy, config.strategy_options, where)
    strategy.check(config, where)
    if config.max_slots and strategy.no_budget:
        raise ContinualPeftError(
            f"{where}: max_slots = {config.max_slots} does not apply to strategy "
            f"{config.strategy!r}, which {strategy.no_budget}. A slot budget merges two tasks' "
            "slots into one, which is sound only where every task opens its own slot and is "
            'routed to it alone (strategy "per_task"): leave max_slots out (or 0), or use '
            "per_task"
        )
    return strategy


class CheckedConfig(LearnerConfig):
    """A `LearnerConfig` that `check_config` has checked: what a run asks for is checked once,
    where it enters (a command's plan, `run_stream`, `run_grid`, `compare`, the learner), and
    every layer below takes this and trusts it. A copy made with `dataclasses.replace` (e.g.
    another strategy for a baseline) is checked again: only `check_config` marks one."""

    @property
    def checked(self) -> bool:
        return self.__dict__.get("_checked", False)


def check_config(config: LearnerConfig, where: str = "config") -> CheckedConfig:
    """Everything a run checks before it starts: `config.validate`, the strategy and its
    options (`check_strategy`), and the device. A config already checked is returned as it is.

    Returns:
        A checked copy of `config` (`config` itself is not changed).

    Raises:
        ContinualPeftError: naming the bad key or value, and the fix.
    """
    if isinstance(config, CheckedConfig) and config.checked:
        return config
    config.validate(where)
    check_strategy(config, where)
    check_device(pick_device(config.backbone.device))  # a bad device: before any folder
    values = {item.name: copy.deepcopy(getattr(config, item.name)) for item in fields(config)}
    checked = CheckedConfig(**values)
    checked.__dict__["_checked"] = True
    return checked


def names_spec_file(text: str) -> bool:
    """Whether a `--strategy` value names a spec file rather than a strategy: a `.toml` path,
    or a pipe (a shell's `<(cat spec.toml)`, which has no suffix)."""
    return text.endswith(".toml") or (readable_file(text) and not Path(text).is_file())


def load_strategy_spec(path: str | Path) -> LearnerConfig:
    """Read a strategy spec file (`strategies/*.toml`) into a checked LearnerConfig.

    Raises:
        ContinualPeftError: naming the file and the bad key or value.
    """
    path = Path(path)
    config = LearnerConfig.from_dict(read_toml(path), str(path))
    check_strategy(config, str(path))
    return config
