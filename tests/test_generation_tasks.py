"""Generation tasks: free-text targets stored as labels, prompt templates, their spec keys and
refusals, and the toy generative stream."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pytest

from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import Task, load_task
from continual_peft.tasks.toy import (
    TOY_KEYS,
    TOY_TEMPLATE,
    TOY_WORDS,
    toy_generative_stream,
    write_toy_generative_stream,
)

PACKAGE = Path(__file__).resolve().parents[1] / "continual_peft"
TRAIN = [("two plus two", "four"), ("capital of france", "paris"), ("two times two", "four")]
TEST = [("capital of italy", "rome"), ("one plus one", "two"), ("capital of france", "paris")]


def data(task: Task) -> tuple:
    """What a task holds, less where it came from."""
    return (task.labels, task.train_inputs, task.train_labels, task.test_inputs, task.test_labels)


def targets(task: Task, split: str = "train") -> list[str]:
    ids = task.train_labels if split == "train" else task.test_labels
    return [task.labels[i] for i in ids]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def write_gen_task(root: Path, name: str, text_key: str = "prompt", label_key: str = "target"):
    """`root/name/{train,test}.jsonl` with TRAIN and TEST as `{text_key, label_key}` rows."""
    for split, pairs in (("train", TRAIN), ("test", TEST)):
        write_jsonl(root / name / f"{split}.jsonl", [{text_key: x, label_key: y} for x, y in pairs])


def gen_block(name: str, **extra: object) -> str:
    """A [[tasks]] table of a generation task written by `write_gen_task`."""
    lines = ["[[tasks]]", f'name = "{name}"', 'kind = "generation"']
    lines += [f'train = "{name}/train.jsonl"', f'test = "{name}/test.jsonl"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def class_block(name: str, **extra: object) -> str:
    """A [[tasks]] table of a classification task with labels x/y."""
    lines = ["[[tasks]]", f'name = "{name}"', f'train = "{name}/train.jsonl"']
    lines += [f'test = "{name}/test.jsonl"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_class_task(root: Path, name: str) -> None:
    for split in ("train", "test"):
        rows = [{"text": f"{name} {split} {i}", "label": "xy"[i % 2]} for i in range(6)]
        write_jsonl(root / name / f"{split}.jsonl", rows)


def write_spec(path: Path, header: str, *blocks: str) -> Path:
    path.write_text(header + "\n" + "\n".join(blocks), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the data model


def test_prompt_replaces_every_placeholder_and_keeps_other_braces():
    task = Task.from_examples("t", TRAIN, TEST, kind="generation", template="{text} = {text}? {x}")
    assert task.prompt("a {b}") == "a {b} = a {b}? {x}"
    assert Task.from_examples("t", TRAIN, TEST, kind="generation").prompt("a {b}") == "a {b}"
    doubled = Task.from_examples("t", TRAIN, TEST, kind="generation", template="{{text}}")
    assert doubled.prompt("q") == "{q}"  # not str.format: braces stay as written


def test_generation_labels_are_targets_in_order_of_first_appearance():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no one-class warning, none at all
        task = Task.from_examples("t", TRAIN, TEST, kind="generation", template="Q: {text} A:")
    assert task.kind == "generation" and task.template == "Q: {text} A:"
    assert task.labels == ["four", "paris", "rome", "two"]
    assert task.train_labels == [0, 1, 0] and task.test_labels == [2, 3, 1]
    assert task.train_inputs == [x for x, _ in TRAIN]
    assert targets(task, "test") == [y for _, y in TEST]


def test_classification_stays_the_default():
    task = Task.from_examples("t", [("a", "x"), ("b", "y")], [("c", "y")])
    assert (task.kind, task.template) == ("classification", None)
    assert task.prompt("abc") == "abc"


def test_one_distinct_target_is_fine():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = Task.from_examples(
            "t", [("a", "yes"), ("b", "yes")], [("c", "yes")], kind="generation"
        )
    assert task.labels == ["yes"] and task.test_labels == [0]


def test_every_builder_takes_kind_and_template():
    expected = Task.from_examples("t", TRAIN, TEST, kind="generation", template="{text}!")
    inputs = [
        [x for x, _ in TRAIN],
        [y for _, y in TRAIN],
        [x for x, _ in TEST],
        [y for _, y in TEST],
    ]
    built = [
        Task.from_lists("t", *inputs, kind="generation", template="{text}!"),
        Task.from_dataset("t", TRAIN, TEST, kind="generation", template="{text}!"),
        Task.from_dataset(
            "t",
            [{"q": x, "a": y} for x, y in TRAIN],
            [{"q": x, "a": y} for x, y in TEST],
            input_key="q",
            label_key="a",
            kind="generation",
            template="{text}!",
        ),
    ]
    for task in built:
        assert data(task) == data(expected)
        assert (task.kind, task.template) == ("generation", "{text}!")


def test_from_hf_reads_prompt_or_text_and_target_columns(tmp_path: Path):
    def split(pairs, text_key):
        return datasets.Dataset.from_dict(
            {text_key: [x for x, _ in pairs], "target": [y for _, y in pairs]}
        )

    expected = Task.from_examples("t", TRAIN, TEST, kind="generation")
    for key in ("prompt", "text"):
        dataset = datasets.DatasetDict({"train": split(TRAIN, key), "test": split(TEST, key)})
        task = Task.from_hf("t", dataset, kind="generation", template="{text}?")
        assert data(task) == data(expected) and task.template == "{text}?"


def test_limits_keep_the_same_rows_as_for_classification():
    """max_train/max_test/seed pick the same rows whatever the kind; the labels are the kept
    rows' targets."""
    train = [(f"q{i}", f"t{i}") for i in range(40)]
    test = [(f"r{i}", f"t{i % 5}") for i in range(20)]
    options = {"max_train": 7, "max_test": 4, "seed": 3}
    generated = Task.from_examples("t", train, test, kind="generation", **options)
    classified = Task.from_examples(
        "t", train, test, labels=[f"t{i}" for i in range(40)], **options
    )
    assert generated.train_inputs == classified.train_inputs
    assert generated.test_inputs == classified.test_inputs
    assert targets(generated) == targets(classified)
    assert generated.labels == list(dict.fromkeys(targets(generated) + targets(generated, "test")))
    again = Task.from_examples("t", train, test, kind="generation", **options)
    assert (again.labels, again.train_inputs) == (generated.labels, generated.train_inputs)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("text_key", ["prompt", "text"])
def test_jsonl_prompt_or_text_with_target(tmp_path: Path, text_key: str):
    write_gen_task(tmp_path, "g", text_key=text_key)
    task = load_task("g", tmp_path / "g/train.jsonl", tmp_path / "g/test.jsonl", kind="generation")
    expected = Task.from_examples("g", TRAIN, TEST, kind="generation")
    assert data(task) == data(expected)
    assert task.sources["train"].endswith("train.jsonl")


def test_named_columns_and_csv(tmp_path: Path):
    write_gen_task(tmp_path, "named", text_key="question", label_key="answer")
    named = load_task(
        "g",
        tmp_path / "named/train.jsonl",
        tmp_path / "named/test.jsonl",
        kind="generation",
        text_column="question",
        label_column="answer",
    )
    expected = Task.from_examples("g", TRAIN, TEST, kind="generation")
    assert data(named) == data(expected)
    for header in ("prompt", "text"):
        for split, pairs in (("train", TRAIN), ("test", TEST)):
            lines = [f"{header},target", *(f'"{x}",{y}' for x, y in pairs)]
            write_lines(tmp_path / header / f"{split}.csv", lines)
        task = load_task(
            "g", tmp_path / header / "train.csv", tmp_path / header / "test.csv", kind="generation"
        )
        assert data(task) == data(expected)


def test_jsonl_row_of_the_wrong_shape_names_both_keys(tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "target": "b"}, {"input": "c"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "target": "b"}])
    with pytest.raises(
        ContinualPeftError, match=r'train.jsonl:2: expected \{"prompt" or "text": "...", "target"'
    ):
        load_task("g", tmp_path / "train.jsonl", tmp_path / "test.jsonl", kind="generation")
    write_lines(tmp_path / "train.csv", ["question,target", "a,b"])
    with pytest.raises(ContinualPeftError, match=r"no column\(s\) \['prompt or text'\]"):
        load_task("g", tmp_path / "train.csv", tmp_path / "train.csv", kind="generation")


# ---------------------------------------------------------------- stream specs


def test_stream_template_applies_to_tasks_that_set_none(tmp_path: Path):
    write_gen_task(tmp_path, "g1")
    write_gen_task(tmp_path, "g2")
    write_class_task(tmp_path, "c")
    spec = write_spec(
        tmp_path / "s.toml",
        'name = "s"\ntemplate = "Review: {text}\\nSentiment:"',
        gen_block("g1"),
        gen_block("g2", template="Q: {text} {json} A:"),
        class_block("c"),
    )
    g1, g2, c = load_stream(spec).tasks
    assert g1.kind == g2.kind == "generation" and c.kind == "classification"
    assert g1.template == c.template == "Review: {text}\nSentiment:"
    assert g2.prompt("hi") == "Q: hi {json} A:"
    assert g1.labels == ["four", "paris", "rome", "two"] and c.labels == ["x", "y"]


def test_no_template_anywhere_is_none(tmp_path: Path):
    write_gen_task(tmp_path, "g")
    task = load_stream(write_spec(tmp_path / "s.toml", 'name = "s"', gen_block("g"))).tasks[0]
    assert task.template is None and task.prompt("x") == "x"


def test_class_split_takes_a_template(tmp_path: Path):
    rows = [{"text": f"item {i}", "label": str(i % 4)} for i in range(16)]
    write_jsonl(tmp_path / "d/train.jsonl", rows)
    write_jsonl(tmp_path / "d/test.jsonl", rows)
    split = '[[class_split]]\nprefix = "d"\ntrain = "d/train.jsonl"\ntest = "d/test.jsonl"\n'
    spec = write_spec(
        tmp_path / "s.toml",
        'name = "s"\ntemplate = "{text}"',
        split + 'classes_per_task = 2\ntemplate = "Digit: {text}"',
    )
    tasks = load_stream(spec).tasks
    assert [t.name for t in tasks] == ["d-0-1", "d-2-3"]
    assert all(t.kind == "classification" and t.template == "Digit: {text}" for t in tasks)


FIX = r"put \{text\} where the input goes"
KINDS = "valid kinds: classification, generation"
NO_LABELS = "a generation task takes no labels: its labels are the distinct targets"


@pytest.mark.parametrize(
    "header, key, expected",
    [
        ('template = "none"', "", r"s.toml: template = 'none' has no \{text\} placeholder"),
        ("", 'template = "{txt}"', r"s.toml: tasks\[0\]: template = '\{txt\}' has no \{text\}"),
        ("template = 3", "", r"s.toml: template = 3 is not a string; give a string with \{text\}"),
        ("", "template = [1]", r"s.toml: tasks\[0\]: template = \[1\] is not a string"),
        ("", 'kind = "regression"', rf"tasks\[0\]: kind = 'regression' is unknown; {KINDS}"),
        ("", 'labels = "g/labels.json"', rf"s.toml: tasks\[0\]: {NO_LABELS}"),
        ("", 'classes = ["four"]', r"s.toml: tasks\[0\]: a generation task takes no classes"),
    ],
)
def test_spec_refusals_name_the_file_and_section(
    tmp_path: Path, header: str, key: str, expected: str
):
    write_gen_task(tmp_path, "g")
    (tmp_path / "g/labels.json").write_text('["four"]', encoding="utf-8")
    block = gen_block("g") + key + "\n"
    if key.startswith("kind"):  # instead of the generation kind
        block = block.replace('kind = "generation"\n', "", 1)
    spec = write_spec(tmp_path / "s.toml", f'name = "s"\n{header}', block)
    with pytest.raises(ContinualPeftError, match=expected):
        load_stream(spec)


def test_spec_template_refusal_says_how_to_fix_it(tmp_path: Path):
    write_gen_task(tmp_path, "g")
    spec = write_spec(tmp_path / "s.toml", 'name = "s"\ntemplate = "Review:"', gen_block("g"))
    with pytest.raises(ContinualPeftError, match=FIX + r", e\.g\. template = "):
        load_stream(spec)


def test_a_bad_stream_template_is_refused_even_when_every_task_sets_its_own(tmp_path: Path):
    write_gen_task(tmp_path, "g")
    spec = write_spec(
        tmp_path / "s.toml", 'name = "s"\ntemplate = "x"', gen_block("g", template="{text}")
    )
    with pytest.raises(ContinualPeftError, match="s.toml: template = 'x' has no"):
        load_stream(spec)


def test_empty_target_names_its_file_and_line(tmp_path: Path):
    write_gen_task(tmp_path, "g")
    rows = [{"prompt": "a", "target": "b"}, {"prompt": "c", "target": " "}]
    write_jsonl(tmp_path / "g/test.jsonl", rows)
    spec = write_spec(tmp_path / "s.toml", 'name = "s"', gen_block("g"))
    with pytest.raises(ContinualPeftError, match=r"g/test.jsonl:2: the target is empty"):
        load_stream(spec)
    write_lines(tmp_path / "t.csv", ["prompt,target", "a,b", "c,"])
    with pytest.raises(ContinualPeftError, match=r"t.csv:3: the 'target' field is empty"):
        load_task("g", tmp_path / "t.csv", tmp_path / "t.csv", kind="generation")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"template": "none"}, r"task 't': template = 'none' has no \{text\} placeholder"),
        ({"template": 3}, r"task 't': template = 3 is not a string"),
        ({"kind": "regression"}, "task 't': kind = 'regression' is unknown; valid kinds"),
        ({"kind": "generation", "labels": ["four"]}, "task 't': a generation task takes no labels"),
        ({"kind": "generation", "classes": ["four"]}, "takes no classes"),
    ],
)
def test_builder_refusals(options: dict, expected: str):
    with pytest.raises(ContinualPeftError, match=expected):
        Task.from_examples("t", TRAIN, TEST, **options)


def test_load_task_refuses_an_unknown_kind_before_reading_files(tmp_path: Path):
    with pytest.raises(ContinualPeftError, match="kind = 'regression' is unknown"):
        load_task("t", tmp_path / "none.jsonl", tmp_path / "none.jsonl", kind="regression")


def test_builder_empty_target_names_its_split_and_index():
    with pytest.raises(ContinualPeftError, match=r"train\[1\]: the target is empty"):
        Task.from_examples("t", [("a", "b"), ("c", "")], TEST, kind="generation")


def test_load_task_refuses_a_labels_file_on_a_generation_task(tmp_path: Path):
    write_gen_task(tmp_path, "g")
    with pytest.raises(ContinualPeftError, match="a generation task takes no labels"):
        load_task(
            "g",
            tmp_path / "g/train.jsonl",
            tmp_path / "g/test.jsonl",
            labels=tmp_path / "missing.json",
            kind="generation",
        )


# ---------------------------------------------------------------- the toy stream


def test_toy_stream_is_deterministic_for_a_seed():
    first, again, other = [toy_generative_stream(seed=seed) for seed in (0, 0, 1)]
    assert [t.name for t in first.tasks] == ["fruit", "animal", "vehicle"]
    assert [data(t) for t in first.tasks] == [data(t) for t in again.tasks]
    assert first.tasks[0].train_inputs != other.tasks[0].train_inputs
    for task in first.tasks:
        assert (task.kind, task.template) == ("generation", TOY_TEMPLATE)
        assert len(task.train_inputs) == 48 and len(task.test_inputs) == 24
    sizes = toy_generative_stream(num_tasks=4, train_per_task=12, test_per_task=6)
    assert [len(t.train_inputs) for t in sizes.tasks] == [12] * 4


def test_toy_tasks_conflict_on_shared_keys():
    """Every task maps the same colours, each to its own target; its cue word tells it apart."""
    stream = toy_generative_stream(num_tasks=4)
    answers = {}
    for task in stream.tasks:
        mapping = {}
        for text, target in zip(task.train_inputs, targets(task), strict=True):
            assert task.name in text.split()  # the cue a router can use
            key = next(word for word in text.split() if word in TOY_KEYS)
            assert mapping.setdefault(key, target) == target  # one target per key in a task
            assert 1 <= len(target.split()) <= 2
        assert set(mapping) == set(TOY_KEYS)
        answers[task.name] = mapping
    for key in TOY_KEYS:
        assert len({mapping[key] for mapping in answers.values()}) == len(answers)


def test_toy_words_cover_every_word():
    stream = toy_generative_stream(num_tasks=4)
    used = {"Input", "Output"}
    for task in stream.tasks:
        for text in task.train_inputs + task.test_inputs + task.labels:
            used |= set(text.split())
    assert used == set(TOY_WORDS) and sorted(TOY_WORDS) == TOY_WORDS


def test_toy_words_build_a_tokenizer_without_unknown_words():
    from continual_peft.backbones.tiny import word_tokenizer

    tokenizer = word_tokenizer(TOY_WORDS)
    for task in toy_generative_stream(num_tasks=4).tasks:
        for text, target in zip(task.train_inputs, targets(task), strict=True):
            ids = tokenizer(f"{task.prompt(text)} {target}")["input_ids"]
            assert tokenizer.unk_token_id not in ids, text


def test_toy_stream_refuses_bad_sizes():
    with pytest.raises(ContinualPeftError, match="1 to 4 tasks"):
        toy_generative_stream(num_tasks=5)
    with pytest.raises(ContinualPeftError, match="train_per_task = 0"):
        toy_generative_stream(train_per_task=0)


def test_toy_stream_written_as_a_spec_loads_the_same_tasks(tmp_path: Path):
    spec = write_toy_generative_stream(tmp_path, num_tasks=2, seed=5)
    loaded, made = load_stream(spec), toy_generative_stream(num_tasks=2, seed=5)
    assert loaded.name == made.name
    for a, b in zip(loaded.tasks, made.tasks, strict=True):
        assert (a.name, a.kind, a.template, data(a)) == (b.name, b.kind, b.template, data(b))


def test_shipped_toy_spec_is_what_the_function_writes(tmp_path: Path):
    """continual_peft/data/demo/generative.toml and its files are the default toy stream."""
    spec = write_toy_generative_stream(tmp_path, spec_name="generative.toml")
    demo = PACKAGE / "data" / "demo"
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 7
    for relative in written:
        assert (demo / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative
    assert [t.name for t in load_stream(demo / spec.name).tasks] == ["fruit", "animal", "vehicle"]
