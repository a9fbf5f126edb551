"""The HTTP API (FastAPI): predictions, OpenAI-format completions, the tasks, health and metrics.

    POST /predict               {"texts": [...], "task": NAME | null, "tasks": [NAME | null, ...]}
                                -> {"predictions": [one object per text, as `predict` writes],
                                    "checkpoint": VERSION}
    POST /v1/completions        OpenAI completions (generative backbones; `serve.openai`)
    POST /v1/chat/completions   OpenAI chat completions (generative backbones)
    GET  /v1/models             "auto" (with a router) and every task
    GET  /tasks                 the tasks served and the checkpoint they come from
    GET  /health                200 while serving, 503 while draining
    GET  /metrics               Prometheus text format (`serve.metrics`)

Every error is OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`): 400 for
a body that is not JSON or asks for what the server does not do, 404 for an unknown task or
model, 413 for a body over the size limit or too many texts, 422 for fields of the wrong shape
(naming the field), 503 with `Retry-After` when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from continual_peft.errors import ContinualPeftError
from continual_peft.serve.batching import Batcher, BatchSettings, Overloaded
from continual_peft.serve.metrics import ServerMetrics
from continual_peft.serve.openai import (
    AUTO,
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    error_body,
    models_response,
)
from continual_peft.serve.served import (
    RequestError,
    Row,
    RunWatcher,
    ServedRun,
    check_unicode,
    load_served,
)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """What the server accepts and how it batches (the `serve` command's options)."""

    batching: BatchSettings = BatchSettings()
    max_texts: int = 256  # most texts (prompts) in one request
    max_body: int = 1 << 20  # most bytes in one request body
    poll_seconds: float = 2.0  # how often the run directory is checked for a newer checkpoint
    retry_failed_seconds: float = 30.0  # a checkpoint that failed to load is tried again after
    device: str | None = None  # where a newer checkpoint loads (as the first one)
    dtype: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        b = self.batching
        checks = [
            ("--batch-wait-ms", b.wait_ms, 0 <= b.wait_ms <= 10_000, "0..10000 milliseconds"),
            ("--max-batch", b.max_rows, b.max_rows >= 1, "a positive number of rows"),
            ("--max-texts", self.max_texts, self.max_texts >= 1, "a positive number"),
            (
                "--max-queue",
                b.max_queue,
                b.max_queue >= max(b.max_rows, self.max_texts),
                f"at least --max-batch and --max-texts ({max(b.max_rows, self.max_texts)})",
            ),
            ("--max-body", self.max_body, self.max_body >= 1024, "at least 1024 bytes"),
            (
                "--poll",
                self.poll_seconds,
                0 < self.poll_seconds <= 3600,
                "more than 0 seconds, at most 3600",
            ),
        ]
        for option, value, ok, wanted in checks:
            if not ok:
                raise ContinualPeftError(f"{option} {value}: give {wanted}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ContinualPeftError(f"--batch-size {self.batch_size}: give a positive number")


class PredictRequest(BaseModel):
    """`POST /predict`: texts, with one task for all, one per text, or none (the router)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr]
    task: StrictStr | None = None
    tasks: list[StrictStr | None] | None = None

    def rows(self) -> list[Row]:
        if self.task is not None and self.tasks is not None:
            raise RequestError("give task (one for all texts) or tasks (one per text), not both")
        if self.tasks is not None and len(self.tasks) != len(self.texts):
            raise RequestError(
                f"tasks has {len(self.tasks)} entries for {len(self.texts)} texts; give one per "
                "text (null: the router chooses)",
                param="tasks",
            )
        tasks = self.tasks if self.tasks is not None else [self.task] * len(self.texts)
        return [Row(text=t, task=k) for t, k in zip(self.texts, tasks, strict=True)]


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413, by its Content-Length before
    any of it is read, else (a chunked body) as soon as the bytes read pass the limit. A body
    within the limit is read whole here and handed on unchanged."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip()
        if encoding.lower() not in ("", "identity"):
            message = f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
            return await _refuse(send, 415, message)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._refuse(send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        queued = iter(messages)

        async def replay() -> dict:
            return next(queued, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        message = (
            f"the request body is over the limit of {self.limit} bytes; send fewer or shorter "
            "texts per request (the server's --max-body)"
        )
        await _refuse(send, 413, message)


async def _refuse(send: Any, status: int, message: str) -> None:
    """Answer a request with an error before the app sees it."""
    response = JSONResponse(error_body(message, "invalid_request_error"), status_code=status)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


class Counted:
    """ASGI middleware: counts every answer by endpoint and status, with its latency; a request
    the app failed on is answered 500 here (and counted), the server staying up."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, answering = time.perf_counter(), 500, False

        async def watched(message: dict) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:  # a forced shutdown (a second Ctrl-C) cut it short
            if not answering:
                status = 503
                with contextlib.suppress(Exception):
                    await _refuse(send, 503, "the server was stopped before it answered; retry")
            raise
        except Exception as err:
            if answering:  # the answer is under way: the connection is all there is to drop
                raise
            await server_error(err)(scope, _no_body, send)
        finally:
            endpoint = scope["path"] if scope["path"] in KNOWN else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)


class Server:
    """The state behind the app: the batcher (holding the served run), the watcher of the run
    directory, the settings and the metrics."""

    def __init__(self, served: ServedRun, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.batcher: Batcher[ServedRun] = Batcher(
            served, _answer, settings.batching, on_batch=self.metrics.batch
        )
        self.watcher = RunWatcher(served)
        self.switches = 0
        self.metrics.tasks.set(len(served.tasks))

    @property
    def served(self) -> ServedRun:
        """The run answering the next batch."""
        return self.batcher.model

    async def watch(self) -> None:
        """Poll the run directory; load a newer checkpoint beside the served one and hand it
        to the batcher, which switches between two batches. A failed load (a checkpoint being
        replaced, a damaged file) keeps the served run and is tried again later."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            if not self.watcher.poll():
                continue
            s = self.settings
            load = functools.partial(
                load_served,
                self.watcher.folder,
                device=s.device,
                dtype=s.dtype,
                batch_size=s.batch_size,
            )
            try:
                served = await loop.run_in_executor(None, load)
            except Exception as err:  # keep serving what is loaded; say why on /tasks
                self.watcher.refuse(f"{type(err).__name__}: {err}", s.retry_failed_seconds)
                continue
            tasks = list(zip(served.tasks, served.data_sha256, strict=True))
            problem = self.watcher.mismatch(served.run_config_sha256, tasks)
            if problem:  # replaced between the check and the load
                self.watcher.refuse(problem)
                continue
            self.watcher.served(served)
            self.batcher.swap(served)
            self.switches += 1
            self.metrics.switches.inc()
            self.metrics.tasks.set(len(served.tasks))

    async def submit(self, rows: list[Row]) -> tuple[list[dict], str]:
        """Answer one request's rows through the batcher: (answers, checkpoint version)."""
        if not rows:
            raise RequestError("no texts given; send at least one", param="texts")
        if len(rows) > self.settings.max_texts:
            raise RequestError(
                f"{len(rows)} texts in one request, at most {self.settings.max_texts}; split it "
                "into several requests (the server's --max-texts)",
                status=413,
            )
        check_unicode(rows)
        empty = [i for i, row in enumerate(rows) if not row.text.strip()]
        if empty:
            raise RequestError(f"text(s) {empty[:10]} are empty; send text to answer", "texts")
        self.served.check(rows)  # against the run served now; checked again when answered
        self.metrics.queue_rows.set(self.batcher.queued_rows + len(rows))
        answers, version = await self.batcher.submit(rows)
        self.metrics.queue_rows.set(self.batcher.queued_rows)
        self.metrics.answered(answers)
        return answers, version


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def answered(server: Server, request: Request, rows: list[Row]) -> tuple[list[dict], str]:
    """`server.submit(rows)`, given up (its rows leave the queue) if the client disconnects
    while it waits, so a client that hung up costs no forward."""
    task = asyncio.ensure_future(server.submit(rows))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_CHECK_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone


DISCONNECT_CHECK_SECONDS = 0.1


def _answer(served: ServedRun, requests: list[list[Row]]) -> list[Any]:
    """The batcher's work: each request's answers with the version that gave them."""
    return [
        answer if isinstance(answer, Exception) else (answer, served.version)
        for answer in served.answer(requests)
    ]


def create_app(served: ServedRun, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving a loaded run (`load_served`), with dynamic batching and pickup of newer
    checkpoints the run directory gets while it serves."""
    server = Server(served, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        watching = asyncio.get_running_loop().create_task(server.watch())
        try:
            yield
        finally:  # uvicorn has answered every open request by now (SIGTERM drains)
            watching.cancel()
            await server.batcher.drain()

    app = FastAPI(title="continual-peft", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=server.settings.max_body)
    app.add_middleware(Counted, metrics=server.metrics)  # outermost: counts every answer

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        code = "model_not_found" if err.param == "model" else None
        body = error_body(str(err), "invalid_request_error", err.param, code)
        return JSONResponse(body, status_code=err.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded) -> JSONResponse:
        return JSONResponse(
            error_body(str(err), "overloaded"),
            status_code=503,
            headers={"Retry-After": str(err.retry_after)},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(
            p.get("type") == "json_invalid" or tuple(p.get("loc", ())) == ("body",)
            for p in problems
        ):
            kind = request.headers.get("content-type", "")
            message = (
                f"the body was sent as {kind or 'no Content-Type'}; send it as JSON with "
                "Content-Type: application/json (curl: -H 'content-type: application/json')"
                if not kind.startswith("application/json")
                else f"the body is not a JSON object; send one, e.g. {_example(request.url.path)}"
            )
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        parts = [
            f"{'.'.join(str(x) for x in p.get('loc', ())[1:]) or 'body'}: {p.get('msg')}"
            for p in problems[:5]
        ]
        return JSONResponse(
            error_body("; ".join(parts), "invalid_request_error", _field(problems)),
            status_code=422,
        )

    @app.exception_handler(ClientGone)
    async def gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": never delivered

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        status = err.status_code
        message = f"{request.method} {request.url.path}: {err.detail}"
        if status == 404:
            message += f"; the endpoints are {', '.join(sorted(KNOWN))}"
        body = error_body(message, "invalid_request_error" if status < 500 else "server_error")
        return JSONResponse(body, status_code=status, headers=getattr(err, "headers", None))

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> dict:
        answers, version = await answered(server, request, body.rows())
        return {"predictions": answers, "checkpoint": version}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict:
        _check_model(server.served, body.model)
        answers, version = await answered(server, request, body.rows())
        return completion_response(body, answers, version)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> dict:
        _check_model(server.served, body.model)
        answers, version = await answered(server, request, body.rows())
        return chat_response(body, answers, version)

    @app.get("/v1/models")
    async def models() -> dict:
        s = server.served
        return models_response(s.tasks, s.routed, s.loaded_at)

    @app.get("/tasks")
    async def tasks() -> dict:
        return {
            **server.served.describe(),
            "switches": server.switches,
            "pickup_failed": server.watcher.failed,
        }

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        s, draining = server.served, server.batcher.draining
        body = {
            "status": "draining" if draining else "ok",
            "tasks": len(s.tasks),
            "checkpoint": s.version,
            "queue_rows": server.batcher.queued_rows,
            "pickup_failed": server.watcher.failed,
        }
        return JSONResponse(body, status_code=503 if draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        server.metrics.queue_rows.set(server.batcher.queued_rows)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


KNOWN = {
    "/predict",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tasks",
    "/health",
    "/metrics",
}


def server_error(err: Exception) -> JSONResponse:
    """The 500 answer to a request the server failed on."""
    message = f"the server failed on this request ({type(err).__name__}: {err})"
    return JSONResponse(error_body(message, "server_error"), status_code=500)


def _check_model(served: ServedRun, model: str) -> None:
    """Refuse the OpenAI endpoints on an encoder run, and a model that is no task."""
    if not served.generative:
        raise RequestError(
            "this run's backbone is an encoder (it classifies, it writes no text): use POST "
            "/predict",
            status=404,
        )
    if model == AUTO and not served.routed:
        raise RequestError(
            f"model 'auto' needs a router and this run has none; name a task: {list(served.tasks)}",
            status=404,
            param="model",
        )
    if model != AUTO and model not in served.tasks:
        raise RequestError(
            f"model {model!r} is not a task of this run; use 'auto' (the router) or one of "
            f"{list(served.tasks)} (GET /v1/models)",
            status=404,
            param="model",
        )


def _example(path: str) -> str:
    """A minimal body for an endpoint, to show in a message."""
    if path == "/v1/completions":
        return '{"model": "auto", "prompt": "a text"}'
    if path == "/v1/chat/completions":
        return '{"model": "auto", "messages": [{"role": "user", "content": "a text"}]}'
    return '{"texts": ["a text"]}'


def _field(problems: list[dict]) -> str | None:
    """The first field a validation error names."""
    for problem in problems:
        loc = [str(x) for x in problem.get("loc", ())[1:]]
        if loc:
            return loc[0]
    return None
