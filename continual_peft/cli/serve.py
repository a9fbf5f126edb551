"""`serve`: answer requests over HTTP with a run's router and modules (the `serve` extra)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from continual_peft.backbones.placement import set_threads
from continual_peft.cli.base import BATCH_SIZE, DEVICE, INFER_DTYPE, THREADS, errors, fail
from continual_peft.errors import ContinualPeftError

EXTRA = (
    "serve needs the serve extra (FastAPI, uvicorn, prometheus_client): "
    "pip install 'continual-peft[serve]'"
)


def serve(
    run: Path = typer.Argument(..., help="The run directory to serve.", metavar="RUN"),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (0.0.0.0: every interface).", metavar="HOST"
    ),
    port: int = typer.Option(8000, help="Port to listen on (0: any free one).", metavar="N"),
    batch_wait_ms: float = typer.Option(
        5.0,
        help="How long a request waits for others to share its forward (0: no waiting).",
        metavar="MS",
    ),
    max_batch: int = typer.Option(64, help="Most rows in one routed forward.", metavar="N"),
    max_queue: int = typer.Option(
        1024, help="Most rows waiting; past it requests are answered 503.", metavar="N"
    ),
    max_texts: int = typer.Option(256, help="Most texts in one request.", metavar="N"),
    max_body: int = typer.Option(1 << 20, help="Most bytes in one request body.", metavar="BYTES"),
    poll: float = typer.Option(
        2.0, help="Seconds between checks of the run directory for new tasks.", metavar="S"
    ),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = INFER_DTYPE,
    threads: int = THREADS,
    log_level: str = typer.Option("info", help="uvicorn's log level.", metavar="LEVEL"),
) -> None:
    """Serve a run over HTTP: POST /predict, OpenAI /v1/completions and /v1/chat/completions
    (generative backbones), GET /tasks, /health and /metrics. Requests arriving together share
    one routed forward; tasks a running `run` adds to RUN are picked up without a restart.
    SIGTERM answers the requests in flight, then exits 0."""
    try:
        from continual_peft.serve.app import ServeSettings
        from continual_peft.serve.batching import BatchSettings
        from continual_peft.serve.server import serve as serve_run
    except ImportError as err:
        fail(f"{EXTRA} ({err})")
    try:
        settings = ServeSettings(
            batching=BatchSettings(wait_ms=batch_wait_ms, max_rows=max_batch, max_queue=max_queue),
            max_texts=max_texts,
            max_body=max_body,
            poll_seconds=poll,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
        errors.print(f"torch threads: {set_threads(threads or 0)}", highlight=False)
        serve_run(run, settings, host=host, port=port, log_level=log_level, ready=_ready)
    except ContinualPeftError as err:
        fail(str(err))


def _ready(served, url: str) -> None:
    state = served.status
    if state != "finished":
        state += ": new tasks are picked up"
    errors.print(
        f"serving {len(served.tasks)} task(s) of [bold]{escape(str(served.folder))}[/] "
        f"({state}) at {url}",
        highlight=False,
        soft_wrap=True,
    )
