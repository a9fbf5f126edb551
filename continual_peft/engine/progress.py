"""Progress of long work (training, re-evaluation, frozen features, prediction), on stderr.

A caller that knows how much work lies ahead opens a meter (`meter("task 2 animals: training",
total=320, unit="steps")`); the loops inside it (a training step, a batch of evaluation or
prediction) call `tick(n)`, which advances the innermost open meter and does nothing when none is
open, so the loops need not know who is watching. A meter opened inside another is the outer one
(its total already counts the inner work).

How a meter shows depends on `configure(mode)`:

- "auto" (the library's default): a live bar when stderr is a terminal, nothing otherwise;
- "lines": a live bar on a terminal, else one plain line at most every `interval` seconds
  (what a batch job's log file needs: `task 2 animals: training 120/320 steps (38%), loss 0.53,
  45 s elapsed, about 75 s left`); the command line uses it;
- "off": nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MODES = ("auto", "lines", "off")
_settings = {"mode": "auto", "interval": 30.0}
_open: ContextVar[tuple[Meter, ...]] = ContextVar("continual_peft_meter", default=())


def configure(mode: str = "auto", interval: float = 30.0) -> None:
    """How meters show from now on (see the module docstring).

    Args:
        mode: "auto", "lines" or "off".
        interval: Seconds between two plain lines in "lines" mode.
    """
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: use one of {', '.join(MODES)}")
    _settings.update(mode=mode, interval=float(interval))


@dataclass(kw_only=True)
class Meter:
    """An open piece of work: `done` of `total` units, and named fields shown beside it."""

    description: str
    total: int
    unit: str
    done: int = 0
    fields: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=lambda: time.monotonic())
    _bar: Progress | None = None
    _task: int | None = None
    _last_line: float = field(default_factory=lambda: time.monotonic())

    def advance(self, n: int = 1, **fields: float) -> None:
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total), **self._shown())
        elif _settings["mode"] == "lines":
            now = time.monotonic()
            if now - self._last_line >= _settings["interval"]:
                self._last_line = now
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        """One plain progress line: done/total, percent, fields, elapsed and left (seconds)."""
        elapsed = (now or time.monotonic()) - self.started
        share = min(self.done / self.total, 1.0) if self.total else 1.0
        parts = [f"{self.description}: {self.done}/{self.total} {self.unit} ({share:.0%})"]
        parts += [f"{name} {value:.4g}" for name, value in self.fields.items()]
        parts.append(f"{elapsed:.0f} s elapsed")
        if 0 < share < 1:
            parts.append(f"about {elapsed * (1 - share) / share:.0f} s left")
        return ", ".join(parts)

    def _shown(self) -> dict[str, str]:
        text = ", ".join(f"{name} {value:.4f}" for name, value in self.fields.items())
        return {"extra": text}


@contextlib.contextmanager
def meter(description: str, total: int, unit: str = "rows") -> Iterator[Meter]:
    """Open a meter for `total` units of work; `tick` inside advances it.

    Args:
        description: What is being done, e.g. "task 2 animals: training".
        total: Units of work expected (ticks beyond it are counted, shown as 100%).
        unit: Their name, e.g. "steps", "rows".
    """
    if _open.get():
        yield _open.get()[0]
        return
    item = Meter(description=description, total=max(int(total), 0), unit=unit)
    stderr = Console(stderr=True)
    if _settings["mode"] != "off" and stderr.is_terminal:
        item._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} " + unit),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        item._bar.start()
        item._task = item._bar.add_task(description, total=item.total, extra="")
    token = _open.set((item,))
    try:
        yield item
    finally:
        _open.reset(token)
        if item._bar is not None:
            item._bar.stop()


def tick(n: int = 1, **fields: float) -> None:
    """Advance the open meter by `n` units (none open: nothing happens)."""
    meters = _open.get()
    if meters:
        meters[0].advance(n, **fields)
