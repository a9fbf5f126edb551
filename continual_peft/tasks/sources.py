"""Where examples come from: JSONL, JSON arrays, CSV/TSV, Hugging Face `datasets`, and plain
Python objects.

Every reader returns the same thing, a list of `Row`s: the input (a text, or an image for an
image backbone), its label as a string, and where it came from ("train.csv:17", "train[3]"), so
every later complaint about an example can point at it. Tasks are built from rows in `tasks.py`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from continual_peft.errors import ContinualPeftError, check_file

FILE_FORMATS = ("jsonl", "json", "csv", "tsv", "hf")
Column = str | tuple[str, ...]  # a field's name, or names tried in order ("prompt", then "text")


class Row(NamedTuple):
    """One example: its input, its label string, and where it came from (for messages)."""

    input: Any
    label: str
    where: str


def pick_column(column: Column, present: Any) -> str:
    """The first of `column`'s names that `present` (a record, a header, a dataset's column
    names) holds; its first name when none is there."""
    names = (column,) if isinstance(column, str) else column
    return next((name for name in names if name in present), names[0])


def shown(column: Column, quote: str = "") -> str:
    """A column for messages: `text`, or `prompt or text`; each name within `quote`s."""
    names = (column,) if isinstance(column, str) else column
    return " or ".join(f"{quote}{name}{quote}" for name in names)


def format_of(path: Path, given: str | None = None) -> str:
    """A data file's format: `given`, else from its extension (.jsonl, .csv, .tsv; .json is a
    JSON array when its first character is `[`, as in the published CL_Benchmark folder, else
    JSONL)."""
    if given is not None:
        if given not in FILE_FORMATS:
            raise ContinualPeftError(
                f"{path}: unknown format {given!r}; use one of {', '.join(FILE_FORMATS)}."
            )
        return given
    suffix = path.suffix.lower()
    found = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix)
    if suffix == ".json" and _starts_with(path, b"["):
        found = "json"
    if found is None and path.is_dir():
        check_file(
            path,
            "data file",
            'give a .jsonl, .csv or .tsv file (a Hugging Face dataset: format = "hf")',
        )
    if found is None:
        raise ContinualPeftError(
            f"{path}: cannot tell the format from the extension {suffix!r}; name the file "
            f".jsonl, .csv or .tsv, or set format = one of {', '.join(FILE_FORMATS)}."
        )
    return found


def _starts_with(path: Path, mark: bytes) -> bool:
    """Whether a file's first non-blank byte (after a UTF-8 byte order mark) is `mark`."""
    if not path.is_file():
        return False
    with path.open("rb") as file:
        head = file.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == mark


def label_string(value: Any, where: str) -> str:
    """A label as a string: strings stay, integers (also numpy/torch scalars) are written out."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor or array
            return label_string(value.item(), where)
        raise ContinualPeftError(
            f"{where}: label {value!r} is a {type(value).__name__}; labels must be strings or "
            "integers."
        )
    return str(int(value))


def _decoded(path: Path) -> str:
    check_file(path, "file", "check the path or the --data-root option")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ContinualPeftError(
            f"{path}:{line}: not UTF-8 ({err.reason}); re-encode the file as UTF-8."
        ) from None


def read_jsonl(path: Path, text_column: Column = "text", label_column: str = "label") -> list[Row]:
    """One row per non-blank line of a JSONL file: `{"text": ..., "label": ...}`.

    `text_column` may name several keys (a generation task's "prompt" or "text"): each line
    uses the first one it has.
    """
    rows = []
    for number, line in enumerate(_decoded(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ContinualPeftError(
                f"{where}: malformed JSON ({err.msg}); each line must be one JSON object."
            ) from None
        rows.append(_record_row(record, where, text_column, label_column))
    return rows


def read_json_array(
    path: Path, text_column: Column = "text", label_column: str = "label"
) -> list[Row]:
    """One row per record of a file holding one JSON array of objects, as the published
    CL_Benchmark folder does (`[{"sentence": ..., "label": ...}, ...]`: map its text with
    `text_column = "sentence"`). Rows are named `file[i]`, i counted from 0."""
    try:
        records = json.loads(_decoded(path))
    except json.JSONDecodeError as err:
        raise ContinualPeftError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg}); the file must hold one JSON array "
            "of objects."
        ) from None
    if not isinstance(records, list):
        raise ContinualPeftError(
            f"{path}: holds a JSON {type(records).__name__}, not an array of records; give "
            '[{"text": ..., "label": ...}, ...] (or one object per line as .jsonl).'
        )
    return [
        _record_row(record, f"{path}[{i}]", text_column, label_column)
        for i, record in enumerate(records)
    ]


def _record_row(record: Any, where: str, text_column: Column, label_column: str) -> Row:
    """A JSON record as a row: its text under `text_column`, its label (a string or an
    integer) under `label_column`; anything else refused, naming the record."""
    label = record.get(label_column) if isinstance(record, dict) else None
    text_key = pick_column(text_column, record if isinstance(record, dict) else {})
    if isinstance(label, float) and not math.isfinite(label):
        raise ContinualPeftError(
            f"{where}: label {label!r} is not a label; give a string or an integer (or leave "
            "the record out)."
        )
    if isinstance(label, float):
        whole = int(label) if label.is_integer() else label
        raise ContinualPeftError(
            f"{where}: label {label!r} is a floating-point number; labels are strings or "
            f'integers (3.0 and 3 would be two labels): write {whole} or "{label}"'
        )
    if not (
        isinstance(record, dict)
        and isinstance(record.get(text_key), str)
        and isinstance(label, str | int)
        and not isinstance(label, bool)
    ):
        keys = shown(text_column, quote='"')
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        present = [
            (key, record[key])
            for key, ok in ((text_key, str), (label_column, str | int))
            if isinstance(record, dict) and key in record and not isinstance(record[key], ok)
        ]
        if present and all(k in record for k in (text_key, label_column)):
            key, value = present[0]
            kind = "null" if value is None else type(value).__name__
            wanted = "a string" if key == text_key else "a string or an integer"
            raise ContinualPeftError(
                f'{where}: the value of "{key}" is {kind} ({json.dumps(value, default=str)[:40]}), '
                f"not {wanted}; fix the record or leave it out."
            )
        raise ContinualPeftError(
            f'{where}: expected {{{keys}: "...", "{label_column}": "..."}}, got '
            f"{json.dumps(record, default=str)[:80]!r} (keys: {found}); map the keys with "
            "text_column = ... and label_column = ...."
        )
    return Row(record[text_key], str(label), where)


def read_csv(
    path: Path,
    text_column: Column = "text",
    label_column: str = "label",
    delimiter: str | None = None,
) -> list[Row]:
    """One row per record of a CSV (or TSV) file with a header line.

    Args:
        path: The file; `.tsv` files are tab-separated unless `delimiter` says otherwise.
        text_column: The header of the column holding the input text (or headers, the first
            one the file has is used).
        label_column: The header of the column holding the label.
        delimiter: The field separator; "," (or tab for .tsv) by default.
    """
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(_decoded(path), newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ContinualPeftError(
            f"{path}:1: the header names column(s) {repeated} more than once; give every "
            "column its own name (a repeated name would silently keep only its last column)."
        )
    text_key = pick_column(text_column, header)
    wanted = ((text_column, text_key), (label_column, label_column))
    missing = [shown(column) for column, key in wanted if key not in header]
    if missing:
        raise ContinualPeftError(
            f"{path}:1: no column(s) {missing} in the header {header}; map the columns with "
            "text_column = ... and label_column = ... (or fix the header)."
        )
    rows = []
    for record in reader:
        where = f"{path}:{reader.line_num}"
        text, label = record[text_key], record[label_column]
        if text is None or label is None or None in record:
            raise ContinualPeftError(
                f"{where}: expected {len(header)} fields {header}; check the quoting and the "
                f"delimiter ({delimiter!r})."
            )
        if not label.strip():
            raise ContinualPeftError(f"{where}: the {label_column!r} field is empty.")
        rows.append(Row(text, label.strip(), where))
    return rows


def read_rows(
    path: Path,
    file_format: str | None = None,
    text_column: Column = "text",
    label_column: str = "label",
) -> list[Row]:
    """The rows of one data file, in the format its extension (or `file_format`) names."""
    kind = format_of(path, file_format)
    if kind == "jsonl":
        return read_jsonl(path, text_column, label_column)
    if kind == "json":
        return read_json_array(path, text_column, label_column)
    if kind == "hf":
        raise ContinualPeftError(
            f"{path}: a Hugging Face dataset is named by `dataset`, not train/test files."
        )
    return read_csv(path, text_column, label_column, "\t" if kind == "tsv" else None)


def rows_from_lists(inputs: Sequence, labels: Sequence, split: str) -> list[Row]:
    """Rows from parallel lists of inputs (texts or images) and labels."""
    if len(inputs) != len(labels):
        raise ContinualPeftError(
            f"{split}: {len(inputs)} inputs but {len(labels)} labels; give one label per input."
        )
    return [
        Row(x, label_string(y, f"{split}[{i}]"), f"{split}[{i}]")
        for i, (x, y) in enumerate(zip(inputs, labels, strict=True))
    ]


def rows_from_dataset(
    dataset: Any, split: str, input_key: int | str = 0, label_key: int | str = 1
) -> list[Row]:
    """Rows from any indexable dataset, e.g. a torch `Dataset`: item i is `dataset[i]`.

    An item is a tuple `(input, label, ...)` or a dict; `input_key`/`label_key` pick its fields.
    """
    try:
        size = len(dataset)
    except TypeError:
        raise ContinualPeftError(
            f"{split}: a {type(dataset).__name__} has no len(); give a map-style dataset "
            "(torch Dataset with __len__ and __getitem__) or lists."
        ) from None
    rows = []
    for i in range(size):
        item, where = dataset[i], f"{split}[{i}]"
        try:
            x, y = item[input_key], item[label_key]
        except (KeyError, IndexError, TypeError):
            raise ContinualPeftError(
                f"{where}: cannot take fields {input_key!r} (input) and {label_key!r} (label) "
                f"from a {type(item).__name__}; pass input_key=/label_key= to say where they are."
            ) from None
        rows.append(Row(x, label_string(y, where), where))
    return rows


def load_hf_split(
    source: Any,
    split: str,
    text_column: Column = "text",
    label_column: str = "label",
    data_files: dict[str, str] | None = None,
) -> list[Row]:
    """Rows of one split of a Hugging Face dataset, offline.

    Args:
        source: A `Dataset`/`DatasetDict` already in memory; a folder written by
            `save_to_disk`; a folder of data files `load_dataset` understands; or a builder name
            ("csv", "json", "parquet", "imagefolder") used with `data_files`.
        split: The split to read ("train", "test", ...).
        text_column: The input column (texts, or images for an image backbone), or columns,
            the first one the dataset has is used.
        label_column: The label column; `ClassLabel` ids are turned into their names.
        data_files: Split -> file, for a builder name or a folder.
    """
    dataset = _hf_split(source, split, data_files)
    text_key = pick_column(text_column, dataset.column_names)
    missing = [c for c in (text_key, label_column) if c not in dataset.column_names]
    if missing:
        raise ContinualPeftError(
            f"{_hf_name(source)}[{split}]: no column(s) {missing}; it has {dataset.column_names}. "
            "Map them with text_column = ... and label_column = ...."
        )
    names = getattr(dataset.features[label_column], "names", None)  # ClassLabel
    inputs, labels = dataset[text_key], dataset[label_column]
    where = f"{_hf_name(source)}[{split}]"
    if names is not None:
        labels = [names[y] for y in labels]
    return rows_from_lists(inputs, labels, where)


def _hf_name(source: Any) -> str:
    return str(source) if isinstance(source, str | Path) else type(source).__name__


def _hf_split(source: Any, split: str, data_files: dict[str, str] | None):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the network
    try:
        import datasets
    except ImportError:
        raise ContinualPeftError(
            "Hugging Face datasets are an optional extra: pip install 'continual-peft[hf]' "
            "(or pip install datasets)."
        ) from None
    datasets.disable_progress_bars()  # our own progress output is enough
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick(source, split, type(source).__name__)
    name = str(source)
    folder = Path(name)
    try:
        if folder.is_dir() and (
            (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.Dataset):
                raise ContinualPeftError(
                    f"{name}: holds a single Dataset, not a DatasetDict with {split!r} and the "
                    "other split; save a DatasetDict({'train': ..., 'test': ...}) instead."
                )
            return _pick(loaded, split, name)
        if not folder.exists() and data_files is None:
            raise ContinualPeftError(
                f"{name}: no such folder. Give a folder written by save_to_disk, a folder of data "
                "files, or a builder name (csv, json, parquet, imagefolder) with data_files."
            )
        loaded = datasets.load_dataset(name, data_files=data_files)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ContinualPeftError(f"{source}: cannot load the dataset offline: {err}") from None
    return _pick(loaded, split, str(source))


def _pick(dataset_dict, split: str, name: str):
    if split not in dataset_dict:
        raise ContinualPeftError(
            f"{name}: no split {split!r}; it has {list(dataset_dict)}. Set train_split/test_split."
        )
    return dataset_dict[split]
