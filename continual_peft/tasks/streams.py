"""Task streams from TOML spec files, and the demo stream that ships inside the package.

The spec schema is documented in docs/specs.md; in short:

    name = "cl_benchmark"            # required
    description = "..."
    data_root = "../data"            # task paths are relative to it; itself relative to the spec
    order = ["dbpedia", "amazon"]    # training order, or the name of one of [orders]
    seed = 0                         # which random subset max_train/max_test keep
    max_train = 300                  # per-task limits, overridable per task
    max_test = 200
    router_max_train = 2000          # inputs per task that fit the router (default: all, <= 10000)
    template = "Review: {text}\\nSentiment:"  # what a generative backbone reads; tasks may override

    [orders]                         # named orders, for --order and order x seed grids
    order1 = ["dbpedia", "amazon"]

    text_column = "sentence"         # every table's default field names (else text, label)
    dev_share = 0.1                  # carve a dev split from each task's training data
    unknown_labels = "skip"          # records of no known label: "skip" (counted) or "refuse"
    epochs = 1                       # the protocol's passes per task (a strategy's otherwise)

    [budgets.cpu]                    # a named budget (--budget cpu) replacing the values above
    max_train = 64
    epochs = 2

    [[tasks]]
    name = "dbpedia"                 # ^[a-z0-9][a-z0-9_-]*$, unique
    train = "dbpedia/train.jsonl"    # .jsonl, .json (JSON array or lines), .csv, .tsv
    test = "dbpedia/test.jsonl"
    dev = "dbpedia/dev.jsonl"        # optional; never used when it holds the test records
    labels = "dbpedia/labels.json"   # a JSON list file or an inline list; default: train labels
    kind = "classification"          # or "generation": {"prompt": ..., "target": ...} rows

    [[tasks]]
    name = "mnli"
    folder = "NLI/MNLI"              # {train,dev,test,labels}.json inside, as CL_Benchmark has

    [[class_split]]                  # one labelled dataset cut into tasks by label groups
    prefix = "digits"
    train = "digits/train.csv"
    test = "digits/test.csv"
    classes_per_task = 2             # or groups = [["0", "1"], ["2", "3"]]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from continual_peft.errors import ContinualPeftError
from continual_peft.registry import validate_task_name
from continual_peft.spec import Section, read_toml
from continual_peft.tasks.class_split import split_by_class
from continual_peft.tasks.generation import (
    CLASSIFICATION,
    GENERATION,
    check_kind,
    check_template,
    columns_for,
    refuse_label_keys,
)
from continual_peft.tasks.sources import Row, format_of, load_hf_split, read_rows
from continual_peft.tasks.task import (
    DEFAULT_DEV_SHARE,
    Task,
    build_task,
    check_dev_share,
    check_unknown_labels,
    read_labels,
)

STREAM_KEYS = {
    "name",
    "description",
    "data_root",
    "order",
    "orders",
    "seed",
    "max_train",
    "max_test",
    "router_max_train",
    "template",
    "tasks",
    "class_split",
    "text_column",
    "label_column",
    "dev_share",
    "unknown_labels",
    "epochs",
    "budgets",
}
# What a named budget ([budgets.<name>]) may set: per-task example counts and epochs.
BUDGET_KEYS = ("max_train", "max_test", "router_max_train", "epochs")
# Where a task's (or a class split's) examples come from.
SOURCE_KEYS = {
    "train",
    "test",
    "format",
    "text_column",
    "label_column",
    "dataset",
    "data_files",
    "train_split",
    "test_split",
    "max_train",
    "max_test",
    "router_max_train",
    "dev",
    "dev_share",
    "unknown_labels",
}
TASK_KEYS = SOURCE_KEYS | {"name", "labels", "classes", "description", "kind", "template", "folder"}
FOLDER_FILES = ("train", "test", "dev", "labels")  # <folder>/<name>.json, as CL_Benchmark has
SPLIT_KEYS = SOURCE_KEYS | {"prefix", "classes_per_task", "groups", "template"}


@dataclass
class Stream:
    """Tasks in training order, and the named orders its spec offers."""

    name: str
    tasks: list[Task]
    description: str = ""
    source: str = ""  # the spec file
    orders: dict[str, list[str]] = field(default_factory=dict)  # name -> task names
    order_name: str = "default"  # which order `tasks` follows; "custom" for an explicit list
    epochs: int | None = None  # the protocol's passes over each task (the spec's `epochs`)
    budget: str = "default"  # which of the spec's budgets its limits and epochs follow
    dev_share: float | None = None  # the share carved where a task has no dev split of its own
    # every task the spec loaded, whatever order `tasks` follows (`with_order` picks from it)
    pool: list[Task] = field(default_factory=list)
    unknown_labels: str = "skip"  # what happened to records of no known label
    excluded: list[str] = field(default_factory=list)  # tasks of the spec left out (`exclude`)

    def __post_init__(self) -> None:
        if not self.tasks:  # refused here, before any run directory exists
            raise ContinualPeftError(
                f"stream {self.name!r} has no tasks; give it at least one task to learn."
            )

    @property
    def protocol(self) -> dict[str, Any]:
        """How the data was read, for the report: budget, excluded tasks, dev share and what
        became of records of no known label (the command line's values included). The epochs a
        run trained are its config's `train.epochs`."""
        return {
            "budget": self.budget,
            "excluded": list(self.excluded),
            "dev_share": self.dev_share,
            "unknown_labels": self.unknown_labels,
        }

    def with_order(self, order: str | list[str]) -> Stream:
        """The same tasks in another order: a name from `orders`, or a list of task names.

        A list may name a subset of the tasks (each at most once).
        """
        if isinstance(order, str):
            if order not in self.orders:
                raise ContinualPeftError(
                    f"stream {self.name!r}: no order named {order!r}; named orders: "
                    f"{sorted(self.orders) or 'none'} (or give task names separated by commas)"
                )
            name, names = order, self.orders[order]
        else:
            name, names = "custom", list(order)
        left_out = [n for n in names if n in self.excluded]
        if left_out:
            raise ContinualPeftError(
                f"stream {self.name!r}: order {name!r} names task(s) {left_out}, which were left "
                "out (--exclude); drop them from the order or stop excluding them."
            )
        by_name = {task.name: task for task in [*self.pool, *self.tasks]}
        tasks = order_tasks(by_name, names, f"stream {self.name!r}: order {name!r}")
        return replace(self, tasks=tasks, order_name=name)


def shipped_folder(kind: str) -> Path:
    """The project's shipped spec folder, `strategies` or `streams`, found from the package
    (beside it in the checkout it is installed from), whatever the working directory."""
    return Path(__file__).resolve().parents[2] / kind


def demo_spec_path() -> Path:
    """The embedded demo stream's spec, inside the installed package."""
    return Path(__file__).resolve().parents[1] / "data" / "demo" / "stream.toml"


def load_stream(
    spec: str | Path | None = None,
    data_root: str | Path | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    router_max_train: int | None = None,
    order: str | list[str] | None = None,
    *,
    dev_share: float | None = None,
    unknown_labels: str | None = None,
    exclude: list[str] | None = None,
    budget: str | None = None,
    dev_needed: bool = False,
) -> Stream:
    """Read a stream spec and load every task, so bad data fails before any training starts.

    Args:
        spec: The TOML spec file; the embedded demo when None.
        data_root: Overrides the spec's `data_root`.
        max_train: Overrides every task's training-example limit.
        max_test: Overrides every task's test-example limit (also the dev split's).
        router_max_train: Overrides how many training inputs per task fit the router.
        order: A named order of the spec, or task names; the spec's `order` when None.
        dev_share: Overrides the spec's `dev_share`: carve a dev split of this share from each
            task's training data (see `build_task`).
        unknown_labels: Overrides the spec's `unknown_labels` ("skip" or "refuse").
        exclude: Tasks of the spec to leave out (not read; dropped from every order), e.g. a
            task whose data is missing.
        dev_needed: A dev split is needed (a sweep chooses on it): a task with no dev split and
            no dev_share of its own gets `DEFAULT_DEV_SHARE`.
        budget: A named budget of the spec's [budgets] table: its per-task limits and epochs
            replace the spec's top-level ones (the arguments above still override them).

    Raises:
        ContinualPeftError: A bad spec, missing data (every missing task folder named at once),
            bad records, or `exclude` naming no task of the spec.
    """
    path = Path(spec) if spec is not None else demo_spec_path()
    top = _with_budget(Section(read_toml(path), str(path), STREAM_KEYS), budget)
    name = validate_task_name(top.get("name", str, required=True), f"{path}: name")
    check_dev_share(dev_share, "--dev-share")
    check_dev_share(top.get("dev_share", (int, float)), f"{path}: dev_share")
    if unknown_labels is not None:
        check_unknown_labels(unknown_labels, "--unknown-labels")
    root = (
        Path(data_root) if data_root is not None else path.parent / top.get("data_root", str, ".")
    )
    limits = {"max_train": max_train, "max_test": max_test, "router_max_train": router_max_train}
    given = {"dev_share": dev_share, "unknown_labels": unknown_labels, "dev_needed": dev_needed}
    check_template(top.data.get("template"), top.where)  # even if every task sets its own
    excluded = _excluded(top, path, exclude or [])
    _check_folders(top, path, root, excluded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = _load_tasks(top, path, root, limits | given, excluded)
        loaded += _load_class_splits(top, path, root, limits | given)
    _warn_again(caught)
    _warn_refused_dev([task for task in loaded if task.dev_refused], path)
    by_name = _by_name(loaded, path, excluded)
    orders = _named_orders(top, by_name, path, excluded)
    default = _default_order(top, orders, by_name, path, excluded)
    epochs = top.get("epochs", int)
    stream = Stream(
        name=name,
        tasks=order_tasks(by_name, default, f"{path}: order"),
        pool=list(by_name.values()),
        description=top.get("description", str, ""),
        source=str(path),
        orders={"default": default, **orders},
        epochs=epochs,
        budget=budget or "default",
        excluded=sorted(excluded),
        dev_share=next(
            (v for v in (dev_share, top.get("dev_share", (int, float))) if v is not None),
            DEFAULT_DEV_SHARE if dev_needed else None,
        ),
        unknown_labels=unknown_labels or top.get("unknown_labels", str, "skip"),
    )
    return stream if order is None else stream.with_order(order)


def _with_budget(top: Section, budget: str | None) -> Section:
    """The spec's top table with a named budget's values in place of its own. Every budget,
    and the top level's values, are checked, chosen or not."""
    budgets = top.get("budgets", dict, {})
    _check_budget(top, top.where)
    for name, values in budgets.items():
        _check_budget(Section(values, f"{top.where}: budgets.{name}", set(BUDGET_KEYS)))
    if budget is None:
        return top
    if budget not in budgets:
        raise ContinualPeftError(
            f"{top.where}: no budget named {budget!r}; its [budgets]: {sorted(budgets) or 'none'}"
            " (leave --budget out for the spec's own limits and epochs)."
        )
    return Section(top.data | budgets[budget], top.where, STREAM_KEYS)


def _check_budget(section: Section, where: str | None = None) -> None:
    """Each of a budget's keys an integer >= 1 (an error names the table and key)."""
    for key in BUDGET_KEYS:
        value = section.get(key, int)
        if value is not None and value < 1:
            raise ContinualPeftError(
                f"{where or section.where}: {key} = {value} is invalid; it must be >= 1 (or left "
                "out)."
            )


def _warn_again(caught: list[warnings.WarningMessage]) -> None:
    """Re-issue warnings recorded while the tasks loaded (one per task, whatever the filters),
    from the caller's frame."""
    for message in caught:
        warnings.warn(message.message, message.category, stacklevel=3)


def _warn_refused_dev(tasks: list[Task], path: Path) -> None:
    """One warning for every task whose given dev split shares records with its test or
    training split: the copies of the test split named together, the others each with why."""
    if not tasks:
        return
    copies = [t.name for t in tasks if "holds the same records" in t.dev_refused]
    reasons = [f"{t.name}: {t.dev_refused}" for t in tasks if t.name not in copies]
    what = [f"task(s) {copies} hold a copy of their test split" if copies else "", *reasons]
    carved = all(task.dev_inputs for task in tasks)
    instead = (
        "a dev split carved from each one's training data is used instead (dev_share)"
        if carved
        else "set dev_share (or --dev-share) to carve a clean one from the training data"
    )
    warnings.warn(
        f"{path}: these dev splits are never used as dev, since choosing on them would choose "
        "on test (or training) data, as the published CL_Benchmark folder's dev.json, a copy "
        f"of test.json, would: {'; '.join(w for w in what if w)}. {instead}.",
        UserWarning,
        stacklevel=3,
    )


def _table_names(top: Section) -> list[str]:
    """The task names of the spec's [[tasks]] tables (checked when they are loaded)."""
    return [entry.get("name") for entry in top.get("tasks", list, []) if isinstance(entry, dict)]


def _excluded(top: Section, path: Path, exclude: list[str]) -> set[str]:
    """The names to leave out, each a task of a [[tasks]] table of the spec."""
    known = _table_names(top)
    unknown = [name for name in exclude if name not in known]
    if unknown:
        raise ContinualPeftError(
            f"{path}: cannot exclude {unknown}: no [[tasks]] table has that name; its tasks: "
            f"{known}."
        )
    return set(exclude)


def _check_folders(top: Section, path: Path, root: Path, excluded: set[str]) -> None:
    """Refuse, naming every one at once, the task folders (`folder = ...`) that are missing."""
    missing, incomplete = [], []
    folders = [
        (entry.get("name", f"tasks[{i}]"), entry["folder"], entry)
        for i, entry in enumerate(top.get("tasks", list, []))
        if isinstance(entry, dict)
        and isinstance(entry.get("folder"), str)
        and entry.get("name") not in excluded
    ]
    if folders and not root.is_dir():
        raise ContinualPeftError(
            f"{path}: the data root {root} is not a folder; pass the folder that holds the task "
            "folders with --data-root (for the shipped CL_Benchmark specs: the CL_Benchmark "
            "folder)."
        )
    for name, folder, entry in folders:
        place = root / folder
        if not place.is_dir():
            missing.append(f"{name} ({place.resolve()})")
            continue
        absent = [
            f"{split}.json"
            for split in ("train", "test")
            if split not in entry and not (place / f"{split}.json").is_file()
        ]
        if absent:
            incomplete.append(f"{name} ({place.resolve()}: no {', '.join(absent)})")
    if incomplete and not missing:
        raise ContinualPeftError(
            f"{path}: task folder(s) without their data files: {', '.join(incomplete)}. Each "
            "task folder needs train.json and test.json (dev.json and labels.json are optional)."
        )
    missing += incomplete
    if missing:
        raise ContinualPeftError(
            f"{path}: the data root {root} lacks the folder (with train.json, test.json) of "
            f"task(s): {', '.join(missing)}. Pass the folder that holds them with --data-root "
            "(for the shipped CL_Benchmark specs: the CL_Benchmark folder), or leave such tasks "
            "out with --exclude NAME."
        )


def _load_tasks(
    top: Section, path: Path, root: Path, options: dict[str, Any], excluded: set[str]
) -> list[Task]:
    """The tasks of the spec's [[tasks]] tables, each name at most once (`excluded` not read)."""
    loaded: list[Task] = []
    for i, entry in enumerate(top.get("tasks", list, [])):
        section = Section(entry, f"{path}: tasks[{i}]", TASK_KEYS)
        task_name = validate_task_name(
            section.get("name", str, required=True), f"{path}: tasks[{i}].name"
        )
        if any(task.name == task_name for task in loaded):
            raise ContinualPeftError(f"{path}: tasks[{i}].name: duplicate task name {task_name!r}")
        if task_name in excluded:
            continue
        shape = _shape(section, top)
        folder = section.get("folder", str)
        labels = section.get("labels", (str, list))
        if labels is None and folder is not None and (root / folder / "labels.json").is_file():
            labels = f"{folder}/labels.json"
        splits, sources = _read_source(section, root, shape["kind"], top)
        loaded.append(
            build_task(
                task_name,
                splits,
                labels=read_labels(root / labels) if isinstance(labels, str) else labels,
                classes=section.get("classes", list),
                description=section.get("description", str, ""),
                sources=sources,
                **_options(options, section, top),
                **shape,
            )
        )
    return loaded


def _load_class_splits(top: Section, path: Path, root: Path, options: dict[str, Any]) -> list[Task]:
    """The tasks cut from the spec's [[class_split]] tables, in table order."""
    loaded: list[Task] = []
    for i, entry in enumerate(top.get("class_split", list, [])):
        section = Section(entry, f"{path}: class_split[{i}]", SPLIT_KEYS)
        prefix = validate_task_name(
            section.get("prefix", str, required=True), f"{path}: class_split[{i}].prefix"
        )
        splits, sources = _read_source(section, root, CLASSIFICATION, top)
        loaded += split_by_class(
            prefix,
            splits,
            section.get("classes_per_task", int),
            section.get("groups", list),
            sources=sources,
            **_options(options, section, top),
            **_shape(section, top),
        )
    return loaded


def _by_name(loaded: list[Task], path: Path, excluded: set[str]) -> dict[str, Task]:
    """Task name -> task; refuses a stream with no tasks or two tasks of one name."""
    if not loaded and excluded:
        raise ContinualPeftError(
            f"{path}: every task of the stream is excluded ({sorted(excluded)}); leave at least "
            "one task in."
        )
    if not loaded:
        raise ContinualPeftError(
            f"{path}: the stream has no tasks; add [[tasks]] or [[class_split]] tables."
        )
    by_name: dict[str, Task] = {}
    for task in loaded:
        if task.name in by_name:
            raise ContinualPeftError(
                f"{path}: duplicate task name {task.name!r} (from [[tasks]] and [[class_split]])"
            )
        by_name[task.name] = task
    return by_name


def _default_order(
    top: Section,
    orders: dict[str, list[str]],
    by_name: dict[str, Task],
    path: Path,
    excluded: set[str],
) -> list[str]:
    """The spec's `order`: a list of task names or a named order; every task when left out.
    Excluded tasks are dropped from it."""
    default = top.get("order", (str, list), list(by_name))
    named = top.get("orders", dict, {})
    if isinstance(default, str) and default in named and default not in orders:
        default = named[default]  # a named order whose every task is left out
    default = orders[default] if isinstance(default, str) and default in orders else default
    if isinstance(default, str):
        raise ContinualPeftError(
            f"{path}: order = {default!r} is not one of the named [orders] {sorted(orders)}."
        )
    kept = [name for name in default if name not in excluded]
    if default and not kept:
        raise ContinualPeftError(
            f"{path}: the spec's order {default} is empty once {sorted(excluded)} are left "
            "out; choose another --order."
        )
    return kept


def _named_orders(
    top: Section, by_name: dict[str, Task], path: Path, excluded: set[str]
) -> dict[str, list[str]]:
    """The spec's [orders], each checked, with excluded tasks dropped."""
    table = top.get("orders", dict, {})
    orders = {}
    for key, names in table.items():
        where = f"{path}: orders.{key}"
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ContinualPeftError(f"{where}: must be a list of task names, got {names!r}")
        kept = [name for name in names if name not in excluded]
        if not kept and names:  # every task of it left out: it no longer exists
            continue
        order_tasks(by_name, kept, where)  # checks the names now, not at run time
        orders[validate_task_name(key, where)] = kept
    return orders


def _shape(section: Section, top: Section) -> dict[str, Any]:
    """A table's `kind` and `template` (the stream's when it sets none), checked; `labels` and
    `classes` refused in a generation table (its targets are its labels)."""
    kind = check_kind(section.data.get("kind", CLASSIFICATION), section.where)
    if kind == GENERATION:
        given = {key: section.data.get(key) for key in ("labels", "classes")}
        refuse_label_keys(section.where, **given)
    owner = section if "template" in section.data else top
    return {"kind": kind, "template": check_template(owner.data.get("template"), owner.where)}


def _read_source(
    section: Section, root: Path, kind: str, top: Section
) -> tuple[dict[str, list[Row]], dict[str, str]]:
    """Train and test rows of a [[tasks]] or [[class_split]] table (and dev rows when it names
    a dev file, or its folder holds dev.json), and where they came from."""
    text, label = columns_for(
        kind,
        section.get("text_column", str, top.get("text_column", str)),
        section.get("label_column", str, top.get("label_column", str)),
    )
    columns = {"text_column": text, "label_column": label}
    file_format = section.get("format", str)
    dataset = section.get("dataset", str)
    if file_format == "hf" or dataset is not None:
        if dataset is None:
            raise ContinualPeftError(
                f"{section.where}: format = 'hf' needs dataset = a folder (save_to_disk, or data "
                "files) or a builder name (csv, json, parquet, imagefolder) with data_files."
            )
        files = section.get("data_files", dict)
        source: Any = root / dataset if (root / dataset).exists() else dataset
        if files is not None:
            files = {split: str(root / f) for split, f in files.items()}
        splits, sources = {}, {}
        for split in ("train", "test"):
            name = section.get(f"{split}_split", str, split)
            splits[split] = load_hf_split(source, name, data_files=files, **columns)
            sources[split] = f"{source}[{name}]"
        return splits, sources
    paths = _split_paths(section, root)
    for file in paths.values():
        format_of(file, file_format)  # an unknown format fails before any file is read
    splits = {s: read_rows(file, file_format, **columns) for s, file in paths.items()}
    return splits, {s: str(file) for s, file in paths.items()}


def _split_paths(section: Section, root: Path) -> dict[str, Path]:
    """Each split's file: as the table names it, else (with `folder`) <folder>/<split>.json; a
    dev file only when named, or present in the folder."""
    folder = section.get("folder", str)
    paths = {}
    for split in ("train", "test", "dev"):
        named = section.get(split, str, required=folder is None and split != "dev")
        if named is not None:
            paths[split] = root / named
        elif folder is not None and (split != "dev" or (root / folder / "dev.json").is_file()):
            paths[split] = root / folder / f"{split}.json"
    return paths


def _options(given: dict[str, Any], section: Section, top: Section) -> dict[str, Any]:
    """Example limits, the dev share and what to do with unknown labels (the command line's,
    else the table's, else the stream's), and the seed."""
    options: dict[str, Any] = {"seed": top.get("seed", int, 0)}
    kinds = {"dev_share": (int, float), "unknown_labels": str}
    for key, override in given.items():
        if key == "dev_needed":
            continue
        kind = kinds.get(key, int)
        options[key] = (
            override if override is not None else section.get(key, kind, top.get(key, kind))
        )
    options["unknown_labels"] = options["unknown_labels"] or "skip"
    if given.get("dev_needed") and options["dev_share"] is None:
        options["dev_share"] = DEFAULT_DEV_SHARE  # used only where no dev split is given
    return options


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
