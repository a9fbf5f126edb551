"""`predict`, `eval` and `export`: use a trained run without training it."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import typer
from rich.markup import escape

from continual_peft.backbones.placement import set_threads
from continual_peft.cli.base import (
    BATCH_SIZE,
    BUDGET,
    DATA_ROOT,
    DEV_SHARE,
    DEVICE,
    EXCLUDE,
    INFER_DTYPE,
    MAX_TEST,
    MOVED_BACKBONE,
    STDOUT,
    STRICT_LABELS,
    THREADS,
    StreamOptions,
    console,
    errors,
    fail,
    interrupted,
    stop_signals,
)
from continual_peft.engine.evaluation import (
    console_scores,
    evaluate_records,
    evaluate_stream,
    predict_records,
)
from continual_peft.engine.loading import load_learner, saved_config
from continual_peft.engine.state import build_backbone
from continual_peft.errors import ContinualPeftError
from continual_peft.integrations.export_source import FORMATS, SERVER_FORMAT
from continual_peft.integrations.peft_export import export_task
from continual_peft.integrations.vllm_export import export_adapters
from continual_peft.store.digests import task_digest
from continual_peft.store.io import atomic_write_text
from continual_peft.tasks.records import read_records


def export(
    run: Path = typer.Option(..., help="The run directory.", metavar="PATH"),
    task: str = typer.Option(
        None, help="The task to export (peft, merged); vllm exports every task.", metavar="NAME"
    ),
    format_: str = typer.Option(
        "peft",
        "--format",
        help="peft (a task's LoRA or (IA)^3 adapter for peft.PeftModel), merged (a task's "
        "standalone HF model folder) or vllm (every task's LoRA adapter, named by its task, and "
        "the router: for multi-LoRA servers such as vLLM and LoRAX).",
        metavar="TEXT",
    ),
    out: Path = typer.Option(
        ..., help="Folder to write; must not exist yet or be empty.", metavar="PATH"
    ),
    backbone: str = MOVED_BACKBONE,
) -> None:
    """Export one task's module (and head), or every task's LoRA and the router (vllm), for use
    outside continual-peft."""
    try:
        if format_ == SERVER_FORMAT:
            if task is not None:
                raise ContinualPeftError(
                    f"--format {SERVER_FORMAT} exports every task of the run (one adapter each, "
                    "and the router); leave out --task, or give --format peft for one task"
                )
            path = export_adapters(run, out, backbone=backbone)
        else:
            if task is None and format_ in FORMATS:  # an unknown format is named by export_task
                raise ContinualPeftError(
                    f"--format {format_} exports one task: give --task NAME, or --format "
                    f"{SERVER_FORMAT} for every task of the run"
                )
            path = export_task(run, task, format_, out, backbone=backbone)
    except ContinualPeftError as err:
        fail(str(err))
    what = f"task {task}" if task is not None else "every task and the router"
    console.print(f"exported {what} ({format_}) to [bold]{escape(str(path))}[/]", highlight=False)


RUN_HELP = "The run directory."
INPUT_HELP = (
    'JSONL, one object per line: a "text", optionally a "task" (that task\'s module and head, '
    'not the router), and for eval a "label"; or - for standard input.'
)


@stop_signals()
def predict(
    run: Path = typer.Option(..., help=RUN_HELP, metavar="PATH"),
    input_: str = typer.Option(..., "--input", help=INPUT_HELP, metavar="FILE"),
    task: str = typer.Option(
        None,
        help="Predict every input as this task (oracle routing; no router needed).",
        metavar="TEXT",
    ),
    output: Path = typer.Option(
        None, help="Write JSONL here instead of standard output.", metavar="PATH"
    ),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = INFER_DTYPE,
    backbone: str = MOVED_BACKBONE,
    threads: int = THREADS,
) -> None:
    """Predict task and label per input: through the task a line (or --task) names, else
    through the run's router, in batched routed forwards. Writes one JSON object per input:
    task, label, rejected, routing ("given" or "router"), and the router's score and topk."""
    try:
        _check_output(output, run, input_)
        learner, records = _open_run(
            run,
            input_,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            backbone=backbone,
            threads=threads,
        )
        rows = predict_records(learner, records, task)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if output is None or str(output) == "-":
            STDOUT.write(lines)
        else:
            atomic_write_text(output, lines)
    except ContinualPeftError as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        interrupted(err, "nothing was written.")


@stop_signals()
def eval_(
    run: Path = typer.Option(..., help=RUN_HELP, metavar="PATH"),
    stream: Path = typer.Argument(
        None,
        help="A stream spec (TOML) whose tasks the run learned: each task's test set is "
        "scored. Or give --input.",
        metavar="STREAM",
    ),
    input_: str = typer.Option(None, "--input", help=INPUT_HELP, metavar="FILE"),
    task: str = typer.Option(
        None, help="With --input: every line is of this task.", metavar="NAME"
    ),
    data_root: Path = DATA_ROOT,
    max_train: int = typer.Option(
        None,
        help="As the run was given it: the test subset --max-test keeps depends on it too.",
        metavar="N",
    ),
    max_test: int = MAX_TEST,
    exclude: list[str] = EXCLUDE,
    budget: str = BUDGET,
    dev_share: float = DEV_SHARE,
    strict_labels: bool = STRICT_LABELS,
    output: Path = typer.Option(
        None,
        help="Also write the scores here as JSON (fractions); - writes only the JSON, to "
        "standard output.",
        metavar="PATH",
    ),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = INFER_DTYPE,
    backbone: str = MOVED_BACKBONE,
    threads: int = THREADS,
) -> None:
    """Accuracy of a trained run on labelled data, without training: per task, with the task
    given (oracle) and, with a router, routed, plus routing accuracy."""
    try:
        if (stream is None) == (input_ is None):
            which = "both" if stream is not None else "neither"
            raise ContinualPeftError(
                f"got {which}: give what to evaluate on, a stream spec (its tasks' test sets) or "
                '--input FILE (JSONL with "text" and "label" per line)'
            )
        if task is not None and stream is not None:
            raise ContinualPeftError("--task goes with --input; a stream spec names its tasks")
        _check_output(output, run, input_)
        learner, records = _open_run(
            run,
            input_,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            backbone=backbone,
            threads=threads,
        )
        if stream is not None:
            options = StreamOptions(
                data_root=data_root,
                max_train=max_train,
                max_test=max_test,
                exclude=exclude,
                budget=budget,
                dev_share=dev_share,
                strict_labels=strict_labels,
            )
            given = options.load(stream)
            _warn_other_data(learner, given)
            scores = evaluate_stream(learner, given)
        else:
            scores = evaluate_records(learner, records, task)
        if output is not None and str(output) == "-":
            STDOUT.write(json.dumps(scores, indent=2) + "\n")
            return
        console.print(console_scores(scores))
        if output is not None:
            atomic_write_text(output, json.dumps(scores, indent=2) + "\n")
    except ContinualPeftError as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        interrupted(err, "nothing was written.")


def _check_output(output: Path | None, run: Path, input_: str | None) -> None:
    """Refuse an --output that cannot or must not be written, before any model loads."""
    if output is None or str(output) == "-":
        return
    if input_ not in (None, "-") and output.resolve() == Path(input_).resolve():
        raise ContinualPeftError(f"--output {output} is the --input file; write to another file")
    if output.resolve().is_relative_to(run.resolve()):
        raise ContinualPeftError(
            f"--output {output} is inside the run directory {run}, whose files only the run "
            "writes; write somewhere else"
        )
    if output.is_dir():
        raise ContinualPeftError(f"--output {output} is a folder; give a file name")
    if output.exists() and not output.resolve().is_file():
        raise ContinualPeftError(
            f"--output {output} is not a regular file (a device or pipe); for standard output "
            "give --output - (or leave --output out)"
        )
    if not output.resolve().parent.is_dir():
        raise ContinualPeftError(
            f"--output {output}: the folder {output.resolve().parent} does not exist"
        )


def _warn_other_data(learner, stream) -> None:
    """Say which of a stream's tasks are not the data the run learned (other subsets or files):
    their scores are on the data given, not on the run's test sets."""
    differ = [
        t.name
        for t in stream.tasks
        if t.name in learner.learned and task_digest(t) != learner.task_digest(t.name)
    ]
    if differ:
        warnings.warn(
            f"task(s) {differ}: the data given is not what the run learned (another file, or "
            "other --max-train / --max-test / --data-root / --budget / --dev-share / --exclude), "
            "so the scores are not on the run's "
            "test sets; give the run's own stream arguments to reproduce its report",
            UserWarning,
            stacklevel=2,
        )


def _open_run(run, input_, *, batch_size, device, dtype, backbone, threads):
    """The run's learner, ready to predict, and the records of `input_` (read first: a bad
    input is named before any model loads)."""
    if batch_size is not None and batch_size < 1:
        raise ContinualPeftError(f"--batch-size {batch_size}: give a positive number")
    saved = saved_config(run)
    records = read_records(input_) if input_ is not None else []
    saved.backbone.threads = threads or 0
    errors.print(f"torch threads: {set_threads(saved.backbone.threads)}", highlight=False)
    model = None
    if backbone is not None:  # the run's own model, moved: its fingerprint is checked
        place = {"device": device or "", "dtype": dtype or saved.backbone.dtype}
        model = build_backbone(dataclasses.replace(saved.backbone, **place), name=backbone)
    learner = load_learner(run, model, device=device, dtype=dtype, batch_size=batch_size)
    return learner, records
