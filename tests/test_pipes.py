"""Files read once may be pipes: a FIFO, or a shell's `<(cat in.jsonl)` (/dev/fd/N).

predict and eval read their --input, eval its stream spec, and the library its spec, data and
labels files, each once, start to end, so a pipe is as good as a file; a folder or a missing
path is still refused by name. A pipe read twice would wait for a writer forever: a watchdog
ends such a wait, so a second read fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import DEVICE, tiny_bert, word_task, write_stream
from typer.testing import CliRunner

from continual_peft import BackboneConfig, LearnerConfig, TrainConfig, load_strategy_spec
from continual_peft.cli import app
from continual_peft.errors import readable_file
from continual_peft.experiments.runner import run_stream
from continual_peft.tasks.records import read_records
from continual_peft.tasks.sources import read_rows
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import read_labels

runner = CliRunner()
WAIT_S = 60  # how long a reader may wait on a pipe nobody writes any more

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes: POSIX only")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@contextmanager
def fifo(path: Path, text: str) -> Iterator[Path]:
    """A named pipe at `path` that a thread fills with `text` once, when a reader opens it."""
    os.mkfifo(path)
    writer = threading.Thread(target=path.write_text, args=(text,), kwargs={"encoding": "utf-8"})
    writer.start()
    watchdog = threading.Timer(WAIT_S, _end_wait, args=(path,))
    watchdog.start()
    try:
        yield path
    finally:
        watchdog.cancel()
        if writer.is_alive():  # never read: open it here so that the writer can finish
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join()
            os.close(reader)


def _end_wait(path: Path) -> None:
    """Give a reader waiting on `path` (a second read) an end of file."""
    with contextlib.suppress(OSError):  # nobody is waiting
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@contextmanager
def substituted(text: str) -> Iterator[Path]:
    """An anonymous pipe holding `text`, named as bash's `<(...)` names one: /dev/fd/N."""
    read_end, write_end = os.pipe()

    def write() -> None:
        with os.fdopen(write_end, "wb") as out:
            out.write(text.encode("utf-8"))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield Path(f"/dev/fd/{read_end}")
    finally:
        writer.join()
        os.close(read_end)


@contextmanager
def piped(how: str, tmp_path: Path, text: str, name: str = "pipe") -> Iterator[Path]:
    """`text` through a pipe: a FIFO called `name` ("fifo") or a /dev/fd/N ("substituted")."""
    with fifo(tmp_path / name, text) if how == "fifo" else substituted(text) as path:
        yield path


HOW = [
    "fifo",
    pytest.param(
        "substituted", marks=pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd")
    ),
]


def test_readable_file_takes_files_pipes_and_devices_not_folders_or_missing_paths(tmp_path):
    (tmp_path / "file.jsonl").write_text("{}\n", encoding="utf-8")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    assert readable_file(tmp_path / "file.jsonl") and readable_file(tmp_path / "fifo")
    assert readable_file(os.devnull)
    assert not any(readable_file(tmp_path / name) for name in ("", "nothing", "dangling"))


# ---------------------------------------------------------------- the library's readers

RECORDS = '{"text": "a red car", "task": "colors", "label": "red"}\n{"text": "blue sky"}\n'
DATA = '{"text": "a red car", "label": "red"}\n{"text": "blue sky", "label": "blue"}\n'
STRATEGY = 'strategy = "seq"\nmodule = "lora"\n\n[train]\nepochs = 2\n'
LABELS = '["red", "blue", "green"]'
# (what is read, how, the pipe's name: a strategy spec is named as one by its .toml suffix)
READERS = {
    "records": (RECORDS, read_records, "pipe"),
    "data file": (DATA, lambda p: [row[:2] for row in read_rows(p, "jsonl")], "pipe"),
    "strategy spec": (STRATEGY, lambda p: load_strategy_spec(p).to_dict(), "strategy.toml"),
    "labels": (LABELS, read_labels, "pipe"),
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("what", list(READERS))
def test_each_reader_reads_a_pipe_once_as_it_reads_a_file(how, what, tmp_path):
    text, read, name = READERS[what]
    file = tmp_path / f"file-{name}"
    file.write_text(text, encoding="utf-8")
    with piped(how, tmp_path, text, name) as pipe:
        from_pipe = read(pipe)
    assert from_pipe == read(file)


@pytest.mark.parametrize("how", HOW)
def test_a_stream_spec_is_read_once_from_a_pipe(how, tmp_path):
    spec = write_stream(tmp_path / "data", [word_task("colors", n_train=12, n_test=6)])
    given = spec.read_text(encoding="utf-8")
    with piped(how, tmp_path, given) as pipe:
        stream = load_stream(pipe, data_root=spec.parent)
    again = load_stream(spec)
    assert [t.name for t in stream.tasks] == ["colors"]
    assert stream.tasks[0].train_inputs == again.tasks[0].train_inputs
    assert stream.tasks[0].labels == again.tasks[0].labels


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A finished one-task run (oracle routing) on a tiny BERT saved to a folder."""
    root = tmp_path_factory.mktemp("pipes")
    tiny_bert(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    spec = write_stream(root / "data", [word_task("colors", n_train=16, n_test=6)])
    config = LearnerConfig(
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0),
        backbone=BackboneConfig(name=str(root / "base"), max_length=32, device=str(DEVICE)),
    )
    run_stream(load_stream(spec), config, run_dir=root / "run")
    return {"run": root / "run", "spec": spec}


@pytest.mark.parametrize("how", HOW)
def test_predict_and_eval_read_their_input_from_a_pipe(how, made, tmp_path):
    file = tmp_path / "in.jsonl"
    file.write_text(DATA, encoding="utf-8")  # labelled, as eval needs
    for command in ("predict", "eval"):
        extra = ["--output", "-"] if command == "eval" else []
        expected = invoke(
            command, "--run", made["run"], "--input", file, "--task", "colors", *extra
        )
        assert expected.exit_code == 0, expected.output
        with piped(how, tmp_path, DATA, f"{command}-pipe") as pipe:
            result = invoke(
                command, "--run", made["run"], "--input", pipe, "--task", "colors", *extra
            )
        assert result.exit_code == 0, result.output
        assert result.stdout == expected.stdout


@pytest.mark.parametrize("how", HOW)
def test_eval_reads_a_stream_spec_from_a_pipe(how, made, tmp_path):
    spec = made["spec"]
    expected = invoke("eval", spec, "--run", made["run"], "--output", "-")
    assert expected.exit_code == 0, expected.output
    with piped(how, tmp_path, spec.read_text(encoding="utf-8")) as pipe:
        result = invoke(
            "eval", pipe, "--run", made["run"], "--data-root", spec.parent, "--output", "-"
        )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(expected.stdout)


def test_a_folder_or_a_missing_input_is_still_refused_by_name(made, tmp_path):
    folder = invoke("predict", "--run", made["run"], "--input", tmp_path, "--task", "colors")
    assert folder.exit_code == 2 and "is a folder, not a JSONL file" in folder.stderr
    missing = tmp_path / "absent.jsonl"
    gone = invoke("eval", "--run", made["run"], "--input", missing, "--task", "colors")
    assert gone.exit_code == 2 and f"{missing}: JSONL file not found" in gone.stderr


def test_a_strategy_spec_and_a_report_read_from_a_pipe(tmp_path):
    """`run --strategy <(cat spec.toml)` and `report <(cat report.json)`: a pipe has no suffix."""
    from continual_peft.experiments.launch import resolve_config
    from continual_peft.reports.run import load_report

    spec = 'strategy = "replay"\n[train]\nepochs = 2\n'
    read, write = os.pipe()
    os.write(write, spec.encode())
    os.close(write)
    try:
        config = resolve_config(f"/dev/fd/{read}", {})
    finally:
        os.close(read)
    assert config.strategy == "replay" and config.train.epochs == 2
    report = {
        "schema_version": 1,
        "status": "finished",
        "tasks": [],
        "task_names": [],
        "accuracy_matrix": {},
        "metrics": {},
    }
    read, write = os.pipe()
    os.write(write, json.dumps(report).encode())
    os.close(write)
    try:
        assert load_report(f"/dev/fd/{read}")["status"] == "finished"
    finally:
        os.close(read)
