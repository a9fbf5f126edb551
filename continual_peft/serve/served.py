"""A run as the server holds it: the loaded learner, which checkpoint it is, and how a batch of
requests is answered by it.

The server answers every row exactly as `predict` does (`engine.evaluation.predict_records`):
rows with a task go through that task, the others through the router, all rows of a batch
together. What belongs to one request (an unknown task, rows without a task on a run without a
router) is checked per request first, so it fails that request alone.

A run that another process is still learning is served as its last checkpoint has it;
`RunWatcher` notices a newer checkpoint and loads it beside the one being served.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.lm import LanguageModelBackbone
from continual_peft.backbones.text import check_unicode as check_texts
from continual_peft.engine.evaluation import predict_records
from continual_peft.engine.learner import ContinualLearner
from continual_peft.engine.loading import load_learner
from continual_peft.errors import ContinualPeftError
from continual_peft.store.checkpoint import CHECKPOINT_FILE, read_checkpoint
from continual_peft.store.io import load_json


class RequestError(ContinualPeftError):
    """What is wrong with one request (answered 4xx; the rest of its batch goes on).

    Attributes:
        status: The HTTP status to answer with.
        param: The request field at fault, if one is.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True, kw_only=True)
class Row:
    """One text to answer: with its task, or None for the router. A `completion` row (OpenAI
    endpoints) also gets its text and token counts, its answer cut at `max_tokens` (None: the
    whole answer)."""

    text: str
    task: str | None = None
    completion: bool = False
    max_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class ServedRun:
    """A loaded run and the checkpoint it was loaded from."""

    learner: ContinualLearner
    folder: Path
    version: str  # the first 12 hex digits of checkpoint.json's sha256
    tasks: tuple[str, ...]  # learned tasks, in learning order
    status: str  # the checkpoint's: running (another process is learning), finished, ...
    loaded_at: float  # time.time() when loaded
    run_config_sha256: str  # the run's configuration (a newer checkpoint must share it)
    data_sha256: tuple[str, ...]  # each task's data hash, in learning order

    @property
    def generative(self) -> bool:
        """Whether the backbone writes text (the OpenAI endpoints answer then)."""
        return isinstance(self.learner.backbone, LanguageModelBackbone)

    @property
    def routed(self) -> bool:
        """Whether the run has a router (rows without a task can be answered)."""
        return self.learner.router is not None

    def describe(self) -> dict[str, Any]:
        """What `GET /tasks` shows: the tasks, their kinds, and the checkpoint."""
        learned = self.learner.learned
        return {
            "run": str(self.folder),
            "checkpoint": self.version,
            "status": self.status,
            "loaded_at": self.loaded_at,
            "router": self.learner.config.router if self.routed else None,
            "router_layers": self.learner.router.layers if self.routed else None,
            "generative": self.generative,
            "tasks": [
                {
                    "name": name,
                    "kind": learned[name].task.kind,
                    "labels": len(learned[name].task.labels),
                    "slot": learned[name].slot,
                }
                for name in self.tasks
            ],
        }

    def check(self, rows: list[Row]) -> None:
        """Refuse a request this run cannot answer (`RequestError`, naming the fix)."""
        unknown = sorted({r.task for r in rows if r.task is not None and r.task not in self.tasks})
        if unknown:
            raise RequestError(
                f"unknown task(s) {unknown}; this run has learned {list(self.tasks)} "
                "(GET /tasks), or leave the task out to let the router choose",
                status=404,
                param="task",
            )
        if not self.routed and any(r.task is None for r in rows):
            raise RequestError(
                "this run has no router (router 'oracle'), so every text needs its task: give "
                f"one of {list(self.tasks)}",
                param="task",
            )

    def _check_tokens(self, rows: list[Row]) -> None:
        """Refuse texts that hold no token of the backbone's own (only invisible or control
        characters): their answer would be that of an empty input. Called in the worker thread,
        the one that uses the tokenizer."""
        tokenizer = self.learner.backbone.tokenizer
        check_unicode(rows)
        if tokenizer is None or not rows:
            return
        heads = [row.text[:4096] for row in rows]  # a text's start usually settles it
        ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
        blank = [
            i
            for i, found in enumerate(ids)
            if not found
            and not tokenizer(rows[i].text[4096:], add_special_tokens=False)["input_ids"]
        ]
        if blank:
            raise RequestError(
                f"text(s) {blank[:10]} hold nothing this backbone reads (only invisible or "
                "control characters); send text",
                "texts",
            )

    def answer(self, requests: list[list[Row]]) -> list[list[dict] | Exception]:
        """Each request's rows answered as `predict` answers them, all valid requests' rows in
        one routed pass; a request this run cannot answer gets its `RequestError` instead.

        If the pass fails (an input the backbone refuses, which the checks before batching
        did not catch), each request is answered alone, so the failure reaches only the
        request that caused it: a `ContinualPeftError` as its `RequestError` (422), anything
        else as the exception itself (500).
        """
        results: list[list[dict] | Exception] = []
        valid: list[int] = []
        for i, rows in enumerate(requests):
            try:
                self.check(rows)
                self._check_tokens(rows)
                valid.append(i)
                results.append([])
            except RequestError as err:
                results.append(err)
        try:
            answered = self._together([requests[i] for i in valid])
        except Exception:
            if len(valid) < 2:
                raise
            answered = [self._alone(requests[i]) for i in valid]
        for i, answer in zip(valid, answered, strict=True):
            results[i] = answer
        return results

    def _together(self, requests: list[list[Row]]) -> list[list[dict]]:
        """The requests' rows in one `predict_records` call, split back per request."""
        flat = [row for rows in requests for row in rows]
        records = [{"text": row.text, "task": row.task} for row in flat]
        answers = iter(predict_records(self.learner, records) if records else [])
        return [[self._finished(row, next(answers)) for row in rows] for rows in requests]

    def _alone(self, rows: list[Row]) -> list[dict] | Exception:
        """One request's answer, or what it failed with."""
        try:
            (answer,) = self._together([rows])
            return answer
        except RequestError as err:
            return err
        except ContinualPeftError as err:
            return RequestError(str(err))
        except Exception as err:
            return err

    def _finished(self, row: Row, answer: dict) -> dict:
        """A completion row's token counts and its answer cut at `max_tokens` (OpenAI's
        `usage` and `finish_reason`); other rows as `predict` gives them."""
        if not row.completion:
            return answer
        tokenizer = self.learner.backbone.tokenizer
        prompt = len(tokenizer(row.text, add_special_tokens=False)["input_ids"])
        text = answer["label"] or ""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(ids) if row.max_tokens is None else min(len(ids), row.max_tokens)
        cut = keep < len(ids)
        if cut:
            text = tokenizer.decode(ids[:keep], skip_special_tokens=True)
        return {
            **answer,
            "text": text,
            "prompt_tokens": prompt,
            "completion_tokens": keep,
            "finish_reason": "length" if cut else "stop",
        }


def check_unicode(rows: list[Row]) -> None:
    """Refuse texts that cannot be encoded (a JSON body may carry lone surrogates), as the
    backbone would (`backbones.text.check_unicode`), as this request's error."""
    try:
        check_texts([row.text for row in rows], "text")
    except ContinualPeftError as err:
        raise RequestError(str(err), "texts") from None


def checkpoint_version(folder: Path) -> str | None:
    """The first 12 hex digits of the run's checkpoint.json sha256; None when it has none."""
    try:
        return hashlib.sha256((folder / CHECKPOINT_FILE).read_bytes()).hexdigest()[:12]
    except FileNotFoundError:
        return None


def load_served(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    attempts: int = 3,
) -> ServedRun:
    """Load a run's last checkpoint to serve.

    A checkpoint that a running process replaces during the load is loaded again (up to
    `attempts` times), so the version named is the one loaded.

    Raises:
        ContinualPeftError: no task of the run has finished yet, a damaged run (naming the
            file and the repair), an image backbone (the server answers texts), or a run that
            kept changing while it was loaded.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ContinualPeftError(f"{folder} is a file, not a run directory; give the run's folder.")
    if not folder.is_dir():
        raise ContinualPeftError(f"run directory {folder} does not exist; check the path.")
    for _ in range(attempts):
        before = checkpoint_version(folder)
        learner = load_learner(folder, device=device, dtype=dtype, batch_size=batch_size)
        checkpoint = read_checkpoint(folder)
        if checkpoint_version(folder) != before:
            continue  # a newer checkpoint landed while the files were read
        if isinstance(learner.backbone, ImageBackbone):
            raise ContinualPeftError(
                f"{folder}: the run's backbone reads images; the server answers texts. Use "
                "`continual-peft predict` for image runs."
            )
        return ServedRun(
            learner=learner,
            folder=folder,
            version=before or "",
            tasks=tuple(learner.learned),
            status=checkpoint.status,
            loaded_at=time.time(),
            run_config_sha256=checkpoint.run_config_sha256,
            data_sha256=tuple(entry.data_sha256 for entry in checkpoint.tasks),
        )
    raise ContinualPeftError(
        f"{folder}: its checkpoint changed during each of {attempts} loads; try again"
    )


class RunWatcher:
    """Tells when the run directory holds a newer checkpoint of the run being served.

    A checkpoint of the same run has its configuration and continues (or, repaired, rolls
    back) its tasks with the same data. One of another run (the folder emptied and refilled)
    is not picked up: `failed` says why, as it does while checkpoint.json is missing.

    Args:
        served: The run being served.
    """

    def __init__(self, served: ServedRun) -> None:
        self.folder = served.folder
        self.failed: str | None = None  # why the newest checkpoint is not served (/tasks)
        self._refused: str | None = None  # the version `failed` is about
        self._retry_at = math.inf  # when `poll` offers the refused version again (monotonic)
        self.latest: str | None = None  # the version `poll` found
        self.served(served)

    def served(self, served: ServedRun) -> None:
        """Note that `served` is now the run answering."""
        self.version, self._config = served.version, served.run_config_sha256
        self._tasks = list(zip(served.tasks, served.data_sha256, strict=True))
        self.failed = self._refused = None

    def poll(self) -> bool:
        """Whether a newer checkpoint of the served run waits to be loaded (one small read)."""
        found = self.latest = checkpoint_version(self.folder)
        if found is None:
            self.failed = (
                f"{self.folder / CHECKPOINT_FILE} is missing; serving the checkpoint loaded before"
            )
            return False
        if found == self.version:
            self.failed = None
            return False
        if found == self._refused and time.monotonic() < self._retry_at:
            return False
        problem = self._other_run()
        if problem:
            self.refuse(problem)
        return problem is None

    def refuse(self, problem: str, retry_seconds: float = math.inf) -> None:
        """Serve on, saying why (`failed`), and keep `poll` from offering the checkpoint found
        last again for `retry_seconds` (a failed load), or at all (another run's)."""
        self.failed, self._refused = problem, self.latest
        self._retry_at = time.monotonic() + retry_seconds

    def _other_run(self) -> str | None:
        """Why the checkpoint now in the folder is not of the served run, or None."""
        try:
            data = load_json(self.folder / CHECKPOINT_FILE)
            config = data["run_config_sha256"]
            tasks = [(t["name"], t["data_sha256"]) for t in data["tasks"]]
        except (ContinualPeftError, KeyError, TypeError):
            return None  # being replaced, or damaged: the load names it
        return self.mismatch(config, tasks)

    def mismatch(self, config: str, tasks: list[tuple[str, str]]) -> str | None:
        """Why a checkpoint of this configuration and these (name, data hash) tasks is not of
        the served run, or None."""
        shared = min(len(tasks), len(self._tasks))
        if config != self._config or tasks[:shared] != self._tasks[:shared]:
            return (
                f"{self.folder} now holds another run (its configuration or its tasks differ "
                "from the run served); restart the server to serve it"
            )
        return None
