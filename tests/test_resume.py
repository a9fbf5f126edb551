"""Nothing lost: `run --resume` after a kill -9 at any moment ends exactly where an uninterrupted
run ends; one writer per run directory; Ctrl-C leaves a resumable run.

A killed run is a child process (`continual-peft run` on the tiny backbone, see `start_run`)
that sends itself SIGKILL at a chosen point: mid-training, mid-evaluation, between the files of
a checkpoint, halfway through an atomic write; one more is killed from outside at a moment picked
by watching the run directory. `arm` patches the library in the child only; the library itself
has no fault-injection hook. Resumes run in-process through the CLI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from helpers import load_tokenizer, tiny_backbone, word_task, write_stream
from typer.testing import CliRunner

from continual_peft import cli
from continual_peft.cli import app
from continual_peft.engine import learner as learner_module
from continual_peft.engine.loading import load_learner, saved_config
from continual_peft.engine.prediction import Predictor
from continual_peft.errors import ContinualPeftError, CorruptFileError
from continual_peft.experiments import launch
from continual_peft.experiments.runner import run_stream
from continual_peft.store import io as store_io
from continual_peft.store.io import load_safetensors
from continual_peft.store.lock import RunLock
from continual_peft.tasks.streams import load_stream

NAMES = ["colors", "animals", "moods"]
OPTIONS = ["--strategy", "replay", "--router", "mahalanobis", "--baseline", "seq", "--epochs", "2"]
OPTIONS += ["--batch-size", "8", "--lr", "0.01", "--rank", "2", "--max-length", "16"]


def arm(kill_at: str, run: Path, sig: signal.Signals) -> None:
    """Patch the library (in the killed process only) so that it sends itself `sig` where
    `kill_at` says: "train:<task>:<step>", "evaluate:<task>", "wrote:<path>" (after that file's
    atomic write) or "tmp:<path>" (halfway through writing it); "#<n>" = the n-th time."""
    event, _, rest = kill_at.partition(":")
    rest, _, nth = rest.partition("#")
    nth, seen = int(nth or 1), [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == nth

    def die() -> None:
        os.kill(os.getpid(), sig)

    if event == "train":
        task, step = rest.rsplit(":", 1)
        train_task = learner_module.train_task

        def train(*args, description="", adjust_loss=None, **kwargs):
            count = [0]
            armed = description.endswith(" " + task) and hit()

            def adjust(loss):
                count[0] += 1
                if armed and count[0] == int(step):
                    die()
                return adjust_loss(loss)

            return train_task(*args, description=description, adjust_loss=adjust, **kwargs)

        learner_module.train_task = train
    elif event == "evaluate":
        evaluate = Predictor.evaluate

        def evaluate_then_die(self, router, items, rows=None):
            if list(self.learned)[-1] == rest and hit():
                self.accuracy(next(iter(self.learned.values())))
                die()
            return evaluate(self, router, items, rows)

        Predictor.evaluate = evaluate_then_die
    elif event in ("wrote", "tmp"):
        write = store_io.atomic_write_bytes

        def write_then_die(path, data):
            matches = os.path.abspath(path) == str(run / rest) and hit()
            if matches and event == "tmp":
                tmp = Path(path).parent / f".{Path(path).name}.x.tmp"
                tmp.write_bytes(data[: len(data) // 2])
                die()
            write(path, data)
            if matches:
                die()

        store_io.atomic_write_bytes = write_then_die


def start_run(spec: Path, run: Path, kill_at: str = "", sig=signal.SIGKILL) -> int:
    """`continual-peft run` on the tiny backbone in a child process, armed (`arm`) to send
    itself `sig` at `kill_at`; returns its pid. The child is a fork of this process, its
    imports done (a new interpreter spends seconds importing torch); its standard error goes
    to `run.parent / "stderr.txt"`, and it ends with os._exit, never returning here."""
    err = run.parent / "stderr.txt"
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sys.stdout, sys.stderr = open(os.devnull, "w"), open(err, "w", buffering=1)  # noqa: SIM115
        os.dup2(sys.stdout.fileno(), 1)
        os.dup2(sys.stderr.fileno(), 2)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer threads after a fork
        make = functools.partial(tiny_backbone, load_tokenizer(), 16)
        launch.run_stream = functools.partial(run_stream, make_backbone=make)
        arm(kill_at, run.absolute(), sig)
        cli.app(["run", str(spec), "--out", str(run), *OPTIONS], prog_name="continual-peft")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def ended(pid: int, timeout: float = 120) -> int:
    """The child's exit code once it ends (-N when signal N killed it); killed after `timeout`."""
    deadline = time.monotonic() + timeout
    while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the run did not end in {timeout} s")
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(status[1])


runner = CliRunner()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    tasks = [word_task(name, n_train=24, n_test=12) for name in NAMES]
    return write_stream(tmp_path_factory.mktemp("stream"), tasks, labels_files=False)


@pytest.fixture
def tiny_cli(monkeypatch, make_backbone):
    monkeypatch.setattr(
        launch,
        "run_stream",
        functools.partial(run_stream, make_backbone=lambda: make_backbone(16)),
    )


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def outcome(run: Path) -> dict:
    """Everything a resumed run must reproduce exactly: matrices, metrics, per-task facts."""
    result = {}
    for name in ("", "baseline-seq"):
        report = json.loads((run / name / "report.json").read_text(encoding="utf-8"))
        tasks = [
            {k: v for k, v in t.items() if not k.endswith("_seconds")} for t in report["tasks"]
        ]
        keys = ("status", "task_names", "accuracy_matrix", "initial_accuracy", "metrics")
        result[name] = {**{k: report[k] for k in keys}, "tasks": tasks}
        result[name]["routing"] = report["routing_accuracy"]
        result[name]["baseline"] = report["baseline"] and report["baseline"]["accuracy_matrix"]
    return result


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return outcome(reference_run)


@pytest.fixture(scope="module")
def reference_run(spec, tmp_path_factory, make_backbone_module) -> Path:
    """An uninterrupted, finished run (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            launch,
            "run_stream",
            functools.partial(run_stream, make_backbone=make_backbone_module),
        )
        result = invoke("run", spec, "--out", run, *OPTIONS)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def make_backbone_module(tokenizer):
    return lambda: tiny_backbone(tokenizer, max_length=16)


def killed_run(spec: Path, run: Path, kill_at: str, sig=signal.SIGKILL) -> str:
    """The run, sending itself `sig` at `kill_at` (SIGKILL dies at once, SIGTERM stops
    cleanly); returns its standard error."""
    code = ended(start_run(spec, run, kill_at, sig))
    err = (run.parent / "stderr.txt").read_text(encoding="utf-8")
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), (code, err)
    return err


def checkpoint(run: Path) -> dict | None:
    path = run / "checkpoint.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def resume(run: Path, spec: Path, *extra) -> None:
    with pytest.warns(UserWarning, match="taking over a stale lock left by process"):
        result = invoke("run", spec, "--resume", run, *OPTIONS, *extra)
    assert result.exit_code == 0, result.output
    assert not (run / ".lock").exists()


@pytest.mark.parametrize(
    ("kill_at", "done_before"),
    [
        ("train:animals:3", 1),  # mid-training of task 2
        ("evaluate:animals", 1),  # mid-evaluation of task 2
        ("wrote:tasks/animals/head.safetensors", 1),  # mid-checkpoint: slot and head written
        ("tmp:checkpoint.json#2", 1),  # halfway through writing task 2's checkpoint.json
        ("train:moods:2#2", None),  # mid-training of the baseline's task 3
    ],
)
def test_kill_then_resume_ends_as_an_uninterrupted_run(
    spec, tmp_path, reference, tiny_cli, kill_at, done_before
):
    run = tmp_path / "run"
    killed_run(spec, run, kill_at)
    assert (run / ".lock").exists()  # left behind by the killed process
    if done_before is not None:
        assert checkpoint(run)["tasks_done"] == done_before
    if kill_at.startswith("wrote:tasks/animals"):
        # a file the checkpoint does not name is ignored, even truncated, and written again
        module = run / "tasks" / "animals" / "module.safetensors"
        module.write_bytes(module.read_bytes()[:100])
    resume(run, spec)
    assert outcome(run) == reference
    assert not list(run.rglob("*.tmp"))
    load_safetensors(run / "tasks" / "animals" / "module.safetensors")  # rewritten whole


def signal_after_first_checkpoint(spec: Path, run: Path, sig: int) -> tuple[int, str]:
    """Start `continual-peft run` in a child process and send it `sig` from outside right after
    its first checkpoint appears; returns its exit code and standard error."""
    pid, err = start_run(spec, run), run.parent / "stderr.txt"
    deadline = time.monotonic() + 120
    while checkpoint(run) is None:
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), err.read_text(encoding="utf-8")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    os.kill(pid, sig)
    return ended(pid), err.read_text(encoding="utf-8")


def test_kill_from_outside_then_resume(spec, tmp_path, reference, tiny_cli):
    run = tmp_path / "run"
    signal_after_first_checkpoint(spec, run, signal.SIGKILL)
    resume(run, spec)
    assert outcome(run) == reference


def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes(spec, tmp_path, reference, tiny_cli):
    """A scheduler's SIGTERM: a message, exit 143, status interrupted, the lock released."""
    run = tmp_path / "run"
    code, err = signal_after_first_checkpoint(spec, run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not (run / ".lock").exists()
    assert json.loads((run / "report.json").read_text(encoding="utf-8"))["status"] == "interrupted"
    result = invoke("run", spec, "--resume", run, *OPTIONS)  # no stale lock to take over
    assert result.exit_code == 0, result.output
    assert outcome(run) == reference


def test_sigterm_in_the_first_task_leaves_a_clean_stop(spec, tmp_path, tiny_cli):
    """Nothing finished yet: the reports of zero tasks are written, the signal is named."""
    run = tmp_path / "run"
    err = killed_run(spec, run, f"train:{NAMES[0]}:2", signal.SIGTERM)
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not (run / ".lock").exists()
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "interrupted" and report["task_names"] == []


def test_resume_of_a_finished_run_does_nothing(spec, tmp_path, make_backbone, tiny_cli):
    run = tmp_path / "run"
    options = ["--epochs", "1", "--max-train", "8", "--max-test", "4", "--baseline", "none"]
    assert invoke("run", spec, "--out", run, *options).exit_code == 0

    def snapshot():
        return {
            p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in run.rglob("*")
            if p.is_file()
        }

    before = snapshot()
    result = invoke("run", spec, "--resume", run, *options)
    assert result.exit_code == 0, result.output
    assert "is finished: nothing to do" in result.stdout
    assert snapshot() == before
    # the library says the same, and returns the finished learner
    config, stream = saved_config(run), load_stream(spec, max_train=8, max_test=4)
    learner = run_stream(stream, config, run, resume=True, make_backbone=lambda: make_backbone(16))
    assert learner.status == "finished" and list(learner.learned) == NAMES
    assert snapshot() == before


def _flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        # the newest two checkpoints are kept whole: both name animals' head, so the run
        # starts again (damage to the newest task alone rolls back one task: the next case)
        (
            lambda run: (run / "tasks/animals/head.safetensors").unlink(),
            [
                "tasks/animals/head.safetensors is missing",
                "resumes from the start",
                "re-training 3 task(s): colors, animals, moods",
            ],
        ),
        # replay trains one shared slot: moods holds it now, animals' copy the one before
        (
            lambda run: _flip_last_byte(run / "tasks/moods/module.safetensors"),
            ["moods/module.safetensors was altered", "after task 2 (animals)", "1 task(s): moods"],
        ),
        (
            lambda run: shutil.rmtree(run / "tasks/colors"),
            ["tasks/colors/head.safetensors is missing", "resumes from the start", "3 task(s)"],
        ),
        (
            lambda run: (run / "checkpoint.json").write_text("{", encoding="utf-8"),
            ["checkpoint.json is corrupt or truncated", "after task 3 (moods)", "no task to"],
        ),
        (lambda run: (run / "checkpoint.json").unlink(), ["checkpoint.json is missing"]),
        (
            lambda run: (run / "baseline-seq/tasks/animals/head.safetensors").unlink(),
            ["baseline-seq/tasks/animals/head.safetensors is missing", "from the start"],
        ),
    ],
    ids=[
        "missing-older-head",
        "altered-shared-slot",
        "missing-first-task",
        "damaged-checkpoint",
        "missing-checkpoint",
        "baseline-file",
    ],
)
def test_resume_repairs_a_run_that_lost_or_damaged_a_file(
    spec, tmp_path, reference, reference_run, tiny_cli, make_backbone, damage, said
):
    """Lost work is re-trained from the newest task whose files are intact, and the run ends
    exactly as the uninterrupted one; readers meanwhile name the file and the repair."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    damage(run)
    reader = run / "baseline-seq" if said[0].startswith("baseline") else run
    with pytest.raises(CorruptFileError, match=f"{said[0]}.*--resume {reader}`"):
        load_learner(reader, make_backbone(16))
    result = invoke("run", spec, "--resume", run, *OPTIONS)
    assert result.exit_code == 0, result.output
    told = " ".join(result.stdout.split())
    assert all(text in told for text in said), told
    assert outcome(run) == reference
    assert list(load_learner(reader, make_backbone(16)).learned) == NAMES


def test_ctrl_c_leaves_a_resumable_run_that_resumes_only_as_it_was(
    spec, tmp_path, reference, tiny_cli, monkeypatch
):
    import continual_peft.engine.learner as learner_module

    train_task = learner_module.train_task

    def interrupted(*args, description="", **kwargs):
        if description.endswith(" moods"):
            raise KeyboardInterrupt
        return train_task(*args, description=description, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(learner_module, "train_task", interrupted)
        result = invoke("run", spec, "--out", run, *OPTIONS)
    assert result.exit_code == 130, result.output
    assert "continue with --resume" in result.stderr
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "interrupted" and report["task_names"] == NAMES[:2]
    assert checkpoint(run)["tasks_done"] == 2 and not (run / ".lock").exists()

    result = invoke("run", spec, "--resume", run, *OPTIONS, "--epochs", "3")
    assert result.exit_code == 2
    assert "train.epochs: 2 in the run, 3 here" in result.stderr
    result = invoke("run", spec, "--resume", run, *OPTIONS, "--max-test", "5")
    assert result.exit_code == 2
    assert "task 'colors' has other data than when the run learned it" in result.stderr
    result = invoke("run", spec, "--resume", tmp_path / "nowhere", *OPTIONS)
    assert result.exit_code == 2 and "not a run directory" in result.stderr
    assert not (run / ".lock").exists() and checkpoint(run)["status"] == "interrupted"

    result = invoke("run", spec, "--resume", run, *OPTIONS)
    assert result.exit_code == 0, result.output
    assert outcome(run) == reference


# ---------------------------------------------------------------- the lock


def test_a_live_writer_is_refused(spec, tmp_path, tiny_cli):
    run = tmp_path / "run"
    run.mkdir()
    held = RunLock(run)  # this process, alive: as if another process were writing the run
    host = socket.gethostname()
    config = {"config": saved_config_dict(), "backbone": {}}
    for args in (["--out", run], ["--resume", run]):  # a new run there, or resuming it
        result = invoke("run", spec, *args, *OPTIONS)
        assert result.exit_code == 2, result.output
        assert f"is being written by process {os.getpid()} on {host} since" in result.stderr
        assert "wait for it to finish" in result.stderr
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    held.release()
    assert not (run / ".lock").exists()
    held.release()  # idempotent


def saved_config_dict() -> dict:
    from continual_peft import LearnerConfig

    return LearnerConfig().to_dict()


def test_lock_of_another_host_names_the_file_to_delete(tmp_path):
    info = {"pid": 1, "host": "elsewhere", "started": "then", "token": "x"}
    (tmp_path / ".lock").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"on elsewhere since then.*delete .*\.lock"):
        RunLock(tmp_path)


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "t", "token": "x"}
    (tmp_path / ".lock").write_text(json.dumps(info), encoding="utf-8")
    with pytest.warns(UserWarning, match=f"stale lock left by process {info['pid']}"):
        lock = RunLock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ContinualPeftError, match="is being written by process"):
        RunLock(tmp_path)
    lock.release()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_a_lock_of_an_exited_but_unreaped_process_is_stale(tmp_path):
    """A killed torchrun leaves its ranks' zombies to an init that may reap them late."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until wait()
    deadline = time.monotonic() + 60
    while "Z" not in Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1][:3]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    info = {"pid": child.pid, "host": socket.gethostname(), "started": "t", "token": "x"}
    (tmp_path / ".lock").write_text(json.dumps(info), encoding="utf-8")
    with pytest.warns(UserWarning, match=f"stale lock left by process {child.pid}"):
        RunLock(tmp_path).release()
    child.wait()


def test_a_damaged_run_resumed_with_another_order_is_refused_untouched(
    spec, tmp_path, reference_run, tiny_cli
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "checkpoint.json").unlink()
    (run / "tasks" / "moods" / "head.safetensors").unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = invoke("run", spec, "--resume", run, *OPTIONS, "--order", "moods,animals,colors")
    assert result.exit_code == 2 and "was learning the tasks" in result.stderr, result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda run: (run / "report.json").unlink(), "its reports were written again"),
        (lambda run: shutil.rmtree(run / "baseline-seq"), "baseline seq, 3 tasks"),
    ],
    ids=["lost-report", "lost-baseline-folder"],
)
def test_a_finished_run_gets_back_what_it_lost(
    spec, tmp_path, reference, reference_run, tiny_cli, damage, said
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    damage(run)
    result = invoke("run", spec, "--resume", run, *OPTIONS)
    assert result.exit_code == 0, result.output
    assert said in result.stdout
    assert outcome(run) == reference
    again = invoke("run", spec, "--resume", run, *OPTIONS)
    assert "is finished: nothing to do" in again.stdout


def test_a_finished_run_resumed_with_other_options_is_refused(
    spec, tmp_path, reference_run, tiny_cli
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    result = invoke("run", spec, "--resume", run, *OPTIONS, "--epochs", "3")  # the last counts
    assert result.exit_code == 2 and "train.epochs: 2 in the run, 3 here" in result.stderr
