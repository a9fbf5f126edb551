"""Task streams from TOML spec files, and the demo stream that ships inside the package.

A stream spec (see `streams/*.toml`):

    name = "cl_benchmark"            # required
    description = "..."
    data_root = "../data"            # task paths are relative to it; itself relative to the spec
    order = ["dbpedia", "amazon"]    # training order; default: the order of [[tasks]]
    seed = 0                         # which random subset max_train/max_test keep
    max_train = 300                  # per-task limits, overridable per task
    max_test = 200
    router_max_train = 2000          # inputs per task that fit the router (default: the slot's)

    [[tasks]]
    name = "dbpedia"                 # ^[a-z0-9][a-z0-9_-]*$, unique
    train = "dbpedia/train.jsonl"    # JSONL lines {"text": ..., "label": ...}
    test = "dbpedia/test.jsonl"
    labels = "dbpedia/labels.json"   # a JSON list file, or an inline list of strings
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from continual_peft._registry import validate_task_name
from continual_peft._spec import Section, read_toml
from continual_peft.errors import ContinualPeftError
from continual_peft.tasks import Task, load_task

STREAM_KEYS = {
    "name",
    "description",
    "data_root",
    "order",
    "seed",
    "max_train",
    "max_test",
    "router_max_train",
    "tasks",
}
TASK_KEYS = {
    "name",
    "train",
    "test",
    "labels",
    "max_train",
    "max_test",
    "router_max_train",
    "description",
}


@dataclass
class Stream:
    """Tasks in training order."""

    name: str
    tasks: list[Task]
    description: str = ""
    source: str = ""  # the spec file


def demo_spec_path() -> Path:
    """The embedded demo stream's spec, inside the installed package."""
    return Path(__file__).parent / "data" / "demo" / "stream.toml"


def load_stream(
    spec: str | Path | None = None,
    data_root: str | Path | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    router_max_train: int | None = None,
) -> Stream:
    """Read a stream spec and load every task, so bad data fails before any training starts.

    Args:
        spec: The TOML spec file; the embedded demo when None.
        data_root: Overrides the spec's `data_root`.
        max_train: Overrides every task's training-example limit.
        max_test: Overrides every task's test-example limit.
        router_max_train: Overrides how many training inputs per task fit the router.
    """
    path = Path(spec) if spec is not None else demo_spec_path()
    top = Section(read_toml(path), str(path), STREAM_KEYS)
    name = validate_task_name(top.get("name", str, required=True), f"{path}: name")
    root = (
        Path(data_root) if data_root is not None else path.parent / top.get("data_root", str, ".")
    )
    seed = top.get("seed", int, 0)
    entries = top.get("tasks", list, required=True)
    if not entries:
        raise ContinualPeftError(f"{path}: the stream has no [[tasks]]; add at least one.")
    by_name: dict[str, Task] = {}
    for i, entry in enumerate(entries):
        section = Section(entry, f"{path}: tasks[{i}]", TASK_KEYS)
        task_name = validate_task_name(
            section.get("name", str, required=True), f"{path}: tasks[{i}].name"
        )
        if task_name in by_name:
            raise ContinualPeftError(f"{path}: tasks[{i}].name: duplicate task name {task_name!r}")
        labels = section.get("labels", (str, list), required=True)
        by_name[task_name] = load_task(
            task_name,
            train=root / section.get("train", str, required=True),
            test=root / section.get("test", str, required=True),
            labels=root / labels if isinstance(labels, str) else labels,
            max_train=_limit(max_train, section, top, "max_train"),
            max_test=_limit(max_test, section, top, "max_test"),
            router_max_train=_limit(router_max_train, section, top, "router_max_train"),
            seed=seed,
            description=section.get("description", str, ""),
        )
    order = top.get("order", list, list(by_name))
    return Stream(
        name,
        order_tasks(by_name, order, f"{path}: order"),
        top.get("description", str, ""),
        str(path),
    )


def _limit(override: int | None, task: Section, top: Section, key: str) -> int | None:
    """An example limit: the command line's, else the task's, else the stream's."""
    return override if override is not None else task.get(key, int, top.get(key, int))


def order_tasks(by_name: dict[str, Task], order: list[str], where: str) -> list[Task]:
    """The tasks in `order`, which must name each task at most once."""
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise ContinualPeftError(
            f"{where}: unknown task(s) {unknown}; tasks in this stream: {list(by_name)}"
        )
    if len(set(order)) != len(order):
        raise ContinualPeftError(f"{where}: a task is listed twice in {order}")
    if not order:
        raise ContinualPeftError(f"{where}: empty order; name at least one task.")
    return [by_name[n] for n in order]
