"""Tasks: a name, its labels, and train/test examples, built from any source in `sources.py`.

A task classifies its inputs, or (kind "generation") maps them to free-text targets, stored as
its labels (`generation.py`).

Every problem with the data is reported with where the example came from (file and line, or
split and index), and what to do about it.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continual_peft.errors import ContinualPeftError, check_file
from continual_peft.registry import validate_task_name
from continual_peft.tasks.generation import (
    CLASSIFICATION,
    GENERATION,
    check_kind,
    check_targets,
    check_template,
    columns_for,
    fill_template,
    refuse_label_keys,
    target_labels,
)
from continual_peft.tasks.sources import (
    Row,
    load_hf_split,
    read_rows,
    rows_from_dataset,
    rows_from_lists,
)

# By default a router is fitted on every training input of a task (frozen features cost one
# forward and no training), at most this many: a seeded subset beyond. The features are held
# only while the router takes their statistics: 10,000 x 1,152 float32 (MiniLM's default router
# features) is 46 MB.
ROUTER_CAP = 10_000
# What happens to a record whose label is not one of the task's labels (MNLI's "-", no gold
# label): skipped and counted per split (the default), or refused with an error naming it.
UNKNOWN_LABELS = ("skip", "refuse")
NO_GOLD = "-"  # the label the published NLI data gives a record without a gold label
MAX_SKIPPED = 0.05  # the most of a split that records of no known label may be
DEFAULT_DEV_SHARE = 0.1  # where a dev split is needed (a sweep) and none is set or given
DEV_SHARE_EXAMPLE = "dev_share = 0.1 (a tenth of each label's training examples)"


@dataclass
class Task:
    """One task of a stream. Labels are stored as indices into `labels`.

    Inputs are texts, or images (PIL images, arrays or tensors) for an image backbone. A
    generation task's labels are its distinct targets, in order of first appearance.
    """

    name: str
    labels: list[str]
    train_inputs: list
    train_labels: list[int]
    test_inputs: list
    test_labels: list[int]
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    router_inputs: list = field(default_factory=list)  # inputs that fit the router; [] = train
    # router_inputs are the default pool (every training input, capped), not a chosen subset:
    # left out of the task's data hash, so it hashes like a task with no router inputs given
    router_default: bool = False
    kind: str = CLASSIFICATION  # or GENERATION: the labels are the targets' texts
    template: str | None = None  # what a generative backbone reads, "{text}" standing for the input
    # a dev split for choosing settings (never the test set): carved from the training data
    # (`dev_share`) or given; empty when the task has none. Labels are indices as above.
    dev_inputs: list = field(default_factory=list)
    dev_labels: list[int] = field(default_factory=list)
    # split -> {label: records skipped because that label is not one of `labels`}
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    # why a given dev split was not used (it holds the test split's records), else ""
    dev_refused: str = ""

    @classmethod
    def without_data(cls, name: str, labels: list[str]) -> Task:
        """A task known by its name and labels only (a run loaded without its data)."""
        return cls(
            name=name,
            labels=labels,
            train_inputs=[],
            train_labels=[],
            test_inputs=[],
            test_labels=[],
        )

    def prompt(self, text: str) -> str:
        """`text` as a generative backbone reads it: the template with every "{text}" replaced
        by it (other braces kept as written), or the text itself when there is no template."""
        return fill_template(self.template, text)

    @classmethod
    def from_examples(
        cls,
        name: str,
        train: list[tuple[Any, Any]],
        test: list[tuple[Any, Any]],
        labels: list[str] | None = None,
        description: str = "",
        **options: Any,
    ) -> Task:
        """Build a task from `(input, label)` pairs (a generation task's: `(input, target)`);
        `labels` defaults to the train labels. `options` are `build_task`'s (`kind`, ...)."""
        return cls.from_lists(
            name, *_unzip(train), *_unzip(test), labels=labels, description=description, **options
        )

    @classmethod
    def from_lists(
        cls,
        name: str,
        train_inputs: Sequence,
        train_labels: Sequence,
        test_inputs: Sequence,
        test_labels: Sequence,
        labels: list[str] | None = None,
        **options: Any,
    ) -> Task:
        """Build a task from parallel lists of inputs and labels (strings or integers), or of
        inputs and targets (`kind="generation"`).

        `options` are `build_task`'s: `kind`, `template`, `classes`, `max_train`, `seed`, ...
        """
        splits = {
            "train": rows_from_lists(train_inputs, train_labels, "train"),
            "test": rows_from_lists(test_inputs, test_labels, "test"),
        }
        return build_task(name, splits, labels, **options)

    @classmethod
    def from_dataset(
        cls,
        name: str,
        train: Any,
        test: Any,
        labels: list[str] | None = None,
        input_key: int | str = 0,
        label_key: int | str = 1,
        **options: Any,
    ) -> Task:
        """Build a task from two indexable datasets (e.g. torch `Dataset`s) of `(input, label)`.

        Items may also be dicts; `input_key`/`label_key` name their fields.
        """
        splits = {
            split: rows_from_dataset(data, split, input_key, label_key)
            for split, data in (("train", train), ("test", test))
        }
        return build_task(name, splits, labels, **options)

    @classmethod
    def from_hf(
        cls,
        name: str,
        source: Any,
        text_column: str | None = None,
        label_column: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        labels: list[str] | None = None,
        data_files: dict[str, str] | None = None,
        kind: str = CLASSIFICATION,
        **options: Any,
    ) -> Task:
        """Build a task from a Hugging Face dataset (needs the `hf` extra), offline.

        `source` is a `DatasetDict`, a folder written by `save_to_disk`, a folder of data files,
        or a builder name ("csv", "json", "parquet", "imagefolder") with `data_files`. The
        columns default to "text" and "label" ("prompt" or "text", and "target", for a
        generation task).
        """
        text, label = columns_for(check_kind(kind, f"task {name!r}"), text_column, label_column)
        columns = {"text_column": text, "label_column": label, "data_files": data_files}
        splits = {
            "train": load_hf_split(source, train_split, **columns),
            "test": load_hf_split(source, test_split, **columns),
        }
        return build_task(name, splits, labels, kind=kind, **options)


def _unzip(pairs: list[tuple[Any, Any]]) -> tuple[list, list]:
    return [x for x, _ in pairs], [y for _, y in pairs]


def read_labels(path: Path) -> list[str]:
    """A task's labels from a JSON list (e.g. `labels.json`)."""
    check_file(
        path,
        "labels file",
        "it must hold a JSON list of label strings (or leave `labels` out "
        "to take the training labels)",
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
    labels = [str(x) for x in labels]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ContinualPeftError(
            f"{path}: labels {repeated} appear more than once; each label must be listed once "
            "(its position is its logit)."
        )
    return labels


def load_task(
    name: str,
    train: Path,
    test: Path,
    labels: list[str] | Path | None = None,
    file_format: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    kind: str = CLASSIFICATION,
    **options: Any,
) -> Task:
    """Load a task from data files (JSONL, CSV or TSV, told apart by extension or `file_format`).

    Args:
        name: The task's name.
        train: The training file.
        test: The test file.
        labels: The label list, a JSON file holding it, or None for the sorted train labels.
        file_format: "jsonl", "csv" or "tsv"; from the extension when None.
        text_column: The field (JSONL key or CSV header) with the input text; "text" by
            default ("prompt" or "text" for a generation task).
        label_column: The field with the label; "label" by default ("target" for a generation
            task).
        kind: "classification" or "generation".
        options: `build_task`'s: `template`, `classes`, `max_train`, `max_test`, ...
    """
    generation = check_kind(kind, f"task {name!r}") == GENERATION  # its labels are refused
    label_list = read_labels(labels) if isinstance(labels, Path) and not generation else labels
    text, label = columns_for(kind, text_column, label_column)
    splits = {
        split: read_rows(path, file_format, text, label)
        for split, path in (("train", train), ("test", test))
    }
    sources = {"train": str(train), "test": str(test)}
    return build_task(name, splits, label_list, sources=sources, kind=kind, **options)


def default_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels, sorted; numerically when every label is an integer ("2" before "10").

    The order is total, so it never depends on a set's (hash-randomised) order: labels equal as
    numbers ("7", "07", "007") are ordered by their text.
    """
    distinct = set(labels)
    numeric = all(label.lstrip("-").isdigit() for label in distinct)
    return sorted(distinct, key=(lambda label: (int(label), label)) if numeric else None)


def build_task(
    name: str,
    splits: dict[str, list[Row]],
    labels: list[str] | None = None,
    classes: list[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    router_max_train: int | None = None,
    seed: int = 0,
    description: str = "",
    sources: dict[str, str] | None = None,
    kind: str = CLASSIFICATION,
    template: str | None = None,
    dev_share: float | None = None,
    unknown_labels: str = "skip",
) -> Task:
    """A task from its train and test rows (and dev rows, given or carved), every label checked
    against the label list.

    Args:
        name: The task's name.
        splits: "train" and "test" rows, and "dev" rows when the data has a dev split. Dev rows
            identical to the test rows (the published CL_Benchmark's dev.json is a copy of its
            test.json) are not used as dev: `Task.dev_refused` says so, and a `dev_share`
            carves one instead.
        labels: The label list; by default `classes`, else the distinct train labels.
        classes: Keep only rows with these labels (one task of a class-split stream).
        max_train: Keep a seeded random subset of this many training examples.
        max_test: The same for the test split.
        router_max_train: Fit the router on a separate seeded subset of this many training
            inputs. By default it is fitted on every training input, at most `ROUTER_CAP`
            (frozen features are cheap, so a router may see more inputs than the slot).
        seed: Which random subsets are kept.
        description: Shown in reports.
        sources: Split -> where it came from, for messages; from the rows when None.
        kind: "classification", or "generation": the rows' labels are targets, the task's
            labels their distinct texts in order of first appearance (no `labels`/`classes`).
        template: What a generative backbone reads, with "{text}" where the input goes.
        dev_share: Carve a dev split of this share (0 < share < 1) from the training rows when
            no dev rows are given (or the given ones are the test rows): seeded, stratified by
            label (each label gives round(share x its count) rows), before `max_train` picks
            the training subset, so dev and train never share a row. Capped by `max_test`.
        unknown_labels: "skip": rows whose label is not one of the task's labels are left out
            and counted per split (`Task.skipped`); "refuse": such a row is an error.

    Raises:
        ContinualPeftError: An empty split, a bad limit or share, or (with "refuse") a row of
            an unknown label; each named with where it came from.
    """
    validate_task_name(name)
    check_kind(kind, f"task {name!r}")
    template = check_template(template, f"task {name!r}")
    check_dev_share(dev_share, f"task {name!r}")
    check_unknown_labels(unknown_labels, f"task {name!r}")
    where = dict(sources or {})
    for split, rows in splits.items():
        where.setdefault(split, _origin(rows, split))
    skipped: dict[str, dict[str, int]] = {}
    if kind == GENERATION:
        refuse_label_keys(f"task {name!r}", labels=labels, classes=classes)
        check_targets(splits)
    else:
        splits = _keep_classes(splits, classes) if classes is not None else splits
        declared = labels is not None or classes is not None
        if not declared:  # the labels come from the training rows: there must be some
            _check_rows(
                name, "train", splits["train"], where=where["train"], classes=None, skipped={}
            )
        labels = _label_list(labels, classes, splits["train"])
        _check_labels(name, labels)
        if not declared and NO_GOLD in labels:
            warnings.warn(
                f"task {name!r}: its labels, taken from its training data, include {NO_GOLD!r}, "
                "which usually marks a record without a gold label (as in MNLI); declare the "
                "task's labels (labels.json or labels = [...]) to leave such records out instead "
                "of learning them as a class",
                UserWarning,
                stacklevel=2,
            )
        if unknown_labels == "skip":  # every row left holds a known label
            splits, skipped = _skip_unknown(name, splits, labels, where)
        else:
            for rows in splits.values():  # every row, before any subset is drawn
                _check_known(name, rows, labels)
    limits = {"max_train": max_train, "max_test": max_test, "router_max_train": router_max_train}
    _check_limits(name, limits)
    by_label = kind != GENERATION  # a generation task's targets are (nearly) all distinct
    splits, refused = _dev_split(
        name, splits, dev_share, seed=seed, where=where, stratified=by_label
    )
    if refused:
        skipped.pop("dev", None)
    _warn_skipped(name, skipped, labels)
    router_limit = ROUTER_CAP if router_max_train is None else router_max_train
    router_rows = _subset(splits["train"], router_limit, f"{seed}-{name}-router")
    # one random stream per split: which test rows a run scores depends on the seed and the
    # test data alone, not on max_train or a dev split (the training subset draws first from
    # the stream it always used, so it is the same as before splits had streams of their own)
    streams = {
        "train": f"{seed}-{name}",
        "test": f"{seed}-{name}-test",
        "dev": f"{seed}-{name}-dev",
    }
    splits = {
        split: _subset(splits[split], limit, random.Random(streams[split]))
        for split, limit in (("train", max_train), ("test", max_test), ("dev", max_test))
        if split in splits
    }
    labels = target_labels(splits) if kind == GENERATION else labels
    for split, rows in splits.items():
        _check_rows(name, split, rows, where=where[split], classes=classes, skipped=skipped)
    index = {label: i for i, label in enumerate(labels)}
    inputs = {split: [r.input for r in rows] for split, rows in splits.items()}
    targets = {split: [index[r.label] for r in rows] for split, rows in splits.items()}
    task = Task(
        name=name,
        labels=labels,
        train_inputs=inputs["train"],
        train_labels=targets["train"],
        test_inputs=inputs["test"],
        test_labels=targets["test"],
        description=description,
        sources=where,
        kind=kind,
        template=template,
        dev_inputs=inputs.get("dev", []),
        dev_labels=targets.get("dev", []),
        skipped=skipped,
        dev_refused=refused,
    )
    if router_max_train is not None or len(router_rows) != len(task.train_inputs):
        task.router_inputs = [r.input for r in router_rows]
        task.router_default = router_max_train is None
    return task


def check_dev_share(share: Any, where: str) -> float | None:
    """`share` if it is None or a number strictly between 0 and 1; else an error."""
    if share is None:
        return None
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
        raise ContinualPeftError(
            f"{where}: dev_share = {share!r} must be a number strictly between 0 and 1, e.g. "
            f"{DEV_SHARE_EXAMPLE}."
        )
    return float(share)


def check_unknown_labels(value: Any, where: str) -> str:
    """`value` if it is one of `UNKNOWN_LABELS`; else an error naming them."""
    if value not in UNKNOWN_LABELS:
        raise ContinualPeftError(
            f'{where}: unknown_labels = {value!r}; use "skip" (leave such records out, '
            'counted) or "refuse" (an error).'
        )
    return value


def _skip_unknown(
    name: str, splits: dict[str, list[Row]], labels: list[str], where: dict[str, str]
) -> tuple[dict[str, list[Row]], dict[str, dict[str, int]]]:
    """The rows whose label is one of `labels`, and per split the count of each label left out.

    Only a few records may go this way (no gold label, as MNLI's "-"): a label that differs
    from a declared one only in case or spaces, or more than `MAX_SKIPPED` of a split, is a
    mistake in the labels or the data, and refused.
    """
    known = set(labels)
    plain = {_plain(label): label for label in labels}
    kept, skipped = {}, {}
    for split, rows in splits.items():
        kept[split] = [r for r in rows if r.label in known]
        left = Counter(r.label for r in rows if r.label not in known)
        if not left:
            continue
        skipped[split] = dict(sorted(left.items()))
        near = [label for label in left if _plain(label) in plain]
        if near:
            raise ContinualPeftError(
                f"task {name!r}: the {split} split's label {near[0]!r} differs from the declared "
                f"{plain[_plain(near[0])]!r} only in case or spaces; make the labels and the "
                "data agree (labels.json or the task's labels, or the records)."
            )
        share = sum(left.values()) / len(rows)
        if share > MAX_SKIPPED:
            counts = ", ".join(f"{label!r} x{n}" for label, n in left.most_common(5))
            raise ContinualPeftError(
                f"task {name!r}: {sum(left.values())} of the {len(rows)} records of its {split} "
                f"split ({where.get(split, split)}) have a label that is not one of its labels "
                f"{labels}: {counts}. Only records without a gold label (at most "
                f"{MAX_SKIPPED:.0%} of a split) are left out; check the task's labels "
                "(labels.json) against the data's label field."
            )
    return kept, skipped


def _plain(label: str) -> str:
    return " ".join(label.split()).casefold()


def _check_known(name: str, rows: list[Row], labels: list[str]) -> None:
    """Refuse the first row whose label is not one of `labels` (every row, before sampling)."""
    known = set(labels)
    for row in rows:
        if row.label not in known:
            raise ContinualPeftError(
                f"{row.where}: label {row.label!r} is not one of task {name!r}'s labels "
                f"{labels}; declare it in the task's labels or fix the example (or drop "
                '--strict-labels / unknown_labels = "refuse" to leave such records out, '
                "counted)."
            )


def _warn_skipped(name: str, skipped: dict[str, dict[str, int]], labels: list[str]) -> None:
    if not skipped:
        return
    counts = "; ".join(
        f"{split}: {sum(left.values())} ("
        + ", ".join(f"{label!r} x{n}" for label, n in list(left.items())[:5])
        + ")"
        for split, left in skipped.items()
    )
    warnings.warn(
        f"task {name!r}: left out records whose label is not one of its labels {labels} "
        f"(no gold label, or a label it does not declare): {counts}. They are counted in the "
        'task\'s record; unknown_labels = "refuse" (--strict-labels) refuses them instead.',
        UserWarning,
        stacklevel=3,
    )


def _dev_split(
    name: str,
    splits: dict[str, list[Row]],
    share: float | None,
    *,
    seed: int,
    where: dict[str, str],
    stratified: bool = True,
) -> tuple[dict[str, list[Row]], str]:
    """The splits with the dev split settled: given dev rows kept unless they are the test rows
    (then refused, and carved instead when `share` is set); carved from train when `share` is
    set and none is given. Also why given dev rows were refused ("" when they were not)."""
    refused = ""
    dev = splits.get("dev")
    if dev is not None:
        refused = _unclean_dev(dev, splits, where.get("dev", "dev"))
        if refused:  # not a dev split: its file is not where the task's dev came from
            dev = None
            where.pop("dev", None)
    splits = {split: rows for split, rows in splits.items() if split != "dev"}
    if dev is None and share is not None:
        rng = random.Random(f"{seed}-{name}-dev")
        train = splits["train"]
        dev, kept = _carve(train, share, rng, stratified=stratified)
        if not dev or not kept:
            which = "dev" if not dev else "training"
            most = max(Counter(r.label if stratified else "" for r in train).values(), default=0)
            hint = (
                f"a share of at least {math.ceil(50 / most) / 100:g}"
                if not dev and most and 0.5 / most < 0.5
                else "another share"
            )
            raise ContinualPeftError(
                f"task {name!r}: dev_share = {share} of its {len(train)} training examples "
                f"leaves no {which} example; choose {hint}, or give the task more training data "
                "(or a dev file of its own)."
            )
        lost = sorted({r.label for r in train} - {r.label for r in kept}) if stratified else []
        if lost:
            raise ContinualPeftError(
                f"task {name!r}: dev_share = {share} takes every training example of label(s) "
                f"{lost} into the dev split, so they would never be trained; choose a smaller "
                "share."
            )
        splits["train"] = kept
        per = "of each label's examples" if stratified else "of the examples"
        where["dev"] = f"carved from {where['train']}: {share:g} {per} (seed {seed})"
    if dev is not None:
        splits["dev"] = dev
    return splits, refused


def _unclean_dev(dev: list[Row], splits: dict[str, list[Row]], where: str) -> str:
    """Why given dev rows cannot serve as a dev split (they hold test or training inputs,
    compared with spaces collapsed and whatever their labels), or "" when they can."""
    if _same_rows(dev, splits["test"]):
        return (
            f"its dev split ({where}) holds the same records as its test split, so choosing on "
            "it would choose on the test set"
        )
    mine = _text_keys(dev)
    for split, what in (("test", "test"), ("train", "training")):
        theirs = _text_keys(splits[split])
        shared = len(mine & theirs) if mine is not None and theirs is not None else 0
        if shared:
            return (
                f"{shared} of the {len(dev)} records of its dev split ({where}) are also "
                f"{what} records (the same text), so choosing on it would choose on {what} data"
            )
    return ""


def _text_keys(rows: list[Row]) -> set[str] | None:
    """The texts of text rows, spaces collapsed; None for other inputs (images are not
    compared)."""
    if not all(isinstance(r.input, str) for r in rows):
        return None
    return {" ".join(r.input.split()) for r in rows}


def _same_rows(a: list[Row], b: list[Row]) -> bool:
    """Whether two splits hold the same records (inputs and labels, in order)."""
    return len(a) == len(b) and all(
        x.label == y.label and _same_input(x.input, y.input) for x, y in zip(a, b, strict=True)
    )


def _same_input(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors compare elementwise
        return x is y


def _carve(
    rows: list[Row], share: float, rng: random.Random, stratified: bool = True
) -> tuple[list[Row], list[Row]]:
    """(dev, train): round(share x n) rows of each label (n = its rows; of all rows when not
    `stratified`) drawn with `rng`, and the others; both in their original order."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row.label if stratified else "", []).append(i)
    picked: set[int] = set()
    for label in sorted(by_label):
        members = by_label[label]
        picked.update(rng.sample(members, round(share * len(members))))
    dev = [row for i, row in enumerate(rows) if i in picked]
    return dev, [row for i, row in enumerate(rows) if i not in picked]


def _keep_classes(splits: dict[str, list[Row]], classes: list[str]) -> dict[str, list[Row]]:
    """Only the rows whose label is one of `classes` (one task of a class split)."""
    wanted = {str(c) for c in classes}
    return {split: [r for r in rows if r.label in wanted] for split, rows in splits.items()}


def _label_list(labels: list[str] | None, classes: list[str] | None, train: list[Row]) -> list[str]:
    """The task's labels as strings: as given, else its classes, else the distinct train labels."""
    if labels is None:
        labels = classes if classes is not None else default_labels(r.label for r in train)
    return [str(x) for x in labels]


def _check_labels(name: str, labels: list[str]) -> None:
    """Refuse an empty label list, a repeated or blank label; warn about a single class."""
    if not labels:
        raise ContinualPeftError(f"task {name!r}: its labels list is empty; list its labels.")
    if len(labels) == 1:
        warnings.warn(
            f"task {name!r} has one class ({labels[0]!r}): its accuracy is trivially 100 % and "
            "says nothing; give it at least two labels",
            UserWarning,
            stacklevel=3,  # the caller of build_task
        )
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ContinualPeftError(
            f"task {name!r}: label(s) {repeated} are listed more than once in its labels "
            f"{labels}; list each label once (the task's `labels` in the stream spec)."
        )
    blank = [x for x in labels if not x.strip()]
    if blank:
        raise ContinualPeftError(
            f"task {name!r}: label {blank[0]!r} is empty or blank (labels {labels}); give every "
            "label a name (check the data's label column and the task's `labels`)."
        )


def _check_limits(name: str, limits: dict[str, int | None]) -> None:
    """Refuse an example limit below 1 (None keeps every example)."""
    for key, limit in limits.items():
        if limit is not None and limit < 1:
            raise ContinualPeftError(
                f"task {name!r}: {key} = {limit} is invalid; it must be >= 1 (or left out to "
                "keep every example)."
            )


def check_task(value: object, where: str) -> Task:
    """`value` if it is a `Task`; else a ContinualPeftError naming what was given and how a
    task is made (a task name where a Task is wanted is the usual slip)."""
    if isinstance(value, Task):
        return value
    raise ContinualPeftError(
        f"{where} takes a Task, not {type(value).__name__} {value!r}: make one with "
        "Task.from_examples(name, train, test) or Task.from_lists(...), or take a stream's "
        "(load_stream(spec).tasks)"
    )


def _check_rows(
    name: str,
    split: str,
    rows: list[Row],
    *,
    where: str,
    classes: list | None,
    skipped: dict[str, dict[str, int]],
) -> None:
    """Refuse an empty split, saying why it is empty."""
    if not rows:
        kept = f" after keeping classes {classes}" if classes is not None else ""
        left = f" after leaving out {skipped[split]} (no known label)" if split in skipped else ""
        raise ContinualPeftError(
            f"task {name!r}: the {split} split ({where}) is empty{kept}{left}; give it examples."
        )


def _origin(rows: list[Row], split: str) -> str:
    """Where a split came from: its file, or its name for in-memory data."""
    return re.sub(r"(:\d+|\[\d+\])$", "", rows[0].where) if rows else split


def _subset(rows: list[Row], limit: int | None, rng: random.Random | str) -> list[Row]:
    """A seeded random subset of `limit` rows, in their original order; all rows if no limit."""
    if limit is None or len(rows) <= limit:
        return rows
    rng = random.Random(rng) if isinstance(rng, str) else rng
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[i] for i in keep]
