"""Stream specs and JSONL tasks: what loads, and the message each kind of bad input gets."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from continual_peft import MODULE_KINDS, STRATEGIES, ContinualPeftError, load_strategy_spec
from continual_peft.config import ROUTERS
from continual_peft.modules import kind_parts
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import load_task

REPO = Path(__file__).resolve().parents[1]
STREAM_SPECS = sorted((REPO / "streams").glob("*.toml"))
STRATEGY_SPECS = sorted((REPO / "strategies").glob("*.toml"))
NAME_RULE = "lower-case letters, digits, '-' and '_'"


def rows(labels: list[str], n: int, prefix: str) -> list[dict]:
    """`n` distinct JSONL records cycling through `labels`."""
    return [{"text": f"{prefix} example {i}", "label": labels[i % len(labels)]} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_task(root: Path, name: str, labels: list[str], n_train: int = 12, n_test: int = 6):
    """`root/name/{train,test}.jsonl` and `labels.json`."""
    write_jsonl(root / name / "train.jsonl", rows(labels, n_train, f"{name} train"))
    write_jsonl(root / name / "test.jsonl", rows(labels, n_test, f"{name} test"))
    (root / name / "labels.json").write_text(json.dumps(labels), encoding="utf-8")


def task_block(name: str, labels: str | None = None, **extra: object) -> str:
    """One [[tasks]] table; `labels` is a TOML value, default the task's labels.json."""
    lines = [
        "[[tasks]]",
        f'name = "{name}"',
        f'train = "{name}/train.jsonl"',
        f'test = "{name}/test.jsonl"',
        f"labels = {labels or json.dumps(f'{name}/labels.json')}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_spec(path: Path, header: str, *blocks: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "\n".join(blocks), encoding="utf-8")
    return path


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    """A valid two-task spec: one task with labels.json, one with an inline list; reversed order."""
    write_task(tmp_path, "alpha", ["a", "b", "c"], n_train=20, n_test=10)
    write_task(tmp_path, "beta-2", ["yes", "no"])
    return write_spec(
        tmp_path / "stream.toml",
        'name = "tiny"\ndescription = "two tasks"\norder = ["beta-2", "alpha"]',
        task_block("alpha", description="three labels"),
        task_block("beta-2", labels='["yes", "no"]'),
    )


def minimal_spec(tmp_path: Path, header: str = 'name = "s"', *blocks: str) -> Path:
    """A one-task spec (task `a`, labels x/y) unless other blocks are given."""
    write_task(tmp_path, "a", ["x", "y"])
    return write_spec(tmp_path / "stream.toml", header, *(blocks or (task_block("a"),)))


# ---------------------------------------------------------------- valid specs


def test_valid_spec_loads_in_order(spec: Path):
    stream = load_stream(spec)
    assert stream.name == "tiny"
    assert stream.description == "two tasks"
    assert stream.source == str(spec)
    assert [t.name for t in stream.tasks] == ["beta-2", "alpha"]
    beta, alpha = stream.tasks
    assert alpha.labels == ["a", "b", "c"] and beta.labels == ["yes", "no"]
    assert alpha.description == "three labels"
    assert len(alpha.train_inputs) == 20 and len(alpha.test_inputs) == 10
    assert alpha.train_inputs[:2] == ["alpha train example 0", "alpha train example 1"]
    assert alpha.train_labels[:4] == [0, 1, 2, 0]
    assert beta.test_labels[:2] == [0, 1]
    assert alpha.sources["test"].endswith("alpha/test.jsonl")


def test_default_order_is_tasks_order(tmp_path: Path):
    write_task(tmp_path, "b", ["x", "y"])
    write_task(tmp_path, "a", ["x", "y"])
    path = write_spec(tmp_path / "s.toml", 'name = "s"', task_block("b"), task_block("a"))
    assert [t.name for t in load_stream(path).tasks] == ["b", "a"]


def test_order_may_name_a_subset(spec: Path):
    text = spec.read_text().replace('order = ["beta-2", "alpha"]', 'order = ["alpha"]')
    spec.write_text(text)
    assert [t.name for t in load_stream(spec).tasks] == ["alpha"]


def test_limits_keep_a_seeded_subset(spec: Path):
    first = load_stream(spec, max_train=7, max_test=4)
    second = load_stream(spec, max_train=7, max_test=4)
    for a, b in zip(first.tasks, second.tasks, strict=True):
        assert len(a.train_inputs) == 7 and len(a.test_inputs) == 4
        assert (a.train_inputs, a.train_labels) == (b.train_inputs, b.train_labels)
        assert (a.test_inputs, a.test_labels) == (b.test_inputs, b.test_labels)
    alpha = first.tasks[1]
    everything = load_stream(spec).tasks[1]
    assert set(alpha.train_inputs) < set(everything.train_inputs)
    # Original file order is kept within the subset.
    positions = [everything.train_inputs.index(t) for t in alpha.train_inputs]
    assert positions == sorted(positions)


def test_limits_from_spec_then_task_then_override(spec: Path):
    text = spec.read_text()
    text = text.replace('name = "tiny"', 'name = "tiny"\nmax_train = 5\nmax_test = 3\nseed = 1')
    text = text.replace('description = "three labels"', 'description = "x"\nmax_train = 9')
    spec.write_text(text)
    beta, alpha = load_stream(spec).tasks
    assert (len(alpha.train_inputs), len(alpha.test_inputs)) == (9, 3)
    assert (len(beta.train_inputs), len(beta.test_inputs)) == (5, 3)
    beta, alpha = load_stream(spec, max_train=2).tasks
    assert len(alpha.train_inputs) == len(beta.train_inputs) == 2


def test_seed_changes_the_subset(spec: Path):
    one = load_stream(spec, max_train=5).tasks[1].train_inputs
    spec.write_text(spec.read_text().replace('name = "tiny"', 'name = "tiny"\nseed = 7'))
    assert load_stream(spec, max_train=5).tasks[1].train_inputs != one


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(spec: Path, limit: int):
    with pytest.raises(ContinualPeftError, match=rf"max_train = {limit} is invalid.*>= 1"):
        load_stream(spec, max_train=limit)


def test_data_root_override(spec: Path, tmp_path: Path):
    other = tmp_path / "elsewhere"
    write_task(other, "alpha", ["a", "b", "c"], n_train=3, n_test=3)
    write_task(other, "beta-2", ["yes", "no"], n_train=4, n_test=2)
    stream = load_stream(spec, data_root=other)
    assert [len(t.train_inputs) for t in stream.tasks] == [4, 3]
    assert stream.tasks[1].sources["train"] == str(other / "alpha" / "train.jsonl")


def test_relative_data_root_is_relative_to_the_spec(tmp_path: Path, monkeypatch):
    write_task(tmp_path / "data", "a", ["x", "y"])
    path = write_spec(
        tmp_path / "specs" / "s.toml", 'name = "s"\ndata_root = "../data"', task_block("a")
    )
    # From the working directory, "../data" would be a different folder.
    monkeypatch.chdir(tmp_path)
    assert load_stream(path).tasks[0].name == "a"
    assert load_stream(Path("specs/s.toml")).tasks[0].sources["train"] == str(
        Path("specs/../data/a/train.jsonl")
    )


# ---------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("path", STREAM_SPECS, ids=lambda p: p.name)
def test_shipped_stream_specs_load(path: Path, tmp_path: Path):
    # The real data lives outside the repository: fake each task's files under a tmp data root.
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    if any("folder" in entry for entry in raw.get("tasks", [])):
        pytest.skip("a CL_Benchmark folder spec: test_cl_benchmark.py builds its folder")
    for entry in raw.get("tasks", []):
        labels = entry["labels"]
        names = labels if isinstance(labels, list) else ["l0", "l1", "l2"]
        write_jsonl(tmp_path / entry["train"], rows(names, 6, entry["name"] + " train"))
        write_jsonl(tmp_path / entry["test"], rows(names, 4, entry["name"] + " test"))
        if isinstance(labels, str):
            (tmp_path / labels).write_text(json.dumps(names), encoding="utf-8")
    for entry in raw.get("class_split", []):  # six classes, cut as the spec says
        names = [f"c{i}" for i in range(6)]
        write_jsonl(tmp_path / entry["train"], rows(names, 6 * len(names), "split train"))
        write_jsonl(tmp_path / entry["test"], rows(names, 4 * len(names), "split test"))
    stream = load_stream(path, data_root=tmp_path)
    assert stream.name == raw["name"]
    if "tasks" in raw:
        names = raw.get("order", [e["name"] for e in raw["tasks"]])
        assert [t.name for t in stream.tasks] == names
        assert all(len(t.train_inputs) == 6 and len(t.labels) == 3 for t in stream.tasks)
    else:
        per_task = raw["class_split"][0]["classes_per_task"]
        assert all(len(t.labels) == per_task for t in stream.tasks) and len(stream.tasks) > 1


def test_embedded_demo_stream():
    stream = load_stream()
    assert stream.name == "demo"
    assert len(stream.tasks) == 4
    assert len({t.name for t in stream.tasks}) == 4
    for task in stream.tasks:
        assert len(task.labels) > 1, task.name
        # Every label is seen in training; test labels are all declared (else loading fails).
        assert set(task.train_labels) == set(range(len(task.labels))), task.name
        assert set(task.test_labels) <= set(range(len(task.labels))), task.name
        assert not set(task.train_inputs) & set(task.test_inputs), task.name


@pytest.mark.parametrize("path", STRATEGY_SPECS, ids=lambda p: p.name)
def test_shipped_strategy_specs_load(path: Path):
    config = load_strategy_spec(path)
    assert config.strategy in STRATEGIES
    assert all(part in MODULE_KINDS for part in kind_parts(config.module))
    assert config.router in ROUTERS


def test_shipped_specs_exist():
    assert STREAM_SPECS and STRATEGY_SPECS
    assert {load_strategy_spec(p).strategy for p in STRATEGY_SPECS} == set(STRATEGIES.names())


# ---------------------------------------------------------------- bad data files


def test_missing_jsonl_names_the_path(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    (tmp_path / "a" / "test.jsonl").unlink()
    missing = re.escape(str(tmp_path / "a" / "test.jsonl"))
    with pytest.raises(ContinualPeftError, match=f"{missing}: file not found.*--data-root"):
        load_stream(spec)


def test_malformed_line_names_file_and_line(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"text": "broken", "label": '
    path.write_text("\n".join(lines) + "\n")
    where = re.escape(f"{path}:3:")
    with pytest.raises(ContinualPeftError, match=f"{where} malformed JSON"):
        load_stream(spec)


@pytest.mark.parametrize(
    "line", ['["text", "label"]', '{"text": "no label"}', '{"text": 3, "label": "x"}']
)
def test_wrong_record_shape_names_file_and_line(tmp_path: Path, line: str):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "test.jsonl"
    path.write_text(path.read_text() + line + "\n")
    where = re.escape(f"{path}:7:")
    expected = 'the value of "text" is int' if "3" in line else 'expected {"text"'
    with pytest.raises(ContinualPeftError, match=f"{where} {re.escape(expected)}"):
        load_stream(spec)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "test.jsonl"
    path.write_text("\n" + path.read_text() + "\n  \n" + '{"text": "z", "label": "zz"}\n')
    where = re.escape(f"{path}:10:")
    with pytest.raises(ContinualPeftError, match=f"{where} label 'zz'"):
        load_stream(spec, unknown_labels="refuse")


def test_non_utf8_line_names_file_and_line(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "train.jsonl"
    path.write_bytes(path.read_bytes() + '{"text": "caf\xe9", "label": "x"}\n'.encode("latin-1"))
    where = re.escape(f"{path}:13:")
    with pytest.raises(ContinualPeftError, match=f"{where} not UTF-8.*re-encode"):
        load_stream(spec)


def test_undeclared_test_label_names_file_line_and_label(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"text": "odd", "label": "maybe"})
    path.write_text("\n".join(lines) + "\n")
    where = re.escape(f"{path}:4:")
    expected = rf"{where} label 'maybe' is not one of task 'a''s labels \['x', 'y'\]"
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec, unknown_labels="refuse")
    # by default such records are left out only when few (no gold label): 1 of 6 is not few
    with pytest.raises(ContinualPeftError, match=r"1 of the 6 records .*at most 5% of a split"):
        load_stream(spec)


def test_undeclared_label_against_inline_list(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"', task_block("a", labels='["x"]'))
    with pytest.raises(ContinualPeftError, match=r"train\.jsonl:2: label 'y'"):
        load_stream(spec, unknown_labels="refuse")


def test_empty_task_file(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "train.jsonl"
    path.write_text("\n")
    with pytest.raises(ContinualPeftError, match=f"the train split \\({re.escape(str(path))}\\)"):
        load_stream(spec)


def test_missing_labels_json(tmp_path: Path):
    spec = minimal_spec(tmp_path)
    (tmp_path / "a" / "labels.json").unlink()
    path = re.escape(str(tmp_path / "a" / "labels.json"))
    with pytest.raises(ContinualPeftError, match=f"{path}: labels file not found"):
        load_stream(spec)


@pytest.mark.parametrize("content", ["[]", '{"x": 1}', '["x", ', '[["x"]]'])
def test_bad_labels_json(tmp_path: Path, content: str):
    spec = minimal_spec(tmp_path)
    path = tmp_path / "a" / "labels.json"
    path.write_text(content)
    with pytest.raises(ContinualPeftError, match=f"{re.escape(str(path))}: .*list"):
        load_stream(spec)


def test_duplicate_labels(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"', task_block("a", labels='["x", "y", "x"]'))
    with pytest.raises(
        ContinualPeftError, match=r"task 'a': label\(s\) \['x'\] are listed more than once"
    ):
        load_stream(spec)


def test_load_task_validates_its_name(tmp_path: Path):
    write_task(tmp_path, "a", ["x", "y"])
    path = tmp_path / "a" / "train.jsonl"
    with pytest.raises(ContinualPeftError, match=re.escape(NAME_RULE)):
        load_task("Bad Name", path, path, ["x", "y"])


# ---------------------------------------------------------------- bad specs


def test_duplicate_task_names(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"', task_block("a"), task_block("a"))
    with pytest.raises(ContinualPeftError, match=r"tasks\[1\]\.name: duplicate task name 'a'"):
        load_stream(spec)


@pytest.mark.parametrize("name", ["../evil", "Upper", "", "-lead", "a b"])
def test_invalid_task_names(tmp_path: Path, name: str):
    spec = minimal_spec(tmp_path, 'name = "s"', task_block("a").replace('"a"', json.dumps(name)))
    bad = re.escape(repr(name))
    expected = rf"tasks\[0\]\.name: invalid task name {bad}.*{re.escape(NAME_RULE)}"
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec)


def test_unknown_top_level_key(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"\nmax_trian = 5')
    expected = (
        r"unknown key\(s\) \['max_trian'\]; valid keys: "
        r"\['budgets', 'class_split', 'data_root', 'description'"
    )
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec)


def test_unknown_task_key(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"', task_block("a", label="x"))
    expected = r"tasks\[0\]: unknown key\(s\) \['label'\]; valid keys: .*'labels'"
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec)


@pytest.mark.parametrize(
    ("header", "block", "expected"),
    [
        ('name = "s"\nseed = "0"', None, r"key 'seed' must be int, got '0'"),
        ('name = "s"\nmax_train = true', None, r"key 'max_train' must be int, got True"),
        ("name = 3", None, r"key 'name' must be str, got 3"),
        ('name = "s"\norder = 3', None, r"key 'order' must be str or list, got 3"),
        ('name = "s"', task_block("a", labels="3"), r"tasks\[0\]: key 'labels' must be str or"),
        ('name = "s"', task_block("a", max_test=1.5), r"tasks\[0\]: key 'max_test' must be int"),
        ('name = "s"\ntasks = ["a"]', "", r"tasks\[0\]: expected a table, got str"),
    ],
)
def test_wrong_type(tmp_path: Path, header: str, block: str | None, expected: str):
    spec = minimal_spec(tmp_path, header, *([] if block is None else [block]))
    with pytest.raises(ContinualPeftError, match=f"{re.escape(str(spec))}: .*{expected}"):
        load_stream(spec)


@pytest.mark.parametrize("key", ["name", "train", "test"])
def test_missing_task_key(tmp_path: Path, key: str):
    block = "\n".join(line for line in task_block("a").splitlines() if not line.startswith(key))
    spec = minimal_spec(tmp_path, 'name = "s"', block + "\n")
    with pytest.raises(ContinualPeftError, match=rf"tasks\[0\]: missing required key '{key}'"):
        load_stream(spec)


def test_labels_default_to_the_training_labels(tmp_path: Path):
    lines = task_block("a").splitlines()
    block = "\n".join(line for line in lines if not line.startswith("labels"))
    spec = minimal_spec(tmp_path, 'name = "s"', block + "\n")
    task = load_stream(spec).tasks[0]
    assert task.labels == sorted({task.labels[y] for y in task.train_labels})


def test_missing_stream_name(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'description = "no name"')
    with pytest.raises(ContinualPeftError, match="missing required key 'name'"):
        load_stream(spec)


def test_order_naming_an_unknown_task(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"\norder = ["a", "zzz"]')
    expected = r"order: unknown task\(s\) \['zzz'\]; tasks in this stream: \['a'\]"
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec)


def test_order_listing_a_task_twice(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"\norder = ["a", "a"]')
    with pytest.raises(ContinualPeftError, match=r"order: a task is listed twice"):
        load_stream(spec)


def test_empty_order(tmp_path: Path):
    spec = minimal_spec(tmp_path, 'name = "s"\norder = []')
    with pytest.raises(ContinualPeftError, match="order: empty order"):
        load_stream(spec)


@pytest.mark.parametrize("tasks", ["tasks = []", None])
def test_no_tasks(tmp_path: Path, tasks: str | None):
    path = write_spec(tmp_path / "s.toml", 'name = "s"\n' + (tasks or ""))
    expected = r"the stream has no tasks; add \[\[tasks\]\] or \[\[class_split\]\]"
    with pytest.raises(ContinualPeftError, match=f"{re.escape(str(path))}: {expected}"):
        load_stream(path)


def test_invalid_toml(tmp_path: Path):
    path = write_spec(tmp_path / "s.toml", 'name = "s"\n[[tasks]\nname = "a"')
    with pytest.raises(ContinualPeftError, match=f"{re.escape(str(path))}: not valid TOML"):
        load_stream(path)


def test_missing_spec_file(tmp_path: Path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ContinualPeftError, match=f"{re.escape(str(path))}: spec file not found"):
        load_stream(path)


# ---------------------------------------------------------------- orders


def ordered_spec(tmp_path: Path, header: str) -> Path:
    for name in ("a", "b", "c"):
        write_task(tmp_path, name, ["x", "y"])
    return write_spec(tmp_path / "stream.toml", header, *(task_block(n) for n in "abc"))


def names(stream) -> list[str]:
    return [task.name for task in stream.tasks]


def test_named_orders_and_explicit_orders(tmp_path: Path):
    spec = ordered_spec(
        tmp_path, 'name = "s"\norder = "back"\n[orders]\nback = ["c", "b", "a"]\nshort = ["b"]'
    )
    stream = load_stream(spec)
    assert names(stream) == ["c", "b", "a"]
    assert stream.orders == {"default": ["c", "b", "a"], "back": ["c", "b", "a"], "short": ["b"]}
    assert names(load_stream(spec, order="short")) == ["b"]
    custom = stream.with_order(["a", "c"])
    assert (names(custom), custom.order_name) == (["a", "c"], "custom")
    assert stream.with_order("short").tasks[0] is stream.tasks[1]  # reordered, not reloaded


@pytest.mark.parametrize(
    ("header", "order", "expected"),
    [
        ('name = "s"\n[orders]\nx = ["a", "z"]', None, r"orders.x: unknown task\(s\) \['z'\]"),
        ('name = "s"\n[orders]\nx = "a"', None, "orders.x: must be a list of task names"),
        ('name = "s"\norder = "nope"', None, "order = 'nope' is not one of the named"),
        ('name = "s"', "nope", r"no order named 'nope'; named orders: \['default'\]"),
        ('name = "s"', ["a", "a"], "a task is listed twice"),
    ],
)
def test_bad_orders(tmp_path: Path, header: str, order, expected: str):
    spec = ordered_spec(tmp_path, header)
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec, order=order)


# ---------------------------------------------------------------- the documented schema


def test_docs_name_every_spec_key_and_nothing_else():
    """docs/specs.md documents every key the loaders accept, and no key they would refuse."""
    from dataclasses import fields

    from continual_peft.config import (
        BackboneConfig,
        EvaluationConfig,
        GenerationConfig,
        TrainConfig,
    )
    from continual_peft.strategies import strategy_options
    from continual_peft.tasks.streams import SPLIT_KEYS, STREAM_KEYS, TASK_KEYS

    doc = (REPO / "docs" / "specs.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z0-9_]+)`", doc))
    accepted = STREAM_KEYS | TASK_KEYS | SPLIT_KEYS | {"strategy", "module", "router", "seed"}
    accepted |= {"max_slots"} | {f.name for f in fields(EvaluationConfig)}
    accepted |= {f.name for f in fields(TrainConfig)} | {f.name for f in fields(BackboneConfig)}
    accepted |= {f.name for f in fields(GenerationConfig)}
    for kind in MODULE_KINDS.names():
        accepted |= {f.name for f in fields(MODULE_KINDS.options_type(kind))}
    for strategy in STRATEGIES.names():
        accepted |= {strategy, *strategy_options(strategy)}
    assert accepted - documented == set()
    tables = set(re.findall(r"^\| `\[?([a-z0-9_]+)", doc, flags=re.M))  # first column of the tables
    tables -= set(MODULE_KINDS.names()) | {"router_options", "strategy_options", "tasks"}
    assert tables - accepted - {"backbone", "generation", "evaluation"} == set()
