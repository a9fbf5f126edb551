"""Every source gives the same task: CSV/TSV, Hugging Face datasets, Python lists and datasets,
class splits; and the message each kind of bad source gets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from continual_peft import ContinualPeftError, Task
from continual_peft.tasks.class_split import class_split
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import load_task

TRAIN = [(f"train text {i}", ["pos", "neg", "neutral"][i % 3]) for i in range(12)]
TEST = [(f"test text {i}", ["pos", "neg", "neutral"][i % 3]) for i in range(6)]


def reference() -> Task:
    return Task.from_examples("t", TRAIN, TEST)


def same_task(task: Task, other: Task) -> None:
    assert task.labels == other.labels
    assert task.train_inputs == other.train_inputs
    assert task.train_labels == other.train_labels
    assert task.test_inputs == other.test_inputs
    assert task.test_labels == other.test_labels


def write_csv(path: Path, rows, header=("sentence", "category"), delimiter=",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- CSV / TSV


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_with_column_mapping(tmp_path: Path, suffix: str, delimiter: str):
    train = write_csv(tmp_path / f"train{suffix}", TRAIN, delimiter=delimiter)
    test = write_csv(tmp_path / f"test{suffix}", TEST, delimiter=delimiter)
    task = load_task("t", train, test, text_column="sentence", label_column="category")
    same_task(task, reference())
    assert task.sources == {"train": str(train), "test": str(test)}


def test_csv_quoted_fields_keep_commas_and_newlines(tmp_path: Path):
    rows = [("hello, world", "a"), ("two\nlines", "b")]
    train = write_csv(tmp_path / "train.csv", rows, header=("text", "label"))
    task = load_task("t", train, train)
    assert task.train_inputs == ["hello, world", "two\nlines"]


def test_csv_missing_column_names_the_header(tmp_path: Path):
    train = write_csv(tmp_path / "train.csv", TRAIN)
    with pytest.raises(
        ContinualPeftError, match=r"train.csv:1: no column\(s\) \['text', 'label'\]"
    ):
        load_task("t", train, train)


def test_csv_row_with_too_few_fields(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,a\nbroken\n", encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"train.csv:3: expected 2 fields"):
        load_task("t", path, path)


def test_csv_empty_label_names_the_line(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,a\nempty,\n", encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"train.csv:3: the 'label' field is empty"):
        load_task("t", path, path)


def test_csv_not_utf8_names_the_line(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
    with pytest.raises(ContinualPeftError, match=r"train.csv:3: not UTF-8"):
        load_task("t", path, path)


def test_unknown_extension_asks_for_a_format(tmp_path: Path):
    path = tmp_path / "train.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"cannot tell the format .* '\.txt'"):
        load_task("t", path, path)


def test_csv_label_outside_the_declared_labels(tmp_path: Path):
    train = write_csv(tmp_path / "train.csv", TRAIN, header=("text", "label"))
    with pytest.raises(ContinualPeftError, match=r"train.csv:\d+: label 'neutral' is not one of"):
        load_task("t", train, train, labels=["pos", "neg"], unknown_labels="refuse")


# ---------------------------------------------------------------- Python objects


def test_from_lists_equals_from_examples():
    task = Task.from_lists("t", *zip(*TRAIN, strict=True), *zip(*TEST, strict=True))
    same_task(task, reference())


def test_from_lists_integer_labels_sort_numerically():
    task = Task.from_lists("t", ["a"] * 12, list(range(12)), ["b"], [10])
    assert task.labels == [str(i) for i in range(12)]
    assert task.test_labels == [10]


def test_label_order_is_the_same_in_every_process():
    """Labels equal as numbers ("7", "07", "007") must not keep a set's hash-randomised order."""
    import subprocess
    import sys

    code = (
        "from continual_peft.tasks.task import default_labels;"
        "print(default_labels(['7', '07', '12', '007', '-3', '7']))"
    )
    processes = [  # side by side: each spends seconds importing torch
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        for seed in range(6)
    ]
    seen = {process.communicate(timeout=120)[0] for process in processes}
    assert [process.returncode for process in processes] == [0] * 6
    assert seen == {"['-3', '007', '07', '7', '12']\n"}


def test_from_lists_length_mismatch():
    with pytest.raises(ContinualPeftError, match="train: 2 inputs but 1 labels"):
        Task.from_lists("t", ["a", "b"], ["x"], ["a"], ["x"])


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def test_from_torch_dataset_equals_from_examples():
    task = Task.from_dataset("t", PairDataset(TRAIN), PairDataset(TEST))
    same_task(task, reference())


def test_from_dataset_of_dicts_and_tensor_labels():
    names = ["pos", "neg", "neutral"]
    rows = [{"x": t, "y": torch.tensor(names.index(y))} for t, y in TRAIN]
    task = Task.from_dataset("t", rows, rows, input_key="x", label_key="y")
    assert task.labels == ["0", "1", "2"]
    assert [task.labels[y] for y in task.train_labels] == [str(r["y"].item()) for r in rows]


def test_from_dataset_wrong_keys():
    with pytest.raises(ContinualPeftError, match=r"train\[0\]: cannot take fields 'text'"):
        Task.from_dataset("t", [{"x": "a", "y": 1}], [], input_key="text", label_key="y")


def test_float_labels_are_refused():
    with pytest.raises(ContinualPeftError, match=r"train\[0\]: label 0.5 is a float"):
        Task.from_lists("t", ["a"], [0.5], ["a"], [1])


# ---------------------------------------------------------------- class splits


def digit_like(n: int, classes: int = 6):
    return [f"item {i}" for i in range(n)], [i % classes for i in range(n)]


def test_class_split_groups_by_label():
    tasks = class_split("split", digit_like(60), digit_like(30), classes_per_task=2)
    assert [t.name for t in tasks] == ["split-0-1", "split-2-3", "split-4-5"]
    for task in tasks:
        assert len(task.labels) == 2
        assert len(task.train_inputs) == 20 and len(task.test_inputs) == 10
        inputs, labels = digit_like(60)
        for x, y in zip(task.train_inputs, task.train_labels, strict=True):
            assert str(labels[inputs.index(x)]) == task.labels[y]


def test_class_split_explicit_groups_and_datasets():
    train = PairDataset(list(zip(*digit_like(60), strict=True)))
    test = PairDataset(list(zip(*digit_like(30), strict=True)))
    tasks = class_split("s", train, test, groups=[["5", "0"], ["3"]], max_train=4)
    assert [t.labels for t in tasks] == [["5", "0"], ["3"]]
    assert [len(t.train_inputs) for t in tasks] == [4, 4]


def test_class_split_names_fall_back_to_numbers():
    train = (["a", "b", "c", "d"], ["Cat", "Dog", "Cat", "Dog"])
    tasks = class_split("pets", train, train, classes_per_task=1)
    assert [t.name for t in tasks] == ["pets-1", "pets-2"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "exactly one of classes_per_task or groups"),
        ({"classes_per_task": 2, "groups": [["0"]]}, "exactly one of"),
        ({"classes_per_task": 0}, "classes_per_task = 0"),
        ({"groups": [["0", "9"]]}, r"unknown: \['9'\]"),
        ({"groups": [["0", "1"], ["1"]]}, "each label at most once"),
    ],
)
def test_class_split_bad_groups(options: dict, expected: str):
    with pytest.raises(ContinualPeftError, match=expected):
        class_split("s", digit_like(12), digit_like(6), **options)


def test_class_split_from_a_spec(tmp_path: Path):
    inputs, labels = digit_like(60)
    write_csv(tmp_path / "d" / "train.csv", zip(inputs, labels, strict=True), ("text", "label"))
    write_csv(tmp_path / "d" / "test.csv", zip(*digit_like(30), strict=True), ("text", "label"))
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "s"\nmax_train = 10\n[[class_split]]\nprefix = "d"\ntrain = "d/train.csv"\n'
        'test = "d/test.csv"\nclasses_per_task = 3\n',
        encoding="utf-8",
    )
    stream = load_stream(spec)
    expected = class_split("d", digit_like(60), digit_like(30), classes_per_task=3, max_train=10)
    assert [t.name for t in stream.tasks] == ["d-0-1-2", "d-3-4-5"]
    for task, other in zip(stream.tasks, expected, strict=True):
        same_task(task, other)


# ---------------------------------------------------------------- Hugging Face datasets


def dataset_dict(class_label: bool = False):
    features = None
    if class_label:
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
        )
    names = ["pos", "neg"]

    def split(pairs):
        labels = [names.index(y) if class_label else y for _, y in pairs]
        return datasets.Dataset.from_dict(
            {"text": [t for t, _ in pairs], "label": labels}, features=features
        )

    pairs = (
        [(t, y) for t, y in TRAIN if y != "neutral"],
        [(t, y) for t, y in TEST if y != "neutral"],
    )
    return datasets.DatasetDict({"train": split(pairs[0]), "test": split(pairs[1])}), pairs


def test_hf_dataset_dict_in_memory_and_saved_to_disk(tmp_path: Path):
    data, (train, test) = dataset_dict()
    expected = Task.from_examples("t", train, test)
    same_task(Task.from_hf("t", data), expected)
    data.save_to_disk(str(tmp_path / "saved"))
    same_task(Task.from_hf("t", tmp_path / "saved"), expected)


def test_hf_class_label_ids_become_names(tmp_path: Path):
    data, (train, test) = dataset_dict(class_label=True)
    task = Task.from_hf("t", data, labels=["pos", "neg"])
    same_task(task, Task.from_examples("t", train, test, labels=["pos", "neg"]))


def test_hf_folder_of_files_and_builder_with_data_files(tmp_path: Path):
    folder = tmp_path / "folder"
    write_csv(folder / "train.csv", TRAIN, ("text", "label"))
    write_csv(folder / "test.csv", TEST, ("text", "label"))
    same_task(Task.from_hf("t", folder), reference())
    for split, rows in (("train", TRAIN), ("test", TEST)):
        lines = [json.dumps({"sentence": t, "y": y}) for t, y in rows]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines), encoding="utf-8")
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}
    task = Task.from_hf("t", "json", text_column="sentence", label_column="y", data_files=files)
    same_task(task, reference())


def test_hf_spec_with_splits_and_columns(tmp_path: Path):
    data, (train, test) = dataset_dict()
    data = datasets.DatasetDict({"fit": data["train"], "holdout": data["test"]})
    data = data.rename_column("text", "review")
    data.save_to_disk(str(tmp_path / "reviews"))
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "s"\n[[tasks]]\nname = "r"\ndataset = "reviews"\ntext_column = "review"\n'
        'train_split = "fit"\ntest_split = "holdout"\n',
        encoding="utf-8",
    )
    same_task(load_stream(spec).tasks[0], Task.from_examples("r", train, test))


def test_hf_errors_name_the_problem(tmp_path: Path):
    data, _ = dataset_dict()
    with pytest.raises(
        ContinualPeftError, match=r"no split 'validation'; it has \['train', 'test'"
    ):
        Task.from_hf("t", data, test_split="validation")
    with pytest.raises(ContinualPeftError, match=r"no column\(s\) \['sentence'\]"):
        Task.from_hf("t", data, text_column="sentence")
    with pytest.raises(ContinualPeftError, match="no such folder"):
        Task.from_hf("t", tmp_path / "missing")
    data["train"].save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ContinualPeftError, match="holds a single Dataset"):
        Task.from_hf("t", tmp_path / "one")
