"""What must match when a run resumes or is reloaded: hashes of its configuration and of every
task's data, the stream's plan, and the comparison that names a difference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from continual_peft.errors import ContinualPeftError
from continual_peft.tasks.streams import Stream
from continual_peft.tasks.task import Task

# where a run computes, not what it computes: not compared on resume (a run may move devices)
PLACE_KEYS = ("device", "threads")


def without_place(backbone: dict[str, Any]) -> dict[str, Any]:
    """A backbone config dict less `PLACE_KEYS`."""
    return {key: value for key, value in (backbone or {}).items() if key not in PLACE_KEYS}


def run_config_sha256(config: dict) -> str:
    """A hash of a run's configuration as config.json holds it, less where it computed (a run
    may resume on another device): checkpoint.json records it, so an edited config.json is
    named instead of silently changing what a resumed or reloaded run does."""
    data = json.loads(json.dumps(config, default=str))
    if isinstance(data.get("backbone"), dict):
        data["backbone"] = without_place(data["backbone"])
    return config_sha256(data)


def config_sha256(config: dict) -> str:
    """A hash of a config dict (`LearnerConfig.to_dict()`), independent of key order."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(saved: dict, given: dict) -> list[str]:
    """Each dotted key whose value differs, as 'key: A in the run, B here'."""
    flat_saved = _flatten(json.loads(json.dumps(saved, default=str)))
    flat_given = _flatten(json.loads(json.dumps(given, default=str)))
    keys = sorted(set(flat_saved) | set(flat_given))
    return [
        f"{key}: {flat_saved.get(key)!r} in the run, {flat_given.get(key)!r} here"
        for key in keys
        if flat_saved.get(key) != flat_given.get(key)
    ]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def task_digest(task: Task) -> str:
    """A hash of a task's data: name, labels, both splits, its dev split when it has one, and
    the router's inputs when chosen (`router_max_train`; not the default pool, see
    `Task.router_default`), and its kind and template where they are not a plain
    classification's."""
    digest = hashlib.sha256()
    for part in (task.name, task.labels, task.train_labels, task.test_labels):
        digest.update(json.dumps(part, default=str).encode())
    shape = [getattr(task, "kind", "classification"), getattr(task, "template", None)]
    if shape != ["classification", None]:  # a plain classification task hashes its data only
        digest.update(json.dumps(shape).encode())
    router = [] if getattr(task, "router_default", False) else task.router_inputs or []
    dev = getattr(task, "dev_inputs", None) or []
    parts = [task.train_inputs, task.test_inputs, router]
    if dev:  # a task without a dev split hashes as before dev splits existed
        parts += [dev]
        digest.update(json.dumps(task.dev_labels).encode())
    for inputs in parts:
        digest.update(f"|{len(inputs)}|".encode())
        for item in inputs:
            digest.update(_input_bytes(item))
            digest.update(b"\x00")
    return digest.hexdigest()


def _input_bytes(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes()
    if hasattr(item, "tobytes") and hasattr(item, "mode"):  # a PIL image
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    return repr(item).encode()


def stream_plan(stream: Stream) -> dict[str, Any]:
    """The stream's task names and data hashes, in training order."""
    return {
        "name": stream.name,
        "tasks": [task.name for task in stream.tasks],
        "data_sha256": [task_digest(task) for task in stream.tasks],
    }


def check_stream(run: Path, saved: dict | None, stream: Stream, done: list) -> None:
    """Refuse a stream that is not the one the run was learning, naming the first difference.

    Args:
        done: The run's finished tasks (`store.checkpoint.TaskEntry`: name, data_sha256).
    """
    plan = stream_plan(stream)
    if saved is not None and saved["tasks"] != plan["tasks"]:
        raise ContinualPeftError(
            f"{run} was learning the tasks {saved['tasks']} in that order, but the stream given "
            f"has {plan['tasks']}: resume with the same stream spec, order and --max-train/"
            "--max-test as the run, or start a new run."
        )
    for position, entry in enumerate(done):
        if position >= len(plan["tasks"]) or plan["tasks"][position] != entry.name:
            raise ContinualPeftError(
                f"{run}: finished task {position + 1} is {entry.name!r}, but the stream given "
                f"has {plan['tasks'][position] if position < len(plan['tasks']) else 'no task'} "
                "there: resume with the same stream."
            )
        if plan["data_sha256"][position] != entry.data_sha256:
            raise ContinualPeftError(
                f"{run}: task {entry.name!r} has other data than when the run learned it "
                "(its data hash differs): resume with the same data files, --max-train, "
                "--max-test, --router-train, --budget, --dev-share and --strict-labels (and "
                "the same template and kind), or start a new run."
            )
