"""Run the server: bind the port, load the run, serve with uvicorn until a signal, drain.

The port is bound before the run loads, so a port in use is named at once. SIGTERM (or
Ctrl-C) stops accepting connections, answers every request already received (uvicorn waits for
them, then the batcher answers what is queued) and returns normally: the command exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn
import uvicorn.config

from continual_peft.errors import ContinualPeftError
from continual_peft.serve.app import ServeSettings, create_app
from continual_peft.serve.batching import Batcher
from continual_peft.serve.served import ServedRun, load_served

LOOPBACK = "127.0.0.1"


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, when it starts shutting down, also cuts short the batching window
    of the requests already received (they are answered at once, not after the window)."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.batcher.stop_waiting()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one).

    Raises:
        ContinualPeftError: the port is in use or the address cannot be bound, naming the fix.
    """
    if not 0 <= port <= 65535:
        raise ContinualPeftError(f"--port {port}: give a port in 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ContinualPeftError(f"--host {host!r} is no address here ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ContinualPeftError(
                f"port {port} on {host} is in use (another server?); give another --port, or "
                "--port 0 for any free one"
            ) from err
        raise ContinualPeftError(f"cannot listen on {host}:{port} ({err.strerror})") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    run: str | Path,
    settings: ServeSettings,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    log_level: str = "info",
    ready: Callable[[ServedRun, str], None] = lambda served, url: None,
) -> None:
    """Serve a run directory until SIGTERM or Ctrl-C (see `serve.app` for the endpoints).

    Args:
        run: The run directory; a run another process is still learning is served as its last
            checkpoint has it, and newer checkpoints are picked up while serving.
        settings: Batching, limits, polling, and where the model computes.
        host, port: Where to listen (loopback unless told otherwise; port 0: any free one).
        log_level: uvicorn's log level (critical, error, warning, info, debug, trace).
        ready: Called once the run is loaded, with it and the server's URL.

    Raises:
        ContinualPeftError: a port in use, a run with no finished task, a damaged run (naming
            the file and the repair), an image backbone.
    """
    log_level = log_level.lower()
    if log_level not in uvicorn.config.LOG_LEVELS:
        raise ContinualPeftError(
            f"--log-level {log_level!r}: choose one of {', '.join(uvicorn.config.LOG_LEVELS)}"
        )
    sock = bind(host, port)
    try:
        served = load_served(
            run, device=settings.device, dtype=settings.dtype, batch_size=settings.batch_size
        )
        bound_host, bound_port = sock.getsockname()[:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6
        url = f"http://{bound_host}:{bound_port}"
        ready(served, url)
        app = create_app(served, settings)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None)
        stopped: list[int] = []
        # uvicorn drains on SIGTERM/SIGINT, then raises the signal again under the handlers it
        # found: these note it, so a drained server returns (exit 0) instead of dying by it
        previous = {
            s: signal.signal(s, lambda number, frame: stopped.append(number))
            for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            asyncio.run(DrainingServer(config, app.state.server.batcher).serve(sockets=[sock]))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        sock.close()
