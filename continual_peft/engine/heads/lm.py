"""Heads of generative backbones: the frozen LM head answers every task (`heads.interface`).

Per task it keeps the label strings (a generation task's labels are its distinct targets), its
kind, its prompt template and the labels' token ids (`LanguageModelBackbone.encode_targets`).

- Classification, `decode = "score"` (the default): each label string is scored by the
  log-likelihood of its tokens after the prompt (`label_score`: "sum", the default, or "mean"
  over its tokens); the best label is the prediction. `row_logits` returns these scores.
- Classification, `decode = "generate"`: greedy generation (the published protocol). An answer
  is the label whose own target tokens it wrote (up to EOS), else the label whose tokens decode
  to the same text, else its decoded text, which is no label and wrong (the evaluation counts
  them: `not_a_label`). Labels are matched in token space because decoding does not give every
  string back (`clean_up_tokenization_spaces` writes "very good !" as "very good!"); such labels
  are named in a warning when their task opens.
- Generation: greedy generation of at most `max_new_tokens` tokens, matched to the targets the
  same way (a target whose tokens another target shares, or that holds unknown words, never).
- Training (`row_loss`), every kind: cross-entropy of the gold target's tokens, prompt masked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from continual_peft.backbones.lm import LanguageModelBackbone
from continual_peft.backbones.text import Encoded
from continual_peft.config import GenerationConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.generation import fill_template
from continual_peft.tasks.task import Task

GENERATION = "generation"


@dataclass(kw_only=True)
class TaskTargets:
    """What the LM head needs of one task."""

    labels: list[str]
    kind: str  # "classification" or "generation"
    template: str | None
    targets: list[list[int]]  # token ids of each label (target), EOS last
    by_tokens: dict[tuple[int, ...], str]  # a label's ids without EOS -> the label
    by_text: dict[str, str]  # a label's ids decoded -> the label


class LanguageModelHeads(nn.Module):
    """The frozen LM head serving every task of a generative backbone.

    Args:
        backbone: A causal or seq2seq backbone.
        config: How classification is decoded, how labels are scored, how long answers are.
    """

    def __init__(self, backbone: LanguageModelBackbone, config: GenerationConfig) -> None:
        super().__init__()
        self._backbone = [backbone]  # not a submodule: the learner owns it
        self.config = config
        self.heads = nn.ModuleDict()  # an empty module per task: nothing to train or save
        self.tasks: dict[str, TaskTargets] = {}

    @property
    def backbone(self) -> LanguageModelBackbone:
        return self._backbone[0]

    def _register(self, name: str, labels: list[str], kind: str, template: str | None) -> None:
        where = f"task {name!r}: {'target' if kind == GENERATION else 'label'}"
        targets = self.backbone.encode_targets(list(labels), where)
        _check_targets(self.backbone, name, kind=kind, labels=labels, targets=targets)
        longest = max(len(t) for t in targets)
        self.backbone.check_room(
            longest,
            f"task {name!r}: its longest target ({longest} tokens with EOS)",
            "lower max_length (--max-length)",
        )
        if kind == GENERATION or self.config.decode == "generate":
            self.backbone.check_room(
                self.config.max_new_tokens,
                f"task {name!r}: generation.max_new_tokens",
                "lower max_new_tokens or max_length",
            )
        by_tokens, by_text = _answer_tables(self.backbone, kind, labels, targets)
        self.tasks[name] = TaskTargets(
            labels=list(labels),
            kind=kind,
            template=template,
            targets=targets,
            by_tokens=by_tokens,
            by_text=by_text,
        )
        self.heads[name] = nn.Module()

    def open(self, task: Task, seed: int) -> nn.Module:
        """Register `task` (its label strings' tokens); nothing trainable. Warns of labels
        that a generated answer can only match by their tokens (`_warn_round_trip`)."""
        kind = getattr(task, "kind", "classification")
        self._register(task.name, task.labels, kind, getattr(task, "template", None))
        if kind == GENERATION or self.config.decode == "generate":
            self._check_writable(task.name)
        if kind != GENERATION and self.config.decode == "generate":
            _warn_round_trip(self.backbone, task.name, self.tasks[task.name])
        return self.heads[task.name]

    def _check_writable(self, name: str) -> None:
        """Labels (targets) longer than `max_new_tokens` tokens can never be written by a
        greedy answer, so their rows can only be wrong: refused for a classification task
        (`decode = "generate"`), warned about for a generation task (its answers are cut).

        Raises:
            ContinualPeftError: naming the labels, their token counts and the fix.
        """
        targets, most = self.tasks[name], self.config.max_new_tokens
        pairs = zip(targets.labels, targets.targets, strict=True)
        lengths = {label: len(ids) - 1 for label, ids in pairs}
        too_long = {label: n for label, n in lengths.items() if n > most}  # EOS not counted
        if not too_long:
            return
        longest = max(too_long.values())
        shown = ", ".join(f"{label!r} ({n} tokens)" for label, n in list(too_long.items())[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        if targets.kind != GENERATION:
            raise ContinualPeftError(
                f"task {name!r}: label(s) {shown}{more} need more tokens than "
                f"generation.max_new_tokens = {most}: a greedy answer can never write them, so "
                f"every row of theirs would count as wrong; raise max_new_tokens to at least "
                f'{longest}, or score the labels instead (decode = "score")'
            )
        warnings.warn(
            f"task {name!r}: {len(too_long)} of its {len(lengths)} targets need more tokens "
            f"than generation.max_new_tokens = {most} ({shown}{more}): answers are cut there, "
            f"so those rows can never match exactly; raise max_new_tokens to {longest} to give "
            "them room",
            UserWarning,
            stacklevel=2,
        )

    def restore(self, name: str, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        """A learned task from its record (labels, kind, template)."""
        kind = record.get("kind", "classification")
        self._register(name, record["labels"], kind, record.get("template"))

    def freeze(self, task: str) -> None:
        """Nothing to freeze: the LM head is the backbone's, frozen from the start."""

    def metric(self, task: str) -> str:
        return "exact_match" if self.tasks[task].kind == GENERATION else "accuracy"

    def prompt_items(self, task: str, inputs: list, where: str = "input") -> Encoded:
        """The inputs with the task's template filled in, as token ids (cut from the left)."""
        template = self.tasks[task].template
        return self.backbone.encode([fill_template(template, x) for x in inputs], where)

    def row_loss(self, items: list, tasks: list[str], labels: list[int]) -> torch.Tensor:
        """Mean cross-entropy of the gold targets' tokens after the prompts."""
        targets = [self.tasks[t].targets[y] for t, y in zip(tasks, labels, strict=True)]
        return self.backbone.target_loss(items, targets)

    def row_weights(self, tasks: list[str], labels: list[int]) -> list[int]:
        """Each row's weight in `row_loss`'s mean: its target's token count (a token mean)."""
        return [len(self.tasks[t].targets[y]) for t, y in zip(tasks, labels, strict=True)]

    def row_logits(self, items: list, tasks: list[str]) -> torch.Tensor:
        """(B, C_max) label scores (`label_score` of each label's token log-probabilities),
        -inf past each row's own label count; one forward per label position."""
        counts = [len(self.tasks[t].targets) for t in tasks]
        placement = self.backbone.placement
        out = placement.zeros(len(items), max(counts)).fill_(float("-inf"))
        for c in range(max(counts)):  # rows without a c-th label score their last, unused
            targets = [
                self.tasks[t].targets[min(c, n - 1)] for t, n in zip(tasks, counts, strict=True)
            ]
            summed, tokens = self.backbone.target_logprobs(items, targets)
            score = summed / tokens if self.config.label_score == "mean" else summed
            keep = placement.tensor([i for i, n in enumerate(counts) if n > c], dtype=torch.long)
            out[keep, c] = score[keep]
        return out

    def row_predict(self, items: list, tasks: list[str]) -> list[str]:
        """Each row's answer: its best label (decode "score"), or the greedy text."""
        scored = [i for i, t in enumerate(tasks) if self._scores(t)]
        answers: list[str] = [""] * len(items)
        if scored:
            sub = [tasks[i] for i in scored]
            best = self.row_logits([items[i] for i in scored], sub).argmax(dim=-1).tolist()
            for i, t, b in zip(scored, sub, best, strict=True):
                answers[i] = self.tasks[t].labels[b]
        written = [i for i in range(len(items)) if i not in set(scored)]
        if written:
            new = self.backbone.generate([items[i] for i in written], self.config.max_new_tokens)
            for i, ids in zip(written, new, strict=True):
                answers[i] = self._answer(tasks[i], ids)
        return answers

    def _answer(self, task: str, ids: list[int]) -> str:
        """A generated row's answer (ids up to EOS): the label whose own tokens it wrote, else
        the label whose tokens decode to its text, else its text."""
        entry, text = self.tasks[task], self.backbone.decode(ids)
        return entry.by_tokens.get(tuple(ids)) or entry.by_text.get(text, text)

    def describe(self, task: str, scores: dict[str, dict]) -> dict:
        """What a task's record adds: its kind and template (to load it again) and the last
        evaluation's other scores of every task (`Predictor.text_scores`)."""
        entry = self.tasks[task]
        return {"kind": entry.kind, "template": entry.template, "text_scores": dict(scores)}

    def mode(self, task: str) -> str:
        """How a task's rows are answered: "score" its labels, or "generate" text. Rows of
        both modes never share a forward (`inference.routed_predict` splits them)."""
        return "score" if self._scores(task) else "generate"

    def _scores(self, task: str) -> bool:
        """Whether `task` is answered by scoring its labels rather than generating."""
        return self.tasks[task].kind != GENERATION and self.config.decode == "score"

    def prompt_rows(self, inputs: list, tasks: list[str], items: list | None = None) -> list:
        """Each input in its row's task's template, encoded (`items`, the bare encodings that
        routers read, are not what the LM reads)."""
        rows: list = [None] * len(inputs)
        for task in dict.fromkeys(tasks):
            picked = [i for i, t in enumerate(tasks) if t == task]
            encoded = self.prompt_items(task, [inputs[i] for i in picked]).items
            for i, item in zip(picked, encoded, strict=True):
                rows[i] = item
        return rows

    def feature_items(self, inputs: list, where: str = "input") -> list | None:
        """The inputs as routers read them: bare, without any task's template (a template
        that differs between tasks would tell the router the task)."""
        return self.backbone.encode(list(inputs), where).items


def _check_targets(backbone, task: str, *, kind: str, labels: list[str], targets: list) -> None:
    """Refuse labels the tokenizer cannot tell apart (their scores would always tie); warn of
    generation targets with words the tokenizer does not know (never written exactly)."""
    unknown = backbone.tokenizer.unk_token_id
    if kind != GENERATION:
        seen: dict[tuple, str] = {}
        for label, ids in zip(labels, targets, strict=True):
            if tuple(ids) in seen:
                raise ContinualPeftError(
                    f"task {task!r}: labels {seen[tuple(ids)]!r} and {label!r} have the same "
                    f"tokens for this backbone's tokenizer ({backbone.name}), so their scores "
                    "always tie; rename them to words the tokenizer knows"
                )
            seen[tuple(ids)] = label
    elif unknown is not None:
        odd = [t for t, ids in zip(labels, targets, strict=True) if unknown in ids]
        if odd:
            warnings.warn(
                f"task {task!r}: {len(odd)} target(s) hold words this backbone's tokenizer "
                f"does not know (e.g. {odd[0]!r}); they decode to nothing and can never be "
                "written exactly",
                UserWarning,
                stacklevel=4,
            )


def _answer_tables(
    backbone, kind: str, labels: list[str], targets: list[list[int]]
) -> tuple[dict[tuple[int, ...], str], dict[str, str]]:
    """Each label by its target ids without EOS (as `generate` returns an answer) and by their
    decoded text. A key two labels share maps to none: such an answer does not say which
    label it is. A label with unknown words is matched by its tokens only (its text decodes
    without them); a generation target with unknown words, not at all (`_check_targets`)."""
    unknown = backbone.tokenizer.unk_token_id
    rows = [
        (label, ids[:-1], unknown is not None and unknown in ids)
        for label, ids in zip(labels, targets, strict=True)
    ]
    by_tokens = _unique(
        [(tuple(ids), label) for label, ids, odd in rows if not (odd and kind == GENERATION)]
    )
    by_text = _unique([(backbone.decode(ids), label) for label, ids, odd in rows if not odd])
    return by_tokens, by_text


def _unique(pairs: list) -> dict:
    """`dict(pairs)` without the keys that more than one pair has."""
    counts: dict = {}
    for key, _ in pairs:
        counts[key] = counts.get(key, 0) + 1
    return {key: value for key, value in pairs if counts[key] == 1}


def _warn_round_trip(backbone, task: str, entry: TaskTargets) -> None:
    """Warn of labels that decoding their own tokens does not give back (decode(encode(label))
    differs, e.g. "very good !" -> "very good!"): answers still match them by their tokens,
    but a written text never equals them, and tools that compare decoded text miss them."""
    decoded = [backbone.decode(ids) for ids in entry.targets]
    changed = [
        (label, text) for label, text in zip(entry.labels, decoded, strict=True) if text != label
    ]
    if changed:
        shown = ", ".join(f"{label!r} -> {text!r}" for label, text in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        warnings.warn(
            f"task {task!r}: {len(changed)} label(s) do not come back from this backbone's "
            f"tokenizer ({backbone.name}) as written: {shown}{more}. Generated answers are "
            "matched to labels by their tokens here, so they still count, but a tool that "
            "compares decoded text (e.g. an exported adapter with generate + decode) misses "
            "them; write the labels as the tokenizer decodes them to avoid that",
            UserWarning,
            stacklevel=3,
        )
