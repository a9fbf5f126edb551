"""Records to predict or evaluate: a JSONL file (or standard input) of texts, each with an
optional task name and label, checked line by line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from continual_peft.errors import ContinualPeftError, check_file


def read_texts(source: str | Path) -> list[str]:
    """Texts to predict: a JSONL file (or "-" for standard input) with a "text" per line."""
    return [record["text"] for record in read_records(source)]


def read_records(source: str | Path) -> list[dict[str, str]]:
    """Records to predict or evaluate: a JSONL file (or "-" for standard input), one JSON object
    per line with a "text" string and optionally a "task" and a "label" (strings; an integer
    label is read as its digits). Other fields are ignored. Blank lines at the end are ignored;
    a blank line before a record is refused, since `predict` answers input line k with output
    line k and a skipped line would shift every later answer.

    Raises:
        ContinualPeftError: A missing file, a line that is not such an object (naming the line
            and what a line must look like), a blank line between records, or no record at all.
    """
    name = "<stdin>" if str(source) == "-" else str(source)
    lines = _read_bytes(source, name).split(b"\n")
    while lines and not lines[-1].strip():  # the file's last newline, and blank lines after
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (" ..." if len(blank) > 5 else "")
        raise ContinualPeftError(
            f"{name}: line(s) {shown} are blank: each line is one record, and the output's line "
            "k answers input line k, so a skipped line would shift every later answer; remove "
            "the blank lines"
        )
    records = [_record(line, f"{name}:{number}") for number, line in enumerate(lines, start=1)]
    if not records:
        raise ContinualPeftError(f"{name}: no texts to predict.")
    return records


_RECORD_SHAPE = (
    'each line must be one JSON object with a "text" (or "prompt") string, e.g. '
    '{"text": "a red car"}'
)


def _read_bytes(source: str | Path, name: str) -> bytes:
    """The whole file (checked first) or standard input, less a UTF-8 byte-order mark."""
    if name != "<stdin>":
        check_file(source, "JSONL file", 'give a file with a {"text": ...} object per line')
    raw = sys.stdin.buffer.read() if name == "<stdin>" else Path(source).read_bytes()
    return raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as training files allow


def _record(line: bytes, where: str) -> dict[str, str]:
    """One non-blank line as a record: its "text", and its "task" and "label" if given."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ContinualPeftError(
            f"{where}: not a UTF-8 JSON line ({err}); {_RECORD_SHAPE}."
        ) from None
    if isinstance(record, dict):  # a generation task's lines: {"prompt": ..., "target": ...}
        for key, alias in (("text", "prompt"), ("label", "target")):
            if key in record and alias in record:
                raise ContinualPeftError(
                    f"{where}: both {key!r} and {alias!r} are given; keep one of them"
                )
            if alias in record:
                record[key] = record.pop(alias)
    if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
        raise ContinualPeftError(f"{where}: {_RECORD_SHAPE}.")
    try:
        record["text"].encode("utf-8")
    except UnicodeEncodeError as err:
        raise ContinualPeftError(
            f"{where}: the text is not valid Unicode ({err.reason} at character "
            f"{err.start}, e.g. a lone surrogate such as \\ud800); fix or drop the line."
        ) from None
    kept = {"text": record["text"]}
    for key in ("task", "label"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise ContinualPeftError(f"{where}: {key!r} must be a string, got {value!r}.")
        if value is not None:
            kept[key] = value
    return kept
