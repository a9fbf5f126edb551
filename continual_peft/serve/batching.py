"""Dynamic batching: requests that arrive within a short window share one routed forward.

Each request brings a few rows. The `Batcher` keeps a bounded queue of them; one loop takes the
oldest request, waits up to `wait_ms` for more to arrive, and hands up to `max_rows` rows (whole
requests only; a request larger than that is a batch of its own) to `work`, which runs in a
single worker thread, so the model is used by one batch at a time and the event loop keeps
accepting requests meanwhile. Between two batches the loop installs a pending model (`swap`), so
every batch, and every request, is answered by one model only.

A request that would take the queue past `max_queue` rows is refused at once (`Overloaded`,
which the app answers with 503 and a `Retry-After`), never queued. Errors that belong to one
request (`work` returns an exception in its place) reach that request only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Model = TypeVar("Model")


class Overloaded(Exception):
    """The queue is full (or the server is draining).

    Attributes:
        retry_after: Whole seconds after which the queue should have room again.
    """

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(kw_only=True)
class Pending:
    """One request's rows waiting in the queue, and where its answer goes."""

    rows: list[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """How requests are grouped into forwards."""

    wait_ms: float = 5.0  # how long the first request of a batch waits for others (0: never)
    max_rows: int = 64  # most rows in one batch (whole requests; a bigger request goes alone)
    max_queue: int = 1024  # most rows waiting; a request past it is answered 503


Work = Callable[[Any, list[list[Any]]], list[Any]]


class Batcher(Generic[Model]):
    """Groups requests into batches and answers them through `work(model, requests)`.

    Args:
        model: What `work` answers with (a loaded run).
        work: Called in the worker thread with the current model and the batch's requests (each
            a list of rows); returns one answer per request, or an exception instance to raise in
            that request alone.
        settings: The window, batch and queue bounds.
        on_batch: Called after each batch with its row count and seconds (metrics).
    """

    def __init__(
        self,
        model: Model,
        work: Work,
        settings: BatchSettings,
        on_batch: Callable[[int, float], None] = lambda rows, seconds: None,
    ) -> None:
        self.model, self.work, self.settings, self.on_batch = model, work, settings, on_batch
        self.queue: deque[Pending] = deque()
        self.queued_rows = 0
        self.draining = False
        self._pending_model: Model | None = None
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._rows_per_second = 0.0  # recent throughput, for Retry-After

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._arrived = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, rows: list[Any]) -> Any:
        """Queue one request's rows and wait for its answer.

        Raises:
            Overloaded: the queue has no room for `rows`, or the server is draining.
            Exception: whatever `work` returned for this request.
        """
        if self.draining:
            raise Overloaded("the server is shutting down; retry on another instance", 1)
        if self.queued_rows + len(rows) > self.settings.max_queue:
            raise Overloaded(
                f"the queue is full ({self.queued_rows} rows waiting, at most "
                f"{self.settings.max_queue}); retry later",
                self.retry_after(),
            )
        future = asyncio.get_running_loop().create_future()
        pending = Pending(rows=rows, future=future)
        self.queue.append(pending)
        self.queued_rows += len(rows)
        assert self._arrived is not None, "Batcher.start() was not called"
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:  # the client left: its rows leave the queue too
            if pending in self.queue:
                self.queue.remove(pending)
                self.queued_rows -= len(rows)
            raise

    def retry_after(self) -> int:
        """Seconds until the rows queued now should be answered, at the recent rate (>= 1)."""
        if self._rows_per_second <= 0:
            return 1
        return max(1, math.ceil(self.queued_rows / self._rows_per_second))

    def swap(self, model: Model) -> None:
        """Answer with `model` from the next batch on (the batch in flight keeps the old one);
        call it on the event loop's thread."""
        self._pending_model = model
        if self._arrived is not None:
            self._arrived.set()  # an idle loop wakes and installs it at once

    def _install(self) -> None:
        """Put a pending model in place: only ever between two batches."""
        if self._pending_model is not None:
            self.model, self._pending_model = self._pending_model, None

    def stop_waiting(self) -> None:
        """Refuse new requests and stop waiting for more in a batching window: the requests
        queued are answered at once (the first step of a drain)."""
        self.draining = True
        if self._arrived is not None:
            self._arrived.set()

    async def drain(self) -> None:
        """Refuse new requests, answer every queued one, then stop the loop and the worker."""
        self.stop_waiting()
        if self._loop_task is not None:
            await self._loop_task
        self._executor.shutdown(wait=True)

    def _take(self) -> list[Pending]:
        """The oldest requests that fit in one batch (at least one)."""
        batch = [self.queue.popleft()]
        rows = len(batch[0].rows)
        while self.queue and rows + len(self.queue[0].rows) <= self.settings.max_rows:
            rows += len(self.queue[0].rows)
            batch.append(self.queue.popleft())
        self.queued_rows -= rows
        return batch

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            self._install()
            if not self.queue:
                if self.draining:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if not self.draining and self.settings.wait_ms > 0:
                await self._gather(self.queue[0].arrived + self.settings.wait_ms / 1000)
            if not self.queue:  # every request of the window left while it waited
                continue
            self._install()  # between batches: no request sees two models
            batch = [p for p in self._take() if not p.future.done()]  # done: the client left
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[Pending]) -> None:
        """Run one batch in the worker and hand each request its answer; whatever goes wrong
        reaches the batch's requests, never the loop, which goes on with the next batch."""
        started = time.perf_counter()
        try:
            answers = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.work, self.model, [p.rows for p in batch]
            )
        except Exception as err:  # the whole batch failed: every request hears why
            answers = [err] * len(batch)
        seconds = time.perf_counter() - started
        rows = sum(len(p.rows) for p in batch)
        self._rows_per_second = rows / max(seconds, 1e-6)
        self.on_batch(rows, seconds)
        for pending, answer in zip(batch, answers, strict=True):
            if pending.future.done():
                continue
            if isinstance(answer, BaseException):
                pending.future.set_exception(answer)
            else:
                pending.future.set_result(answer)

    async def _gather(self, deadline: float) -> None:
        """Wait until `deadline` (perf_counter seconds) or until a batch's rows are queued."""
        assert self._arrived is not None
        while self.queued_rows < self.settings.max_rows and not self.draining:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except TimeoutError:
                return
