"""Avalanche integration (the `avalanche` extra): Avalanche benchmarks in, Avalanche's loop out.

Two directions:

- `tasks_from_benchmark` / `stream_from_benchmark` turn any Avalanche classification benchmark
  into our tasks, experience by experience: train experience i and test experience i become
  task i (a benchmark with a single test experience is cut by each train experience's classes).
  Labels are Avalanche's class ids written as strings, so "3" is class 3 in both worlds.
- `ContinualPeftPlugin` lets an Avalanche strategy (e.g. `Naive`) train our per-task modules:
  at each training experience it opens a task on the learner (a slot and a head, chosen by the
  learner's strategy), hands Avalanche an optimizer over exactly those parameters, applies the
  strategy's loss hook, and closes the task afterwards (freeze, router, our monitor's
  re-evaluation, checkpoint). The model Avalanche sees is a `ContinualPeftModel`: logits over
  Avalanche's class ids, from the task's slot and head while training, and at evaluation from the
  slot that the experience's task label names (task-incremental) or that the learner's router
  picks per example (class-incremental). `avalanche_strategy` builds the whole thing.

Avalanche's metrics (accuracy, forgetting, BWT) then see exactly what our monitor measures; the
tests check that the two agree number for number.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from continual_peft.engine.learner import ContinualLearner, TaskSession
from continual_peft.engine.training import TrainResult
from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.sources import Row, label_string
from continual_peft.tasks.streams import Stream
from continual_peft.tasks.task import Task, build_task

try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no QP solver")  # only GEM needs one
        from avalanche.core import SupervisedPlugin
        from avalanche.training.supervised import Naive
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ContinualPeftError(
        "the Avalanche integration needs the avalanche extra: "
        "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[avalanche]'"
    ) from err


def _rows(dataset: Any, where: str, classes: set[str] | None = None) -> list[Row]:
    """Rows of an Avalanche dataset (items are `[x, y, t]`), optionally only some classes."""
    rows = []
    for i in range(len(dataset)):
        x, y = dataset[i][0], dataset[i][1]
        row = Row(x, label_string(y, f"{where}[{i}]"), f"{where}[{i}]")
        if classes is None or row.label in classes:
            rows.append(row)
    return rows


def _task_label(experience: Any) -> int | None:
    labels = getattr(experience, "task_labels", None)
    if labels is None:
        return None
    if len(labels) != 1:
        raise ContinualPeftError(
            f"experience {experience.current_experience} mixes task labels {labels}; each "
            "experience must hold one task (or none)."
        )
    return int(labels[0])


def tasks_from_benchmark(
    benchmark: Any,
    prefix: str = "exp",
    train_stream: str = "train_stream",
    test_stream: str = "test_stream",
    **options: Any,
) -> list[Task]:
    """One task per training experience of an Avalanche classification benchmark.

    Args:
        benchmark: Any Avalanche benchmark whose experiences hold `(x, y, t)` datasets.
        prefix: Task i is named `<prefix>-<i>`.
        train_stream: The benchmark's attribute holding the training experiences.
        test_stream: The one holding the test experiences: as many as the training ones
            (paired by position), or a single one (cut by each task's training classes).
        options: `build_task`'s (`max_train`, `max_test`, `seed`, ...).
    """
    train = list(getattr(benchmark, train_stream))
    test = list(getattr(benchmark, test_stream))
    if len(test) not in (1, len(train)):
        raise ContinualPeftError(
            f"the benchmark has {len(train)} training but {len(test)} test experiences; pair "
            "them one to one, or give a single test experience."
        )
    tasks, description = [], options.pop("description", None)
    for i, experience in enumerate(train):
        train_rows = _rows(experience.dataset, f"{train_stream}[{i}]")
        classes = {row.label for row in train_rows}
        paired = test[i] if len(test) == len(train) else test[0]
        test_rows = _rows(paired.dataset, f"{test_stream}[{test.index(paired)}]", classes)
        label = _task_label(experience)
        described = "" if label is None else f"Avalanche task label {label}"
        tasks.append(
            build_task(
                f"{prefix}-{i}",
                {"train": train_rows, "test": test_rows},
                description=described if description is None else description,
                **options,
            )
        )
    return tasks


def stream_from_benchmark(benchmark: Any, name: str = "avalanche", **options: Any) -> Stream:
    """An Avalanche benchmark as our `Stream` (see `tasks_from_benchmark`)."""
    return Stream(name, tasks_from_benchmark(benchmark, **options), source="avalanche")


def _class_ids(task: Task) -> list[int]:
    try:
        return [int(label) for label in task.labels]
    except ValueError:
        raise ContinualPeftError(
            f"task {task.name!r}: labels {task.labels} are not Avalanche class ids (integers)."
        ) from None


class ContinualPeftModel(nn.Module):
    """The model an Avalanche strategy drives: the learner's forward, as logits over class ids.

    Args:
        learner: The learner whose slots, heads and router answer.
        num_classes: Avalanche's number of classes (the width of the logits).
        use_task_labels: Route each example by its experience's task label (task-incremental
            evaluation) instead of the learner's router (class-incremental).
    """

    def __init__(
        self, learner: ContinualLearner, num_classes: int, use_task_labels: bool = True
    ) -> None:
        super().__init__()
        if learner.backbone.kind not in ("encoder", "image"):
            raise ContinualPeftError(
                f"the Avalanche integration trains classification heads over an encoder; this "
                f"learner's backbone is a {learner.backbone.kind} language model. Use "
                "ContinualLearner.learn (or `continual-peft run`) for language models."
            )
        self.learner = learner
        self.backbone = learner.backbone  # so Avalanche's .to(device)/.train() reach it
        self.num_classes = num_classes
        self.use_task_labels = use_task_labels
        self.session: TaskSession | None = None  # the task being trained
        self.task_of_label: dict[int, str] = {}  # Avalanche task label -> our task name
        self.task_ids: torch.Tensor | None = None  # the current minibatch's task labels

    def forward(self, x: Any) -> torch.Tensor:
        """(B, num_classes) logits; classes outside the row's task are -inf."""
        inputs = list(x)
        if self.training and self.session is not None:
            learner, session = self.learner, self.session
            batch = learner.backbone.collate(learner.backbone.encode(inputs).items)
            with learner.use_task(session.task.name):
                local = session.head(learner.backbone.embed(batch)).float()
            return self._spread(local, [session.task] * len(inputs))
        return self._predicted(inputs)

    def _spread(self, local: torch.Tensor, tasks: list[Task]) -> torch.Tensor:
        """Per-task logits (B, C_task) placed at each task's class ids in (B, num_classes)."""
        out = torch.full((local.shape[0], self.num_classes), float("-inf"), device=local.device)
        for i, task in enumerate(tasks):
            ids = torch.tensor(_class_ids(task), device=local.device)
            out[i, ids] = local[i, : len(ids)]
        return out

    @torch.no_grad()
    def _predicted(self, inputs: list) -> torch.Tensor:
        """Evaluation: our prediction per row, as 0 at the predicted class and -inf elsewhere."""
        learner = self.learner
        tasks: list[str] | None = None
        if self.use_task_labels and self.task_ids is not None:
            unknown = sorted({int(t) for t in self.task_ids} - set(self.task_of_label))
            if unknown:  # an experience not trained yet: nothing can be right about it
                return torch.zeros(len(inputs), self.num_classes, device=learner.backbone.device)
            tasks = [self.task_of_label[int(t)] for t in self.task_ids]
        labels = learner.predict(inputs, task=tasks)
        out = torch.full((len(inputs), self.num_classes), float("-inf"), device="cpu")
        for i, label in enumerate(labels):
            if label is not None:  # None: the router rejected the row
                out[i, int(label)] = 0.0
        return learner.backbone.placement.put(out)  # filled on the CPU, one copy


class ContinualPeftPlugin(SupervisedPlugin):
    """Trains the learner's per-task modules inside an Avalanche strategy's own loop.

    Args:
        learner: The learner; its strategy picks each task's slot, its router routes.
        tasks: Our tasks, one per training experience in order (`tasks_from_benchmark`); their
            test sets are what our monitor re-evaluates after each experience.
        lr: AdamW learning rate for each task's slot and head; the learner's when None.
    """

    def __init__(
        self, learner: ContinualLearner, tasks: list[Task], lr: float | None = None
    ) -> None:
        super().__init__()
        self.learner = learner
        self.tasks = tasks
        self.lr = learner.config.train.lr if lr is None else lr
        self.steps = 0
        self.started = 0.0

    def _model(self, strategy) -> ContinualPeftModel:
        if not isinstance(strategy.model, ContinualPeftModel):
            raise ContinualPeftError(
                "ContinualPeftPlugin needs the strategy's model to be a ContinualPeftModel; "
                "build the strategy with avalanche_strategy(...)."
            )
        return strategy.model

    def before_training_exp(self, strategy, **kwargs) -> None:
        index = strategy.experience.current_experience
        if index >= len(self.tasks):
            raise ContinualPeftError(
                f"experience {index} has no task: the plugin was given {len(self.tasks)} tasks."
            )
        model = self._model(strategy)
        session = self.learner.begin_task(self.tasks[index])
        model.session = session
        label = _task_label(strategy.experience)
        if label is not None:
            model.task_of_label[label] = session.task.name
        config = self.learner.config.train
        strategy.optimizer = torch.optim.AdamW(
            session.params, lr=self.lr, weight_decay=config.weight_decay
        )
        self.steps, self.started = 0, time.perf_counter()

    def before_forward(self, strategy, **kwargs) -> None:
        self._model(strategy).task_ids = strategy.mb_task_id

    before_eval_forward = before_forward

    def before_backward(self, strategy, **kwargs) -> None:
        session = self._model(strategy).session
        strategy.loss = session.adjust_loss(strategy.loss)
        if not torch.isfinite(strategy.loss):
            raise ContinualPeftError(
                f"task {session.task.name}: the loss became {strategy.loss.item()}; lower the "
                f"learning rate (now {self.lr})."
            )
        self.steps += 1

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = self._model(strategy)
        session, model.session = model.session, None
        loss = float(strategy.loss.item()) if torch.is_tensor(strategy.loss) else float("nan")
        seconds = time.perf_counter() - self.started
        result = TrainResult(final_loss=loss, steps=self.steps, seconds=seconds)
        self.learner.end_task(session, result)


class ContinualPeftStrategy(Naive):
    """Avalanche's `Naive` loop, except that the optimizer is the plugin's, made per task.

    Avalanche would otherwise rebuild its optimizer over every model parameter at each
    experience; here only the task's slot and head may change, so `make_optimizer` keeps what
    `ContinualPeftPlugin.before_training_exp` hands over.
    """

    def make_optimizer(self, **kwargs) -> None:
        self.optimized_param_id = {}  # marks the optimizer as set up for Avalanche's checks


def avalanche_strategy(
    learner: ContinualLearner,
    benchmark: Any,
    tasks: list[Task] | None = None,
    use_task_labels: bool | None = None,
    **strategy_options: Any,
) -> ContinualPeftStrategy:
    """An Avalanche strategy (`Naive`'s loop) whose model and training are the learner's.

    Args:
        learner: The learner to train.
        benchmark: The Avalanche benchmark it will be trained on.
        tasks: Our tasks for its experiences; `tasks_from_benchmark(benchmark)` when None.
        use_task_labels: Evaluate by task label (task-incremental) rather than by the router;
            by default when the training experiences carry distinct task labels.
        strategy_options: Passed to `Naive`: `evaluator`, `train_mb_size`, `train_epochs`,
            `eval_mb_size`, `device`, more `plugins`, ...
    """
    tasks = tasks_from_benchmark(benchmark) if tasks is None else tasks
    experiences = list(benchmark.train_stream)
    if use_task_labels is None:
        labels = [_task_label(e) for e in experiences]
        use_task_labels = None not in labels and len(set(labels)) == len(labels)
    if not use_task_labels and learner.router is None:
        raise ContinualPeftError(
            "this benchmark has no distinct task labels, so examples must be routed: give the "
            "learner a router (e.g. router='mahalanobis'), or pass use_task_labels=True."
        )
    num_classes = 1 + max(max(_class_ids(task)) for task in tasks)
    model = ContinualPeftModel(learner, num_classes, use_task_labels)
    plugins = [ContinualPeftPlugin(learner, tasks), *strategy_options.pop("plugins", [])]
    strategy_options.setdefault("train_mb_size", learner.config.train.batch_size)
    strategy_options.setdefault("train_epochs", learner.config.train.epochs)
    strategy_options.setdefault("eval_mb_size", learner.config.train.eval_batch_size)
    strategy_options.setdefault("device", str(learner.backbone.device))
    zero = nn.Parameter(torch.zeros(1, device=learner.backbone.device))
    placeholder = torch.optim.SGD([zero], lr=0.0)  # replaced per task
    return ContinualPeftStrategy(
        model=model,
        optimizer=placeholder,
        criterion=nn.CrossEntropyLoss(),
        plugins=plugins,
        **strategy_options,
    )
