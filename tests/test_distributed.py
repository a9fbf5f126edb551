"""Data parallelism under torchrun (`continual_peft.distributed`), on the CPU with gloo.

Every launch here is a real `torchrun --standalone --nproc_per_node 2`, so the file costs
processes and seconds: a few launches, each shared by several checks. The 1-process runs they
are compared with run the command line in the test's own process.

- Same numbers: a 2-process run (the command line under torchrun) ends with the accuracy,
  routed and routing matrices of a 1-process run with the same global batch, and slots and
  heads within 1e-5. Why not bit-equal tensors: the 2-process gradient is the sum of two shard
  sums (float32 addition in another order, ~1e-7 apart per step); the matrices, compared exactly,
  are where that would show. Likewise for the field's methods, and on a backbone quantized to
  4 bits by bitsandbytes.
- A failing rank stops every rank with its error, and the run resumes (same N); a run killed
  from outside resumes with another N. Both end with the uninterrupted matrices.
- The primitives (`shard_mean`, `average_gradients`, `map_shards`, `on_writer`, ...) against a
  plain recomputation, in one launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tokenizer, require_bitsandbytes, tiny_bert, word_task, write_stream
from safetensors.torch import load_file
from typer.testing import CliRunner

from continual_peft.cli import app

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 240

SPEC = """
strategy = "replay"
module = "lora"
router = "mahalanobis"
[backbone]
name = "{model}"
max_length = 32
[lora]
r = 4
dropout = 0.0
[train]
epochs = 3
batch_size = 7            # 60 examples: 9 steps of 6 or 7 rows, shards of 3 and 4 rows
lr = 0.01
[strategy_options]
buffer_size = 20
replay_batch_size = 5     # odd: the replayed rows split unevenly too
"""


# `python -m continual_peft` without the PNG plots, which cost more than a tiny task's training
# (the suite's own process skips them too, conftest.py); nothing here looks at them.
QUICK_CLI = """
import continual_peft.reports.run as reports
from continual_peft.__main__ import main

reports.plot_accuracy_matrix = lambda report, path: None
reports.plot_loss_curves = lambda report, path: False
main()
"""


def launch(*args: str, script: Path) -> list[str]:
    """The command: `torchrun` of 2 processes running `script` (QUICK_CLI for the CLI)."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*runner, "--nproc_per_node", "2", str(script), *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def in_process(*args: str):
    """The command line in this process: one process, as `python -m continual_peft` is, without
    the seconds a new interpreter spends importing torch."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT without dropout (so 1 and N processes can agree), two tasks, a spec."""
    root = tmp_path_factory.mktemp("dp")
    tokenizer = load_tokenizer()
    tiny_bert(tokenizer, still=True).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    stream = write_stream(root / "data", [word_task("colors"), word_task("animals")])
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(model=(root / "model").as_posix()), encoding="utf-8")
    cli = root / "quick_cli.py"
    cli.write_text(QUICK_CLI, encoding="utf-8")
    return {"root": root, "stream": stream, "spec": spec, "cli": cli}


def run_args(setup: dict) -> list[str]:
    return ["run", str(setup["stream"]), "--strategy", str(setup["spec"]), "--baseline", "none"]


@pytest.fixture(scope="module")
def one(setup):
    """The run on one process: (run directory, the CLI's result)."""
    out = setup["root"] / "one"
    return out, in_process(*run_args(setup), "--out", str(out))


@pytest.fixture(scope="module")
def two(setup) -> tuple[Path, subprocess.CompletedProcess]:
    """The run under torchrun, 2 processes: (run directory, the finished command)."""
    out = setup["root"] / "two"
    done = run(launch(*run_args(setup), "--out", str(out), script=setup["cli"]))
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def outcome(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "finished"
    return {key: report[key] for key in ("accuracy_matrix", "routing_accuracy", "task_names")}


def assert_same_state(a: Path, b: Path) -> None:
    """Every slot, head, router and strategy tensor of two runs within 1e-5 (module docstring)."""
    files = sorted(p.relative_to(a) for p in a.glob("tasks/*/*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in b.glob("tasks/*/*.safetensors"))
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0, msg=f"{name}:{key}")


def test_two_processes_learn_what_one_process_learns(one, two):
    (one_dir, one_done), (two_dir, two_done) = one, two
    assert outcome(two_dir) == outcome(one_dir)
    assert_same_state(one_dir, two_dir)
    report = json.loads((two_dir / "report.json").read_text(encoding="utf-8"))
    assert [task["processes"] for task in report["tasks"]] == [2, 2]
    assert "processes" not in json.loads((one_dir / "report.json").read_text())["tasks"][0]
    # rank 0 alone prints: each table as often as one process prints it, no rank's errors
    title = "Accuracy matrix R (%)"
    assert two_done.stdout.count(title) == one_done.stdout.count(title) > 0
    assert "in each of 2 processes (torchrun)" in two_done.stderr
    assert "error" not in two_done.stderr.lower()
    assert not (two_dir / ".lock").exists()


# The field's methods, each with the state torchrun must keep the same on every rank: InfLoRA's
# input covariances (summed over the ranks' shards), SD-LoRA's magnitudes (trained), the merged
# slot and the router's fallback; and the floor, linear_probe: heads alone, no slot.
METHODS = {
    "inflora": ('strategy = "inflora"', 'router = "oracle"', "samples = 16"),
    "sdlora": ('strategy = "sdlora"', 'router = "oracle"', ""),
    "route_or_merge": ('strategy = "route_or_merge"', 'router = "mahalanobis"', "margin = 1.0"),
    "linear_probe": ('strategy = "linear_probe"', 'router = "mahalanobis"', ""),
    # the survey's kinds in hybrid slots: LoRA with a prompt, then BitFit with (IA)^3
    "hybrid_kinds": ('strategy = "per_task"', 'router = "mahalanobis"', ""),
    # the spec's own replay on a frozen backbone quantized to 4 bits (QUANTIZED): every rank
    # quantizes the same folder alike, so the ranks agree as in full precision
    "replay_4bit": (
        'strategy = "replay"',
        'router = "mahalanobis"',
        "buffer_size = 20\nreplay_batch_size = 5",
    ),
}
# methods whose [backbone] table gets a line more
QUANTIZED = {"replay_4bit": 'quantize = "4bit"  # NF4 with double quantization (bitsandbytes)'}
# methods whose spec loses its [lora] table: linear_probe refuses module settings it would ignore
NO_MODULE = {"linear_probe"}
# methods with other module kinds: the run's module, and tables appended to the spec
MODULES = {"hybrid_kinds": ('module = "lora+prompt"', '[tasks.animals]\nmodule = "bitfit+ia3"\n')}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_fields_methods_learn_under_two_processes_what_one_learns(setup, method):
    strategy, router, option = METHODS[method]
    text = setup["spec"].read_text(encoding="utf-8")
    text = text.replace('strategy = "replay"', strategy).replace('router = "mahalanobis"', router)
    text = text.replace("buffer_size = 20\nreplay_batch_size = 5", option)
    if method in NO_MODULE:
        text = text.replace("[lora]\nr = 4\ndropout = 0.0\n", "")
    if method in MODULES:
        module, tables = MODULES[method]
        text = text.replace('module = "lora"', module) + tables
    if method in QUANTIZED:
        require_bitsandbytes()
        text = text.replace("max_length = 32\n", f"max_length = 32\n{QUANTIZED[method]}\n")
    spec = setup["root"] / f"{method}.toml"
    spec.write_text(text, encoding="utf-8")
    args = ["run", str(setup["stream"]), "--strategy", str(spec), "--baseline", "none"]
    one_dir, two_dir = setup["root"] / f"{method}-one", setup["root"] / f"{method}-two"
    in_process(*args, "--out", str(one_dir))
    done = run(launch(*args, "--out", str(two_dir), script=setup["cli"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(two_dir) == outcome(one_dir)
    assert_same_state(one_dir, two_dir)
    ran = json.loads((two_dir / "config.json").read_text(encoding="utf-8"))["config"]["backbone"]
    assert ran.get("quantize", "none") == ("4bit" if method in QUANTIZED else "none")
    if method in MODULES:
        report = json.loads((two_dir / "report.json").read_text(encoding="utf-8"))
        assert [task["module"] for task in report["tasks"]] == ["lora+prompt", "bitfit+ia3"]


FLAKY = """
import os, sys
from pathlib import Path
import continual_peft.reports.run as reports
from continual_peft.distributed import start, world
from continual_peft.experiments.runner import run_stream
from continual_peft.strategies import STRATEGIES, load_strategy_spec
from continual_peft.strategies.replay import Replay
from continual_peft.tasks.streams import load_stream

@STRATEGIES.register("flaky")
class Flaky(Replay):
    steps = 0
    def loss(self, learner, task, loss):
        self.steps += task.name == "animals"
        if os.environ.get("FAIL") and world().rank == 1 and self.steps == 4:
            raise RuntimeError("rank 1 broke on purpose")
        return super().loss(learner, task, loss)

reports.plot_accuracy_matrix = lambda report, path: None  # as QUICK_CLI
reports.plot_loss_curves = lambda report, path: False
start()
stream, spec, out = sys.argv[1:4]
config = load_strategy_spec(Path(spec))
config.strategy = "flaky"
run_stream(load_stream(Path(stream)), config, run_dir=out, resume=len(sys.argv) > 4)
sys.stdout.flush()
os._exit(0)  # as `python -m continual_peft` does: gloo's native teardown may abort at exit
"""


def test_a_failing_rank_stops_every_rank_and_the_run_resumes(setup, two, tmp_path):
    script = tmp_path / "flaky.py"
    script.write_text(textwrap.dedent(FLAKY), encoding="utf-8")
    out = tmp_path / "run"
    args = [str(setup["stream"]), str(setup["spec"]), str(out)]
    start = time.monotonic()
    failed = subprocess.run(
        launch(*args, script=script),
        env={**ENV, "FAIL": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert failed.returncode != 0
    assert time.monotonic() - start < 120  # every rank stopped; none waits for the dead one
    assert "rank 1 broke on purpose" in failed.stdout + failed.stderr
    checkpoint = json.loads((out / "checkpoint.json").read_text(encoding="utf-8"))
    assert checkpoint["tasks_done"] == 1  # the first task is kept, the second was cut short
    resumed = run(launch(*args, "resume", script=script))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert outcome(out) == outcome(two[0])
    assert_same_state(two[0], out)


def test_a_killed_two_process_run_resumes_on_one_process(setup, two, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        launch(*run_args(setup), "--out", str(out), script=setup["cli"]),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + TIMEOUT
    while not _tasks_done(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_every_process_of(out)  # the job dies whole (a lost node): launcher and both ranks
    process.wait(timeout=60)
    assert _tasks_done(out) == 1, "killed before the first task or after the second"
    assert (out / ".lock").exists()
    with pytest.warns(UserWarning, match="taking over a stale lock"):
        in_process("run", str(setup["stream"]), "--resume", str(out), "--baseline", "none")
    assert outcome(out) == outcome(two[0])
    assert_same_state(two[0], out)


def _kill_every_process_of(run_dir: Path) -> None:
    """SIGKILL the launcher and its ranks: every process whose command line names `run_dir`
    (torchrun starts its ranks in sessions of their own, out of reach of its process group)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _tasks_done(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text(encoding="utf-8"))["tasks_done"]
    except (OSError, ValueError, KeyError):
        return 0


PRIMITIVES = """
import os
import numpy as np, torch
from continual_peft import distributed as d

here = d.start()
assert here.size == 2, here
cpu = torch.device("cpu")
torch.set_default_device("meta")  # a tensor made here without a device would be on meta
shards = [[slice(0, 4), slice(0, 1)], [slice(4, 7), slice(1, 1)]]
assert [d.shard(7), d.shard(1)] == shards[here.rank]

# a token-mean loss (row i counts n_i times) over uneven shards, plus a parameter-only term
torch.manual_seed(0)
x, n = torch.randn(7, 3, device=cpu), np.array([1.0, 4, 2, 3, 1, 5, 2])
w, b, unused = (torch.zeros(k, requires_grad=True, device=cpu) for k in (3, 1, 2))

def mean_loss(rows):
    rows = torch.as_tensor(rows, device=cpu)
    tokens = torch.as_tensor(n, dtype=torch.float32, device=cpu)
    per_row = ((x[rows] @ w - 1.0) ** 2 + b.sum()) * tokens[rows]
    return per_row.sum() / tokens[rows].sum()

full = mean_loss(np.arange(7)) + 0.5 * (w + 1).pow(2).sum()
expected = torch.autograd.grad(full, [w, b])
loss = d.shard_mean(np.arange(7), n, mean_loss, cpu) + 0.5 * (w + 1).pow(2).sum()
loss.backward()
value = d.average_gradients([w, b, unused], loss.detach())
assert abs(value - full.item()) < 1e-6, (value, full.item())
torch.testing.assert_close([w.grad, b.grad], list(expected))
assert unused.grad is None  # no rank had one: AdamW must skip it, as on one process

# one row over two ranks: rank 1's share is an empty, constant zero
w.grad = None
part = d.shard_mean(np.arange(1), n[:1], mean_loss, cpu)
assert part.requires_grad == (here.rank == 0)
if part.requires_grad:
    part.backward()
d.average_gradients([w], part.detach())
torch.testing.assert_close(w.grad, torch.autograd.grad(mean_loss(np.arange(1)), [w])[0])

# a mean whose rows are counted after the forward (L2P's key pull)
total, count = torch.tensor([[3.0, 2.0], [5.0, 0.0]][here.rank], device=cpu)
shares = torch.stack([d.shared_mean(total, count)])
d.sum_over_ranks([shares])
assert float(shares / 2) == 4.0  # (3 + 5) / (2 + 0)

# sharded work: each job once, every result on every rank, in job order
ran = []
results, others = d.map_shards(list(range(5)), lambda j: ran.append(j) or (10 * j, d.world().rank))
assert results == [(0, 0), (10, 1), (20, 0), (30, 1), (40, 0)], results
assert ran == [[0, 2, 4], [1, 3]][here.rank] and sorted(ran + others) == list(range(5))

# state every rank must share; rank 0's clock; rank 0's failures reach every rank
state = torch.full((2,), float(here.rank), device=cpu)
d.same_everywhere([state])
assert state.tolist() == [0.0, 0.0]
assert d.from_writer(f"rank {here.rank}") == "rank 0"
assert d.on_writer(lambda: "written") == ("written" if here.rank == 0 else None)
def disk_full():
    raise OSError(28, "No space left on device")
try:
    d.on_writer(disk_full)
except OSError as err:
    assert here.rank == 0 and "No space left" in str(err)
except d.WriterError as err:
    assert here.rank == 1 and "rank 0 stopped the run" in str(err) and "No space left" in str(err)
else:
    raise AssertionError("on_writer swallowed rank 0's error")
print(f"rank {here.rank}: all checks passed", flush=True)

# a peer that is gone: the next collective says so (PeerLost), not a raw gloo error
if here.rank == 1:
    os._exit(0)
try:
    d.sum_over_ranks([torch.ones(1, device=cpu)])
except d.PeerLost as err:
    assert "another process of this torchrun job stopped" in str(err), err
    print("rank 0: the lost peer was named", flush=True)
d.stop()
"""


def test_the_primitives_against_a_plain_recomputation(tmp_path):
    script = tmp_path / "primitives.py"
    script.write_text(textwrap.dedent(PRIMITIVES), encoding="utf-8")
    done = run(launch(script=script))
    assert done.returncode == 0, done.stdout + done.stderr
    # two processes share the pipe: a line of one may land in the middle of the other's
    said = re.findall(r"rank \d: (?:all checks passed|the lost peer was named)", done.stdout)
    assert sorted(said) == [
        "rank 0: all checks passed",
        "rank 0: the lost peer was named",
        "rank 1: all checks passed",
    ]


def test_one_process_is_the_identity():
    from continual_peft import distributed

    assert distributed.world() == distributed.World(0, 1) and distributed.world().writer
    assert distributed.shard(5) == slice(0, 5)
    w = torch.ones(2, requires_grad=True)
    loss = distributed.shard_mean(
        np.arange(3), np.ones(3), lambda rows: (w * len(rows)).sum(), torch.device("cpu")
    )
    assert float(loss.detach()) == 6.0
    loss.backward()
    assert distributed.average_gradients([w], loss.detach()) == 6.0 and w.grad.tolist() == [3, 3]
    assert distributed.map_shards([1, 2], lambda j: -j) == ([-1, -2], [])
    assert distributed.on_writer(lambda: 7) == 7 and distributed.from_writer("x") == "x"


def test_a_batch_smaller_than_the_processes_trains_on_one_rank(setup, tmp_path):
    """batch_size 1 on 2 processes: rank 1 has no row at any step, runs no forward, and must
    still add nothing but take part in every mean (L2P's key pull counts rows over the ranks)."""
    options = ["--strategy", "l2p", "--batch-size", "1", "--max-train", "6", "--max-test", "6"]
    options += ["--backbone", str(setup["root"] / "model"), "--max-length", "32", "--epochs", "1"]
    runs = {processes: tmp_path / f"l2p-{processes}" for processes in (1, 2)}
    args = ["run", str(setup["stream"]), "--baseline", "none", *options]
    in_process(*args, "--out", str(runs[1]))
    done = run(launch(*args, "--out", str(runs[2]), script=setup["cli"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(runs[2]) == outcome(runs[1])
    assert_same_state(runs[1], runs[2])


def test_several_processes_need_torchrun(monkeypatch):
    """WORLD_SIZE without torchrun would wait for partners nobody starts, deaf to Ctrl-C."""
    from continual_peft import distributed
    from continual_peft.errors import ContinualPeftError

    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(ContinualPeftError, match="torchrun did not start this one"):
        distributed.start()
    assert distributed.world().size == 1


def test_threads_count_the_processes_of_the_node(monkeypatch):
    from continual_peft.backbones import placement
    from continual_peft.errors import ContinualPeftError

    before = torch.get_num_threads()
    monkeypatch.setattr(placement, "usable_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        assert placement.set_threads(1) == "1 (as asked)"
        said = placement.set_threads(2)
        assert "oversubscribed" in said and "2 shared by 2 processes" in said
        with pytest.raises(ContinualPeftError, match="shared by 2 processes"):
            placement.set_threads(5)
    finally:
        torch.set_num_threads(before)
