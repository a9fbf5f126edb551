"""Class splits: one labelled dataset cut into tasks by groups of its labels (class-incremental).

`split_by_class` works on rows (as a stream spec's [[class_split]] tables give them);
`class_split` on Python objects: `(inputs, labels)` sequences or indexable datasets.
"""

from __future__ import annotations

import re
from typing import Any

from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.sources import Row, rows_from_dataset, rows_from_lists
from continual_peft.tasks.task import Task, build_task, default_labels


def split_by_class(
    prefix: str,
    splits: dict[str, list[Row]],
    classes_per_task: int | None = None,
    groups: list[list[str]] | None = None,
    **options: Any,
) -> list[Task]:
    """Cut one labelled dataset into tasks by groups of labels (a "split" benchmark).

    Args:
        prefix: Tasks are named `<prefix>-<its labels joined by "-">` (e.g. "digits-0-1") when
            the labels fit in a task name, else `<prefix>-<1, 2, ...>`.
        splits: "train" and "test" rows of the whole dataset.
        classes_per_task: Consecutive groups of this many labels, in label order (the last group
            may be smaller).
        groups: Explicit label groups instead; each label at most once.
        options: `build_task`'s (`max_train`, `max_test`, `seed`, ...), for every task.
    """
    if (classes_per_task is None) == (groups is None):
        raise ContinualPeftError(
            f"class split {prefix!r}: give exactly one of classes_per_task or groups."
        )
    everything = default_labels(r.label for r in splits["train"])
    if groups is None:
        if classes_per_task < 1:
            raise ContinualPeftError(
                f"class split {prefix!r}: classes_per_task = {classes_per_task}; it must be >= 1."
            )
        groups = [
            everything[i : i + classes_per_task]
            for i in range(0, len(everything), classes_per_task)
        ]
    groups = [[str(label) for label in group] for group in groups]
    flat = [label for group in groups for label in group]
    unknown = sorted(set(flat) - set(everything))
    if unknown or len(set(flat)) != len(flat) or not all(groups):
        raise ContinualPeftError(
            f"class split {prefix!r}: groups {groups} must be non-empty, use each label at most "
            f"once, and only labels of the training data {everything} (unknown: {unknown})."
        )
    named = all(re.fullmatch(r"[a-z0-9_-]+", label) for label in flat)
    return [
        build_task(
            f"{prefix}-{'-'.join(group)}" if named else f"{prefix}-{i + 1}",
            splits,
            classes=group,
            **options,
        )
        for i, group in enumerate(groups)
    ]


def class_split(
    prefix: str,
    train: Any,
    test: Any,
    classes_per_task: int | None = None,
    groups: list[list[str]] | None = None,
    **options: Any,
) -> list[Task]:
    """Cut one labelled dataset into tasks by groups of labels, from Python objects.

    `train` and `test` are each an `(inputs, labels)` pair of sequences, or an indexable dataset
    of `(input, label)` items (e.g. a torch `Dataset`). See `split_by_class` for the rest.

    Example:
        tasks = class_split("digits", (x_train, y_train), (x_test, y_test), classes_per_task=2)
    """
    splits = {}
    for split, data in (("train", train), ("test", test)):
        if isinstance(data, tuple) and len(data) == 2:
            splits[split] = rows_from_lists(data[0], data[1], split)
        else:
            splits[split] = rows_from_dataset(data, split)
    return split_by_class(prefix, splits, classes_per_task, groups, **options)
