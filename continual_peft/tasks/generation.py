"""Generation tasks: free-text targets stored as a task's labels, and prompt templates.

A generation task keeps the data model of a classification task: its distinct target strings
are its `labels` (in order of first appearance, train rows then test rows) and each example's
target is an index into them, so every consumer of label ids works unchanged. A template is
the text a generative backbone reads, with "{text}" standing for the input; encoder backbones
read the input without it.
"""

from __future__ import annotations

from typing import Any

from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.sources import Row

CLASSIFICATION = "classification"
GENERATION = "generation"
KINDS = (CLASSIFICATION, GENERATION)
PLACEHOLDER = "{text}"


def fill_template(template: str | None, text: str) -> str:
    """`template` with every "{text}" replaced by `text` (str.replace: other braces stay as
    written); the text itself without a template."""
    return text if template is None else template.replace(PLACEHOLDER, text)


TEMPLATE_EXAMPLE = 'template = "Review: {text}\\nSentiment:"'
# JSONL keys (CSV headers, dataset columns) of a generation task: the input, then the target
GENERATION_TEXT_COLUMNS = ("prompt", "text")
GENERATION_LABEL_COLUMN = "target"


def check_kind(kind: Any, where: str) -> str:
    """`kind` if it is one of `KINDS`; else an error that names the valid ones."""
    if kind not in KINDS:
        raise ContinualPeftError(
            f"{where}: kind = {kind!r} is unknown; valid kinds: {', '.join(KINDS)}."
        )
    return kind


def check_template(template: Any, where: str) -> str | None:
    """`template` if it is None or a string with the "{text}" placeholder; else an error."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise ContinualPeftError(
            f"{where}: template = {template!r} is not a string; give a string with "
            f"{PLACEHOLDER} where the input goes, e.g. {TEMPLATE_EXAMPLE}"
        )
    if PLACEHOLDER not in template:
        raise ContinualPeftError(
            f"{where}: template = {template!r} has no {PLACEHOLDER} placeholder, so the input "
            f"would never reach the model; put {PLACEHOLDER} where the input goes, e.g. "
            f"{TEMPLATE_EXAMPLE}"
        )
    return template


def columns_for(
    kind: str, text_column: str | None, label_column: str | None
) -> tuple[str | tuple[str, ...], str]:
    """The input and label fields to read: as given, else the defaults of the task's kind
    ("text" and "label"; "prompt" or "text", and "target", for a generation task)."""
    generation = kind == GENERATION
    if text_column is None:
        text_column = GENERATION_TEXT_COLUMNS if generation else "text"
    if label_column is None:
        label_column = GENERATION_LABEL_COLUMN if generation else "label"
    return text_column, label_column


def refuse_label_keys(where: str, **given: Any) -> None:
    """Refuse `labels` or `classes` given to a generation task (its targets are its labels)."""
    named = [key for key, value in given.items() if value is not None]
    if named:
        raise ContinualPeftError(
            f"{where}: a generation task takes no {' or '.join(named)}: its labels are the "
            f'distinct targets of its examples (the "{GENERATION_LABEL_COLUMN}" field); remove '
            f"{', '.join(named)} (or set kind = {CLASSIFICATION!r})."
        )


def check_targets(splits: dict[str, list[Row]]) -> None:
    """Refuse an empty (or blank) target, naming where its example came from."""
    for rows in splits.values():
        for row in rows:
            if not row.label.strip():
                raise ContinualPeftError(
                    f"{row.where}: the target is empty; give every example of a generation "
                    "task the text it should produce (or drop the example)."
                )


def target_labels(splits: dict[str, list[Row]]) -> list[str]:
    """The distinct targets, in order of first appearance: train rows, then test rows."""
    rows = [*splits["train"], *splits["test"]]
    return list(dict.fromkeys(row.label for row in rows))
