"""A trained run on new inputs: predictions with the task given or routed, and accuracy on
labelled data (a labelled file or a stream spec's test sets), without training.

Accuracy here is the share of rows whose predicted label string equals the given one (a
fraction; the command line shows percent). Routing accuracy is the share of rows with a known
task that the router sends to that task (top-1), as in the forgetting report.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from continual_peft.engine.progress import meter
from continual_peft.errors import ContinualPeftError
from continual_peft.metrics import normalize_answer

if TYPE_CHECKING:
    from continual_peft.engine.learner import ContinualLearner
    from continual_peft.tasks.streams import Stream
    from continual_peft.tasks.task import Task


def predict_records(
    learner: ContinualLearner, records: list[dict[str, Any]], task: str | None = None
) -> list[dict[str, Any]]:
    """One prediction per record: through its task when one is given (`task`, else the
    record's own "task" field), else through the router.

    Args:
        learner: A learner holding the run's tasks.
        records: Dicts with an input under "text" (or "image"), optionally a "task".
        task: The task of every record (overrides their fields); None to use them.

    Returns:
        Dicts with `task`, `label`, `rejected` and `routing` ("given" or "router"; routed
        rows also carry the router's `score` and `topk`), in the records' order.

    Raises:
        ContinualPeftError: An unknown task, or records without a task on a learner without a
            router (naming the first few lines).
    """
    clash = [i + 1 for i, r in enumerate(records) if task and r.get("task") not in (None, task)]
    if clash:
        raise ContinualPeftError(
            f"record(s) {clash[:5]} name another task than --task {task!r}; leave --task out to "
            "use each line's own, or drop the lines' task fields"
        )
    if task is not None and task not in learner.learned:
        raise ContinualPeftError(
            f"unknown task {task!r} (--task); this run learned {list(learner.learned)}"
        )
    given = [task if task is not None else record.get("task") for record in records]
    unknown = [
        (i + 1, t) for i, t in enumerate(given) if t is not None and t not in learner.learned
    ]
    if unknown:
        where = ", ".join(f"record {i}: {t!r}" for i, t in unknown[:3])
        raise ContinualPeftError(
            f"unknown task ({where}); this run learned {list(learner.learned)}"
        )
    inputs = [record.get("text", record.get("image")) for record in records]
    routed = [i for i, t in enumerate(given) if t is None]
    if routed and learner.router is None:
        lines = ", ".join(str(i + 1) for i in routed[:5])
        raise ContinualPeftError(
            f"record(s) {lines}{' ...' if len(routed) > 5 else ''} name no task, and the run has "
            "no router (router 'oracle') to choose one: give --task NAME, or a \"task\" field "
            "on every line (or train the run with a router, e.g. --router mahalanobis)"
        )
    rows: list[dict[str, Any]] = [{} for _ in records]
    oracle = [i for i, t in enumerate(given) if t is not None]
    if oracle:
        names = [given[i] for i in oracle]
        labels = learner.predict([inputs[i] for i in oracle], task=names)
        for i, name, label in zip(oracle, names, labels, strict=True):
            rows[i] = {"task": name, "label": label, "rejected": False, "routing": "given"}
    if routed:
        for i, row in zip(
            routed, learner.predict_details([inputs[i] for i in routed]), strict=True
        ):
            rows[i] = {**row, "routing": "router"}
    return rows


def evaluate_stream(learner: ContinualLearner, stream: Stream) -> dict[str, Any]:
    """Accuracy of a run on each task's test set of `stream` (see `evaluate_records`).

    Raises:
        ContinualPeftError: A task of the stream that the run did not learn, or whose labels
            differ from the ones it learned.
    """
    unknown = [t.name for t in stream.tasks if t.name not in learner.learned]
    if unknown:
        raise ContinualPeftError(
            f"stream {stream.name!r} has task(s) {unknown} that the run did not learn (it "
            f"learned {list(learner.learned)}); evaluate on the run's own tasks"
        )
    records = []
    for task in stream.tasks:
        learned = learner.learned[task.name].task.labels
        generation = learner.heads.metric(task.name) == "exact_match"  # free-text targets
        if not generation and sorted(task.labels) != sorted(learned):
            raise ContinualPeftError(
                f"task {task.name!r}: the stream's labels {task.labels} differ from the ones the "
                f"run learned {learned}"
            )
        records += [
            {"text": x, "label": task.labels[y], "task": task.name}
            for x, y in zip(task.test_inputs, task.test_labels, strict=True)
        ]
    return evaluate_records(learner, records)


def score_dev(learner: ContinualLearner, tasks: list[Task]) -> dict[str, Any] | None:
    """Score the learned tasks' dev splits (`Task.dev_inputs`) into `learner.dev`, the report's
    "dev" block, which a comparison chooses settings on; None (nothing scored) when no task
    has one.

    Returns:
        {"acc", "routed_acc", "routing_acc": means over the tasks with a dev split (as the
        report's ACC), "tasks": their names, "by_task": {task: {"rows", "oracle_acc",
        "routed_acc", "routing_acc"}}}: fractions, None where not measured.
    """
    with_dev = [task for task in tasks if task.dev_inputs]
    if not with_dev:
        return None
    records = [
        {"text": x, "label": task.labels[y], "task": task.name}
        for task in with_dev
        for x, y in zip(task.dev_inputs, task.dev_labels, strict=True)
    ]
    with meter("scoring the dev splits", len(records)):
        scores = evaluate_records(learner, records)
    means = scores["task_mean"]
    learner.dev = {
        "acc": means["oracle_acc"],
        "routed_acc": means["routed_acc"],
        "routing_acc": means["routing_acc"],
        "tasks": [task.name for task in with_dev],
        "by_task": scores["by_task"],
    }
    return learner.dev


def evaluate_records(
    learner: ContinualLearner, records: list[dict[str, Any]], task: str | None = None
) -> dict[str, Any]:
    """Accuracy on labelled records ("text" and "label" strings, optionally a "task").

    Rows with a known task (`task`, else the record's field) go through that task (oracle
    accuracy); with a router, every row also goes through the router (routed accuracy, and
    routing accuracy over the rows with a known task).

    Returns:
        {"rows", "oracle_acc", "routed_acc", "routing_acc", "by_task": {task: {"rows",
        "oracle_acc", "routed_acc", "routing_acc"}}}: fractions, None where not measured (no
        known task, or no router); "by_task" counts rows with a known task.

    Raises:
        ContinualPeftError: A record without a "label" string, or as `predict_records`.
    """
    missing = [i + 1 for i, r in enumerate(records) if not isinstance(r.get("label"), str)]
    if missing:
        raise ContinualPeftError(
            f'record(s) {missing[:5]} have no "label" string; eval needs a label per line'
        )
    known = [task if task is not None else r.get("task") for r in records]
    truth = [r["label"] for r in records]
    unseen = sorted(
        {
            f"{t}:{y}"
            for t, y in zip(known, truth, strict=True)
            if t in learner.learned
            and y not in learner.learned[t].task.labels
            and learner.heads.metric(t) == "accuracy"  # a generation task's targets are free text
        }
    )
    if unseen:
        warnings.warn(
            f"label(s) the run's tasks never had are scored as wrong: {unseen[:5]} (task:label)",
            UserWarning,
            stacklevel=2,
        )
    rows = {"oracle": [None] * len(records), "routed": [None] * len(records)}
    given = [i for i, t in enumerate(known) if t is not None]
    oracle = predict_records(learner, [records[i] for i in given], task) if given else []
    for i, prediction in zip(given, oracle, strict=True):
        rows["oracle"][i] = prediction
    if learner.router is not None:
        rows["routed"] = predict_records(learner, [{**r, "task": None} for r in records])
    groups = {"all": list(range(len(records)))}
    for i, name in enumerate(known):
        if name is not None:
            groups.setdefault(name, []).append(i)
    same = _matcher(learner)
    summary = {
        name: _scores(rows, truth=truth, known=known, members=members, same=same)
        for name, members in groups.items()
    }
    overall = summary.pop("all")
    keys = ("oracle_acc", "routed_acc", "routing_acc", "rejected")
    task_mean = {
        k: float(np.mean(v))
        if (v := [e[k] for e in summary.values() if e[k] is not None])
        else None
        for k in keys
    }  # the report's ACC: each task counts once, whatever its size
    return {**overall, "task_mean": task_mean, "by_task": summary}


def _matcher(learner: ContinualLearner):
    """`same(row, answer, truth)`: whether an answer is right, by the metric of the task that
    answered it (`row["task"]`): the same label string, or for a generation task the same text
    after `metrics.normalize_answer` (exact match, as in the report)."""

    def same(row: dict, truth: str) -> bool:
        answer, task = row["label"], row["task"]
        if answer is not None and task is not None and learner.heads.metric(task) != "accuracy":
            return normalize_answer(answer) == normalize_answer(truth)
        return answer == truth

    return same


def _scores(
    rows: dict[str, list], *, truth: list[str], known: list, members: list[int], same
) -> dict:
    """Oracle, routed and routing accuracy over the rows `members` (None where unmeasured)."""

    def mean(values: list[bool]) -> float | None:
        return float(np.mean(values)) if values else None

    oracle = [same(rows["oracle"][i], truth[i]) for i in members if rows["oracle"][i]]
    routed = [same(rows["routed"][i], truth[i]) for i in members if rows["routed"][i]]
    routing = [
        rows["routed"][i]["task"] == known[i]
        for i in members
        if rows["routed"][i] and known[i] is not None
    ]
    rejected = [bool(rows["routed"][i].get("rejected")) for i in members if rows["routed"][i]]
    return {
        "rows": len(members),
        "oracle_acc": mean(oracle),
        "routed_acc": mean(routed),  # a rejected row counts wrong
        "routing_acc": mean(routing),
        "rejected": mean(rejected),  # share of routed rows the router turned away
        # the rows each figure counts: oracle and routing only rows that name a task
        "oracle_rows": len(oracle),
        "routed_rows": len(routed),
        "routing_rows": len(routing),
    }


# which count of rows each figure of `_scores` is taken over
COUNTED = {
    "oracle_acc": "oracle_rows",
    "routed_acc": "routed_rows",
    "routing_acc": "routing_rows",
    "rejected": "routed_rows",
}


def console_scores(scores: dict[str, Any]) -> Table:
    """`evaluate_records` / `evaluate_stream` scores as a table, in percent: each task, the mean
    over tasks (as the report's ACC), and all rows pooled."""
    table = Table(title="Accuracy (%) of the trained run on this data", title_justify="left")
    columns = {"oracle ACC": "oracle_acc", "routed ACC": "routed_acc", "routing ACC": "routing_acc"}
    if scores.get("rejected"):  # a router that rejects: the share of rows it turned away
        columns["rejected"] = "rejected"
    for name in ("task", "rows", *columns):
        table.add_column(name, justify="left" if name == "task" else "right")
    keys = tuple(columns.values())
    rows = [*scores["by_task"].items()]
    if scores["by_task"]:
        rows.append(("mean of tasks", {**scores["task_mean"], "rows": len(scores["by_task"])}))
    rows.append(("all rows", scores))
    for name, entry in rows:
        cells = [_cell(entry, k) for k in keys]
        count = f"{entry['rows']} tasks" if name == "mean of tasks" else str(entry["rows"])
        table.add_row(name, count, *cells)
    return table


def _cell(entry: dict[str, Any], key: str) -> str:
    """A figure in percent, with the rows it counts when they are not all the line's rows
    (oracle and routing accuracy count only rows that name a task): `100.0 (1 of 4)`."""
    if entry[key] is None:
        return ""
    counted = entry.get(COUNTED[key])
    part = f" ({counted} of {entry['rows']})" if counted not in (None, entry["rows"]) else ""
    return f"{100 * entry[key]:.1f}{part}"
