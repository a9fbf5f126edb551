"""What every command shares: the typer app, the consoles (stdout that survives a closed pipe,
errors on stderr), error and signal handling, and the options several commands take."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from continual_peft._version import __version__
from continual_peft.distributed import World, launched_size, world
from continual_peft.engine import progress
from continual_peft.errors import Terminated
from continual_peft.tasks.streams import Stream, load_stream

# An argument's help line names its value (STREAM, RUN) and says what it is; typer would add a
# raw type tag ("<path>") that options do not show once they have a metavar.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


# options whose one value is a list (written with commas): given twice, the user means both
# lists, which click would settle silently by keeping the last; other options keep click's (and
# argparse's) convention that the last one given wins, so scripts can append an override
# (`--order` and `--exclude` are options of several values: repeating them adds to them)
LIST_OPTIONS = ("--sweep", "--strategies", "--seeds")


class OnceGroup(typer.core.TyperGroup):
    """The command group: refuses a list option given more than once (`--sweep a --sweep b`)."""

    def resolve_command(self, ctx, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            given_once(command, rest)
        return name, command, rest


def given_once(command, args: list[str]) -> None:
    """Refuse (exit 2) a `LIST_OPTIONS` option of `command` that appears twice in `args` (up
    to a `--`), naming both values and how to give several."""
    options = {
        name: option
        for option in command.params
        if option.param_type_name == "option" and option.opts[0] in LIST_OPTIONS
        for name in option.opts
    }
    seen: dict[str, list[str]] = {}
    tokens = iter(args)
    for token in map(str, tokens):  # (a caller in Python may pass paths)
        if token == "--":
            break
        name, has_value, value = token.partition("=")
        if name in options:
            seen.setdefault(name, []).append(value if has_value else str(next(tokens, "")))
    for name, values in seen.items():
        if len(values) > 1:
            how = (
                "one sweep runs per command: sweep one key, or list the other setting's "
                "values as --strategies entries (spec files)"
                if name == "--sweep"
                else f"join the values with commas in one {name}"
            )
            fail(
                f"{name} is given {len(values)} times ({', '.join(map(repr, values))}); the "
                f"command would silently keep the last: {how}"
            )


app = typer.Typer(
    help="Continual learning with per-task PEFT modules on a frozen backbone.",
    add_completion=False,
    rich_markup_mode=None,
    cls=OnceGroup,
)
errors = Console(stderr=True)


class Stdout:
    """Standard output that outlives its reader (a `| head`, a `tee` or logger that died): the
    first write that finds the pipe closed says so once on stderr, and the work goes on (a run
    keeps training and writing its run directory) with its tables going nowhere."""

    broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except BrokenPipeError:
                self.broken = True
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                errors.print(
                    "warning: standard output was closed (its reader exited); the command goes "
                    "on, and its files are written as usual",
                    highlight=False,
                    soft_wrap=True,
                )
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self.write("")

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()


STDOUT = Stdout()
console = Console(file=STDOUT)
DTYPE_HELP = (
    "Frozen weights' dtype: auto (bfloat16 on a CUDA device that supports it, float32 on the CPU), "
    "bfloat16, float16 or float32. Trainable slot and head stay float32 (docs/devices.md)."
)
MAX_SLOTS = typer.Option(
    None,
    help="A slot budget for strategy per_task: at most N slots; a task that would open slot N+1 "
    "first merges the two most similar slots (docs/strategies.md#a-slot-budget-max_slots). "
    "Default: no budget.",
    metavar="N",
)
QUANTIZE = typer.Option(
    None,
    help="Store the frozen linear weights in 8 bits (LLM.int8) or 4 bits (NF4 with double "
    "quantization, QLoRA's) through bitsandbytes: none, 8bit or 4bit. Needs the [quant] extra; "
    "slots and heads train in full precision (docs/devices.md). Default: none.",
    metavar="BITS",
)
MOVED_BACKBONE_HELP = (
    "The run's backbone from another folder (a moved model); it must be the same model: its "
    "fingerprint is checked. Default: the folder the run recorded."
)
DEVICE_HELP = "Device, e.g. cpu, cuda, cuda:1. Default: CUDA when present, else CPU."
THREADS_HELP = (
    "CPU threads for torch. Default 0 = auto: torch's own count (it follows OMP_NUM_THREADS), "
    "lowered to the CPUs this process may use (affinity, cgroup quota)."
)
PACKAGE = Path(__file__).resolve().parents[1]
DATA_ROOT = typer.Option(
    None, help="Folder the stream's task paths are relative to.", metavar="PATH"
)
MAX_TRAIN = typer.Option(None, help="Training examples per task (seeded subset).", metavar="N")
MAX_TEST = typer.Option(None, help="Test examples per task (seeded subset).", metavar="N")
EXCLUDE = typer.Option(
    None,
    help="Leave these tasks of the spec out (not read; dropped from every order): names joined "
    "by commas, or the option repeated, e.g. a task whose data you lack: --exclude yahoo.",
    metavar="TEXT",
)
BUDGET = typer.Option(
    None,
    help="A named budget of the spec ([budgets.<name>]: per-task examples and epochs), e.g. "
    "--budget cpu; the other options still override it. Default: the spec's own.",
    metavar="NAME",
)
DEV_SHARE = typer.Option(
    None,
    help="Carve a dev split of this share (0 < share < 1) from each task's training data: "
    "seeded, stratified by label, never the test set. compare --sweep chooses on it (0.1 when "
    "neither this nor the spec sets one).",
    metavar="SHARE",
)
STRICT_LABELS = typer.Option(
    False,
    "--strict-labels",
    help="Refuse records whose label is not one of their task's labels (default: leave them "
    "out, counted per split in the task's record and warned about).",
)
DEVICE = typer.Option(None, help=DEVICE_HELP, metavar="DEVICE")
THREADS = typer.Option(None, help=THREADS_HELP, metavar="N")
# options predict and eval share
BATCH_SIZE = typer.Option(
    None, help="Inputs per forward pass. Default: the run's eval_batch_size.", metavar="N"
)
INFER_DTYPE = typer.Option(
    None,
    help="Frozen weights' dtype to compute in (auto, bfloat16, float16, float32). Default: the "
    "one the run computed in (bfloat16 for a GPU run: pass float32 on a CPU).",
    metavar="DTYPE",
)
MOVED_BACKBONE = typer.Option(None, help=MOVED_BACKBONE_HELP, metavar="PATH")


def main(
    ctx: typer.Context,
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the version and exit.",
        is_eager=True,
        callback=lambda given: show_version(given),
    ),
) -> None:
    """Continual learning with per-task PEFT modules on a frozen backbone.

    Paths given on the command line are relative to the current directory; paths inside a
    stream spec are relative to the spec's folder (or --data-root). Shipped strategy and stream
    names (`list strategies`, `list streams`) are found wherever you stand.
    """
    warnings.formatwarning = format_warning
    progress.configure("lines")  # a live bar on a terminal, a line every 30 s in a log file
    command, writer = ctx.invoked_subcommand, os.environ.get("RANK", "0").strip() in ("0", "")
    if not writer:  # under torchrun the other ranks do the same work: rank 0 reports it
        progress.configure("off")
        warnings.simplefilter("ignore")
    if launched_size() > 1 and command not in (None, "run"):
        if not writer:
            raise typer.Exit(2)
        fail(
            f"`{command}` does not run under torchrun ({launched_size()} processes): only `run` "
            f"is data-parallel. Run `continual-peft {command} ...` as one plain process."
        )


def show_version(given: bool) -> None:
    if given:
        console.print(f"continual-peft {__version__}", highlight=False)
        raise typer.Exit()


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one `warning:` line (on stderr, as errors are: a log file reads alike);
    another library's names its kind and place."""
    text = str(message)
    if not Path(filename).resolve().is_relative_to(PACKAGE) and category is not UserWarning:
        text = f"{text} ({category.__name__}, {Path(filename).name}:{lineno})"
    return f"warning: {text}\n"


@dataclass(kw_only=True)
class StreamOptions:
    """The options every command that reads a stream spec shares."""

    data_root: Path | None = None
    max_train: int | None = None
    max_test: int | None = None
    router_train: int | None = None
    exclude: list[str] | None = None
    budget: str | None = None
    dev_share: float | None = None
    dev_needed: bool = False
    strict_labels: bool = False

    def load(self, spec: Path | None) -> Stream:
        """The stream the options ask for (`tasks.streams.load_stream`)."""
        return load_stream(
            spec,
            self.data_root,
            self.max_train,
            self.max_test,
            router_max_train=self.router_train,
            dev_share=self.dev_share,
            dev_needed=self.dev_needed,
            unknown_labels="refuse" if self.strict_labels else None,
            exclude=[
                name.strip()
                for value in self.exclude or []
                for name in value.split(",")
                if name.strip()
            ],
            budget=self.budget,
        )


def fail(message: str, code: int = 2) -> None:
    # escape: "[train]" in a message is a spec table, not rich markup. soft_wrap: never break a
    # file:line path at the console width when stderr is piped.
    here = world()
    rank = f"[rank {here.rank}] " if here.size > 1 else ""  # under torchrun: who says it
    errors.print(f"[bold red]error:[/] {escape(rank + message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def ranks(here: World) -> str:
    """ ", in each of N processes (torchrun)" when there are several, for a status line."""
    return f", in each of {here.size} processes (torchrun)" if here.size > 1 else ""


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While a command works, SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt), so
    a scheduler's kill stops a run as cleanly as Ctrl-C."""

    def stop(signum: int, frame: object) -> None:
        for sig in previous:  # a second signal must not cut the clean stop short
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError):  # signals work in the main thread only
                previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(err: KeyboardInterrupt, kept: str) -> None:
    """Ctrl-C: exit 130; a termination signal: exit 128 + its number, the signal named."""
    if isinstance(err, Terminated):
        why = "a termination signal"
        if world().size > 1:  # torchrun's way to stop every process once one has failed
            why += "; under torchrun, also how the others stop when one process fails: look above"
        fail(f"stopped by {err} ({why}); {kept}", code=128 + err.signum)
    fail(f"interrupted; {kept}", code=130)
