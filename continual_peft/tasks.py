"""Tasks: a name, its labels, and train/test examples; loaded from JSONL or built from lists.

Every problem with the data is reported with the file and line, and what to do about it.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from continual_peft._registry import validate_task_name
from continual_peft.errors import ContinualPeftError


@dataclass
class Task:
    """One classification task of a stream. Labels are stored as indices into `labels`."""

    name: str
    labels: list[str]
    train_inputs: list[str]
    train_labels: list[int]
    test_inputs: list[str]
    test_labels: list[int]
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # split -> file, for messages
    router_inputs: list[str] = field(default_factory=list)  # inputs that fit the router; [] = train

    @classmethod
    def from_examples(
        cls,
        name: str,
        train: list[tuple[str, str]],
        test: list[tuple[str, str]],
        labels: list[str] | None = None,
        description: str = "",
    ) -> Task:
        """Build a task from `(text, label)` pairs; `labels` defaults to the sorted train labels."""
        validate_task_name(name)
        labels = sorted({label for _, label in train}) if labels is None else list(labels)
        splits = {"train": [(t, lab, i + 1) for i, (t, lab) in enumerate(train)]}
        splits["test"] = [(t, lab, i + 1) for i, (t, lab) in enumerate(test)]
        return _build(name, labels, splits, {"train": "train", "test": "test"}, description)


def read_jsonl(path: Path) -> list[tuple[str, str, int]]:
    """`(text, label, line number)` for each non-blank line of a JSONL file."""
    if not path.is_file():
        raise ContinualPeftError(
            f"{path}: file not found. Check the path or the --data-root option."
        )
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ContinualPeftError(
                    f"{path}:{number}: not UTF-8 ({err.reason}); re-encode the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ContinualPeftError(
                    f"{path}:{number}: malformed JSON ({err.msg}); each line must be one JSON "
                    "object."
                ) from None
            if not (
                isinstance(record, dict)
                and isinstance(record.get("text"), str)
                and isinstance(record.get("label"), str | int)
            ):
                raise ContinualPeftError(
                    f'{path}:{number}: expected {{"text": "...", "label": "..."}}, '
                    f"got {line.strip()[:80]!r}"
                )
            rows.append((record["text"], str(record["label"]), number))
    return rows


def read_labels(path: Path) -> list[str]:
    """A task's labels from a JSON list (e.g. `labels.json`)."""
    if not path.is_file():
        raise ContinualPeftError(
            f"{path}: labels file not found; it must hold a JSON list of label strings."
        )
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ContinualPeftError(f"{path}: not a valid JSON list of labels ({err}).") from None
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str | int) for x in labels)
    ):
        raise ContinualPeftError(f"{path}: expected a non-empty JSON list of label strings.")
    return [str(x) for x in labels]


def load_task(
    name: str,
    train: Path,
    test: Path,
    labels: list[str] | Path,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    description: str = "",
    router_max_train: int | None = None,
) -> Task:
    """Load a task from JSONL files, keeping a seeded random subset when limits are given.

    `router_max_train` picks a separate seeded subset of the training file whose texts only fit
    the router (frozen features are cheap, so a router may see more inputs than the slot).
    """
    validate_task_name(name)
    label_list = read_labels(labels) if isinstance(labels, Path) else [str(x) for x in labels]
    if not label_list:
        raise ContinualPeftError(
            f"task {name!r}: its labels list is empty; list the task's labels."
        )
    splits = {"train": read_jsonl(train), "test": read_jsonl(test)}
    rows = splits["train"]
    router_rows = rows
    if router_max_train is not None and router_max_train < 1:
        raise ContinualPeftError(
            f"task {name!r}: router_max_train = {router_max_train} is invalid; it must be >= 1."
        )
    if router_max_train is not None and len(rows) > router_max_train:
        keep = sorted(
            random.Random(f"{seed}-{name}-router").sample(range(len(rows)), router_max_train)
        )
        router_rows = [rows[i] for i in keep]
    rng = random.Random(f"{seed}-{name}")
    for split, limit in (("train", max_train), ("test", max_test)):
        if limit is not None and limit < 1:
            raise ContinualPeftError(
                f"task {name!r}: max_{split} = {limit} is invalid; it must be >= 1 (or left out "
                "to keep every example)."
            )
        rows = splits[split]
        if limit is not None and len(rows) > limit:
            keep = sorted(rng.sample(range(len(rows)), limit))
            splits[split] = [rows[i] for i in keep]
    task = _build(name, label_list, splits, {"train": str(train), "test": str(test)}, description)
    if router_max_train is not None:
        task.router_inputs = [text for text, _, _ in router_rows]
    return task


def _build(name, labels, splits, sources, description) -> Task:
    if len(set(labels)) != len(labels):
        raise ContinualPeftError(f"task {name!r}: duplicate labels in {labels}")
    index = {label: i for i, label in enumerate(labels)}
    encoded = {}
    for split, rows in splits.items():
        if not rows:
            raise ContinualPeftError(
                f"task {name!r}: the {split} split ({sources[split]}) is empty; give it examples."
            )
        for _, label, number in rows:
            if label not in index:
                raise ContinualPeftError(
                    f"{sources[split]}:{number}: label {label!r} is not one of task {name!r}'s "
                    f"labels {labels}; declare it in the task's labels or fix the line."
                )
        encoded[split] = ([t for t, _, _ in rows], [index[lab] for _, lab, _ in rows])
    return Task(
        name, labels, *encoded["train"], *encoded["test"], description=description, sources=sources
    )


def read_texts(source: str | Path) -> list[str]:
    """Texts to predict: a JSONL file (or "-" for standard input) with a "text" per line."""
    name = "<stdin>" if str(source) == "-" else str(source)
    if name != "<stdin>" and not Path(source).is_file():
        raise ContinualPeftError(f"{name}: file not found.")
    raw = sys.stdin.buffer.read() if name == "<stdin>" else Path(source).read_bytes()
    texts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ContinualPeftError(f"{name}:{number}: not a UTF-8 JSON line ({err}).") from None
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
            raise ContinualPeftError(f'{name}:{number}: expected {{"text": "..."}}.')
        texts.append(record["text"])
    if not texts:
        raise ContinualPeftError(f"{name}: no texts to predict.")
    return texts
