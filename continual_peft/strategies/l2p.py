"""`l2p`: Learning to Prompt (Wang et al. 2022), the prompt-routing baseline.

One shared `prompt_pool` slot (M prompts with keys, see `continual_peft.modules.prompt_pool`) is
opened at the first task and trained on every task in turn, like `seq`'s shared slot and unlike
`per_task`'s frozen ones, so the pool can forget, as L2P can. Each input picks its own N prompts
by matching its frozen feature against the keys: routing happens per instance inside the pool,
not per task. Each task still gets its own head (frozen after its task), and evaluation is
task-incremental (the task's head under `use_slot` of the pool); L2P's single masked classifier
is not reproduced.

The `loss` hook adds L2P's surrogate "key-pull" loss,
`pull_weight · mean_batch Σ_{n ≤ N} (1 − cos(query, key_n))` over the batch's selected keys; the
official implementation (google-research/l2p, `pull_constraint_coeff`) uses 0.1, our default.
It subtracts `coeff · mean Σ cos` instead, which differs from ours by a constant: same gradient.

The module kind must be `prompt_pool` (`module = "prompt_pool"` in the spec, as
`strategies/l2p.toml`); any other kind is refused when the config is validated (`check`) rather
than replaced, so a run's config always says what it trained. Omitted: L2P's optional train-time
key-frequency penalty. After each task the strategy counts which prompts the task's test inputs
pick (a histogram over the M prompts, with the pool as it is at that point of the stream): the
task's record (report.json) holds it as `strategy.prompt_counts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from continual_peft.distributed import shared_mean, world
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.prompt_pool import PromptPoolSite
from continual_peft.strategies.base import STRATEGIES, Strategy
from continual_peft.tasks.streams import shipped_folder

if TYPE_CHECKING:
    from continual_peft.config import LearnerConfig
    from continual_peft.strategies.base import Learner
    from continual_peft.tasks.task import Task

KIND = "prompt_pool"


@STRATEGIES.register("l2p")
class L2P(Strategy):
    """One shared L2P prompt pool; each input prepends its top-N prompts chosen by key.

    Args:
        pull_weight: λ of the key-pull loss (0 switches it off).
    """

    description = "L2P: one shared prompt pool, top-N prompts picked per input by key matching"

    def __init__(self, pull_weight: float = 0.1) -> None:
        if not pull_weight >= 0:
            raise ValueError(f"pull_weight must be >= 0, got {pull_weight}")
        self.pull_weight = float(pull_weight)

    no_budget = "trains one shared prompt pool for every task: the bank holds one slot"

    def check(self, config: LearnerConfig, where: str = "config") -> None:
        kinds = {config.module, *config.task_modules.values()} - {KIND}
        if kinds:
            raise ContinualPeftError(
                f"{where}: strategy 'l2p' trains one {KIND} slot for every task, but the config "
                f'names module kind(s) {sorted(kinds)}; set module = "{KIND}" and no per-task '
                "modules (on the command line: `--strategy l2p` without --module, which runs "
                f"the shipped spec {shipped_folder('strategies') / 'l2p.toml'})"
            )

    def allocate(self, learner: Learner, task: Task) -> int:
        if learner.bank.num_slots == 0:
            return learner.bank.add_slot(seed=learner.task_seed(task, "slot"), kind=KIND)
        return 0

    def loss(self, learner: Learner, task: Task, loss: torch.Tensor) -> torch.Tensor:
        if self.pull_weight == 0:
            return loss
        selection = _site(learner).last
        # under torchrun a rank whose share of a small batch is empty ran no forward this step
        # (its loss is a constant): its selection is an old one, and it adds no rows to the
        # mean, but it still takes part in the mean's count over the ranks
        if selection is None or (world().size > 1 and not loss.requires_grad):
            zero = torch.zeros((), device=loss.device)
            return loss + self.pull_weight * shared_mean(zero, zero)
        return loss + self.pull_weight * selection.pull()

    def after_task(self, learner: Learner, task: Task) -> dict[str, Any]:
        """The task's prompt-selection histogram on its test set, for its record."""
        site = _site(learner)
        query = learner.features(task.test_inputs)  # (n, d) frozen features
        picked = site.choose(query, learner.bank.local_slot(0, KIND))  # (n, N)
        counts = torch.bincount(picked.flatten().cpu(), minlength=site.config.pool_size)
        return {"prompt_counts": counts.tolist()}


def _site(learner: Learner) -> PromptPoolSite:
    return learner.bank.kind_sites[KIND][KIND]
