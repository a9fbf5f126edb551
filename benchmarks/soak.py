"""Soak: hundreds of tiny tasks in a row, with memory, disk and time per task that must stay flat.

A stream of N two-label text tasks (default 500), each with words of its own (so the router can
tell them apart), a few dozen training rows and 8 test rows, runs through `ContinualLearner`:
per_task strategy, a fresh LoRA slot per task (LoRAConfig's defaults), the Mahalanobis router
with its default options (features: "auto" layers, several depths side by side), 1 epoch, on a
random BERT-like encoder 384 wide with 4 layers (so "auto" reads layers 1, 3 and 4: 1,152
features) and a word-level vocabulary, built from a config (no download). Every task writes its
checkpoint and the report into the run directory, as a real run does.

Per task it records the wall time of training, of the router fit (`add_task`) and of the
re-evaluation of every task (the record's `eval_seconds` holds both), of the checkpoint write and
of the report write; the resident memory; the run directory's size; and the task's own bytes:
the files of `tasks/<task>/` other than the run's shared state (router, strategy and the
checkpoint's copy). Then it checks, and prints PASS or FAIL with the numbers:

- memory: RSS growth after warm-up stays below a bound that allows for the slots the bank holds;
- disk: the run directory grows per task by at most 1.5x the task's own bytes;
- checkpoint time and training + router-fit time per task stay flat (late / early mean <= 1.5);
- re-evaluation time grows at most linearly in the number of tasks T (least-squares fit);
- with --max-slots K: the bank holds K slots at the end.

The script exits with status 1 if a check fails. `tests/test_soak.py` imports this file for the
model, the tasks, the run-directory census and the checks that take no timing. Timings come from
one torch thread (`--threads`), which stays steady on a shared machine; the report's PNG plots are
drawn as the library draws them (after each of the first 20 tasks, then every 10th: about 1.5 s
each; `--no-plots` skips them).

Re-evaluating every task after every task costs a + b*T per task, so N tasks cost about
b*N^2/2 in all: with b near 20 ms on a 2-core CPU, 500 tasks take about 40 minutes, and a run
with `--eval-every 10` a tenth of that re-evaluation. The table's last column projects the
whole run's minutes from the tasks so far.

Run:
    python benchmarks/soak.py                               # 500 tasks
    python benchmarks/soak.py --tasks 50 --json soak.json   # a first look
    python benchmarks/soak.py --max-slots 100 --compare-budget
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import BertConfig, BertModel

from continual_peft import (
    Backbone,
    BackboneConfig,
    ContinualLearner,
    LearnerConfig,
    Task,
    TrainConfig,
)
from continual_peft.backbones.tiny import word_tokenizer

# Files of a task folder that hold the run's shared state after that task, not the task itself.
SHARED_FILES = (
    "router.safetensors",
    "router.json",
    "strategy.safetensors",
    "strategy.json",
    "checkpoint.json",
)
FILLER = ["the", "a", "one", "this", "that", "some", "here", "there", "now", "then", "and", "of"]
FILLER += ["big", "small", "old", "new", "red", "blue", "up", "down", "in", "out", "on", "off"]
GROWTH_BOUND = 1.5  # run-directory growth per task / the task's own bytes
FLAT_BOUND = 1.5  # late / early mean time per task
RSS_SLACK_MB = 64.0  # allocator and cache noise on top of what the tasks legitimately hold
RSS_PER_OWN_BYTE = 2.0  # a task's slot and head live in memory too: its own bytes, with room
LINEAR_R2 = 0.6  # full re-evaluation: a + b*T must explain this much of eval_seconds (noisy box)
MAX_STATE_COPIES = 2  # files that are no task's own may grow by this many over a second half


@dataclass(frozen=True)
class Shape:
    """The model and the tasks of a soak."""

    hidden: int = 384  # the encoder's width
    layers: int = 4  # encoder blocks ("auto" features: blocks 1, 3 and 4)
    heads: int = 6  # attention heads
    intermediate: int = 768  # feed-forward width (2x: a quarter of the re-evaluation's cost)
    max_length: int = 8  # tokens per input (a sentence is 5 words)
    train_rows: int = 32  # training rows per task
    test_rows: int = 8  # test rows per task


@dataclass
class TaskRow:
    """What one task cost: times in seconds, sizes in bytes."""

    task: int  # 1-based: how many tasks are learned after it
    name: str
    learn_s: float  # the whole `learn` call
    train_s: float  # the record's train_seconds
    fit_s: float  # the router's add_task
    eval_s: float  # the record's eval_seconds: router fit + re-evaluating every task
    checkpoint_s: float
    report_s: float
    rss_bytes: int  # resident set after the task
    live_bytes: int  # the same once the allocator returned what it only caches (`live_rss`)
    dir_bytes: int
    growth_bytes: int  # how much the run directory grew with this task
    own_bytes: int  # the task's own files (`own_files`)
    shared_files: int  # files in the run directory that are no task's own (`shared_file_count`)
    parts: dict[str, int]  # the run directory's bytes by part (`census`)


class Check(NamedTuple):
    """A check's verdict (None: informational) and its numbers."""

    name: str
    passed: bool | None
    detail: str


# ---------------------------------------------------------------- the model and the tasks


def task_words(k: int) -> list[str]:
    """Task k's own words: its two labels, then two topic words."""
    return [f"k{k}a", f"k{k}b", f"k{k}x", f"k{k}y"]


def vocabulary(n_tasks: int) -> list[str]:
    return FILLER + [w for k in range(n_tasks) for w in task_words(k)]


def soak_task(k: int, shape: Shape = Shape()) -> Task:
    """Task k: which of its two label words a 5-word sentence holds, beside one of its topic
    words and three shared fillers."""
    rng = random.Random(k)
    yes, no, *topics = task_words(k)

    def sample(n: int) -> list[tuple[str, str]]:
        rows = []
        for i in range(n):
            label = (yes, no)[i % 2]
            words = [label, rng.choice(topics), *rng.sample(FILLER, 3)]
            rng.shuffle(words)
            rows.append((" ".join(words), label))
        return rows

    name = f"t{k:04d}"
    return Task.from_examples(
        name, train=sample(shape.train_rows), test=sample(shape.test_rows), labels=[yes, no]
    )


def soak_backbone(n_tasks: int, shape: Shape = Shape(), seed: int = 0) -> Backbone:
    """A random BERT of `shape` over the words of `n_tasks` tasks, on the CPU."""
    tokenizer = word_tokenizer(vocabulary(n_tasks))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=2 * shape.max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    name = f"soak-bert-{shape.hidden}x{shape.layers}"
    return Backbone(model, tokenizer, max_length=shape.max_length, name=name, device="cpu")


def has_config_field(name: str) -> bool:
    """Whether this tree's `LearnerConfig` has field `name` (some are being added)."""
    return name in {f.name for f in dataclasses.fields(LearnerConfig)}


def optional_settings(
    max_slots: int | None = None, eval_every: int | None = None, eval_sample: int | None = None
) -> dict[str, Any]:
    """`LearnerConfig` keyword arguments for the settings given (None: left at the default).

    Raises:
        ValueError: a setting given whose field this tree's `LearnerConfig` lacks.
    """
    settings: dict[str, Any] = {}
    if max_slots is not None:
        if not has_config_field("max_slots"):
            raise ValueError("--max-slots: this tree's LearnerConfig has no max_slots field yet")
        settings["max_slots"] = max_slots
    evaluation = {"every": eval_every, "sample": eval_sample}
    evaluation = {key: value for key, value in evaluation.items() if value is not None}
    if evaluation:
        if not has_config_field("evaluation"):
            raise ValueError(
                "--eval-every/--eval-sample: this tree's LearnerConfig has no evaluation field yet"
            )
        default = next(f for f in dataclasses.fields(LearnerConfig) if f.name == "evaluation")
        settings["evaluation"] = dataclasses.replace(default.default_factory(), **evaluation)
    return settings


def soak_config(shape: Shape = Shape(), threads: int = 0, **settings: Any) -> LearnerConfig:
    """per_task LoRA (its defaults), the Mahalanobis router (its defaults), 1 epoch; `settings`
    are `optional_settings`'s."""
    return LearnerConfig(
        strategy="per_task",
        module="lora",
        router="mahalanobis",
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-2, warmup=0.0),
        backbone=BackboneConfig(max_length=shape.max_length, device="cpu", threads=threads),
        **settings,
    )


# ---------------------------------------------------------------- measuring


def rss_bytes() -> int:
    """The process's resident set: psutil's, else /proc/self/status's VmRSS."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status", encoding="utf-8") as status:
            line = next(x for x in status if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def live_rss() -> int:
    """The resident set once freed memory is given back: a garbage collection, then glibc's
    `malloc_trim(0)` (where there is one), which returns the heap pages malloc keeps cached
    after the large temporaries of a re-evaluation. What stays is what the process holds."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def own_files(folder: Path) -> list[Path]:
    """A task folder's own files: all but the run's shared state (`SHARED_FILES`), e.g. its
    module.safetensors, head.safetensors, task.json and any per-task increment."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in SHARED_FILES)


def census(run: Path) -> dict[str, int]:
    """The run directory's bytes by part: "own" (every task's own files), "router",
    "strategy" and "checkpoint copies" (those shared-state files in task folders), "<folder>/"
    for each other folder (e.g. "state/"), and "run files" (the root's report, checkpoint and
    config files)."""
    parts = dict.fromkeys(["own", "router", "strategy", "checkpoint copies", "run files"], 0)
    for root, _, names in os.walk(run):
        relative = Path(root).relative_to(run).parts
        for name in names:
            if len(relative) == 2 and relative[0] == "tasks":
                part = "own" if name not in SHARED_FILES else name.split(".")[0]
                part = "checkpoint copies" if part == "checkpoint" else part
            else:
                part = f"{relative[0]}/" if relative else "run files"
            parts[part] = parts.get(part, 0) + os.path.getsize(os.path.join(root, name))
    return parts


def shared_file_count(run: Path) -> int:
    """How many files of the run directory are not a task's own (`own_files`)."""
    count = 0
    for root, _, names in os.walk(run):
        relative = Path(root).relative_to(run).parts
        in_task = len(relative) == 2 and relative[0] == "tasks"
        count += sum(not in_task or name in SHARED_FILES for name in names)
    return count


def state_copies(run: Path) -> dict[str, int]:
    """How many task folders hold each shared-state file."""
    folders = [p for p in (run / "tasks").iterdir() if p.is_dir()]
    return {name: sum((f / name).is_file() for f in folders) for name in SHARED_FILES}


def skip_plots() -> None:
    """Draw no PNG plots in reports from now on: a heatmap costs about a second and a half of
    matplotlib per task, more than all else a tiny task does, and its size is bounded (tests/
    test_soak.py). The report's JSON, CSV and Markdown are still written."""
    from continual_peft.reports import run as run_reports

    run_reports.plot_accuracy_matrix = lambda report, path: None
    run_reports.plot_loss_curves = lambda report, path: False


def install_timer(owner: object, name: str, seconds: dict[str, float]) -> None:
    """Replace `owner.name` (a method) on the instance by a wrapper that adds each call's wall
    time to `seconds[name]`."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)


class Soak:
    """Feeds tasks to a learner with a run directory and measures each (`TaskRow`).

    Args:
        learner: A fresh learner writing a run directory.
    """

    def __init__(self, learner: ContinualLearner) -> None:
        if learner.run_dir is None or learner.router is None:
            raise ValueError("a soak needs a learner with a run directory and a router")
        self.learner = learner
        self.run = learner.run_dir.path
        self.seconds: dict[str, float] = {}
        install_timer(learner, "checkpoint", self.seconds)
        install_timer(learner, "write_report", self.seconds)
        install_timer(learner.router, "add_task", self.seconds)
        self.rows: list[TaskRow] = []

    def learn(self, task: Task) -> TaskRow:
        self.seconds.clear()
        before = self.rows[-1].dir_bytes if self.rows else 0
        start = time.perf_counter()
        record = self.learner.learn(task)
        learn_s = time.perf_counter() - start
        parts = census(self.run)
        folder = self.run / "tasks" / task.name
        row = TaskRow(
            task=len(self.rows) + 1,
            name=task.name,
            learn_s=learn_s,
            train_s=record["train_seconds"],
            fit_s=self.seconds.get("add_task", 0.0),
            eval_s=record["eval_seconds"],
            checkpoint_s=self.seconds.get("checkpoint", 0.0),
            report_s=self.seconds.get("write_report", 0.0),
            rss_bytes=rss_bytes(),
            live_bytes=live_rss(),
            dir_bytes=sum(parts.values()),
            growth_bytes=sum(parts.values()) - before,
            own_bytes=sum(p.stat().st_size for p in own_files(folder)),
            shared_files=shared_file_count(self.run),
            parts=parts,
        )
        self.rows.append(row)
        return row


# ---------------------------------------------------------------- checks


def window(n_tasks: int) -> int:
    """Tasks per comparison window: 50 for 200 tasks or more (tasks 51-100 against the last
    50), a quarter of a shorter run."""
    return max(1, min(50, n_tasks // 4))


def growth_ratios(rows: list[TaskRow]) -> list[float]:
    """Per task of the second half: run-directory growth / the task's own bytes."""
    return [r.growth_bytes / r.own_bytes for r in rows[len(rows) // 2 :]]


def growth_check(rows: list[TaskRow]) -> Check:
    ratios = growth_ratios(rows)
    half = len(rows) // 2
    second = rows[half:]
    pairs = list(zip(rows[half - 1 :], second, strict=False))
    grew = {
        part: statistics.mean(r.parts.get(part, 0) - p.parts.get(part, 0) for p, r in pairs)
        for part in rows[-1].parts
    }
    shares = ", ".join(f"{part} {b / 1e3:,.1f}" for part, b in grew.items())
    median, most = statistics.median(ratios), max(ratios)
    detail = (
        f"growth / own bytes over tasks {second[0].task}-{second[-1].task}: median "
        f"{median:.2f}, max {most:.2f} (bound {GROWTH_BOUND}); own bytes per task median "
        f"{statistics.median(r.own_bytes for r in second) / 1e3:,.1f} kB, growth median "
        f"{statistics.median(r.growth_bytes for r in second) / 1e3:,.1f} kB; mean growth per "
        f"task by part (kB): {shares}"
    )
    return Check("run directory grows by the task's own bytes", most <= GROWTH_BOUND, detail)


def copies_check(rows: list[TaskRow], run: Path) -> Check:
    """Files that are no task's own (shared state, reports) must not multiply with the tasks:
    their count in the second half may move by at most `MAX_STATE_COPIES`."""
    half = rows[len(rows) // 2]
    added = rows[-1].shared_files - half.shared_files
    copies = ", ".join(f"{name} in {n}" for name, n in state_copies(run).items() if n)
    detail = (
        f"files that are no task's own: {half.shared_files} after task {half.task}, "
        f"{rows[-1].shared_files} after task {rows[-1].task} (bound +{MAX_STATE_COPIES}); "
        f"task folders holding shared state: {copies or 'none'}"
    )
    return Check("no shared state written per task", added <= MAX_STATE_COPIES, detail)


def memory_check(rows: list[TaskRow]) -> Check:
    """Live resident memory (`live_rss`) from the end of warm-up to the last task, against what
    the tasks learned in between legitimately hold (their slots and heads: about their own
    bytes) plus slack. The raw resident set, which also holds what malloc caches, is shown."""
    warm = window(len(rows))
    start, end = rows[warm - 1], rows[-1]
    growth = (end.live_bytes - start.live_bytes) / 2**20
    raw = (end.rss_bytes - start.rss_bytes) / 2**20
    held = sum(r.own_bytes for r in rows[warm:]) / 2**20
    bound = RSS_SLACK_MB + RSS_PER_OWN_BYTE * held
    detail = (
        f"live RSS {start.live_bytes / 2**20:,.0f} MB after task {start.task}, "
        f"{end.live_bytes / 2**20:,.0f} MB after task {end.task}: +{growth:,.1f} MB; bound "
        f"{RSS_SLACK_MB:.0f} MB + {RSS_PER_OWN_BYTE:g} x the {held:,.1f} MB of own bytes those "
        f"tasks added = {bound:,.1f} MB; raw RSS +{raw:,.1f} MB, "
        f"peak {max(r.rss_bytes for r in rows) / 2**20:,.0f} MB"
    )
    return Check("resident memory flat after warm-up", growth <= bound, detail)


def flat_check(
    rows: list[TaskRow], name: str, seconds: Callable[[TaskRow], float], asserted: bool = True
) -> Check:
    """Mean time per task over the last window against the second window (tasks 51-100)."""
    w = window(len(rows))
    early, late = rows[w : 2 * w], rows[-w:]
    a, b = statistics.mean(map(seconds, early)), statistics.mean(map(seconds, late))
    ratio = b / a if a > 0 else float("inf")
    detail = (
        f"mean {a * 1e3:,.1f} ms over tasks {early[0].task}-{early[-1].task}, "
        f"{b * 1e3:,.1f} ms over tasks {late[0].task}-{late[-1].task}: ratio {ratio:.2f} "
        f"(bound {FLAT_BOUND})"
    )
    return Check(name, ratio <= FLAT_BOUND if asserted else None, detail)


def linear_fit(ts: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """Least-squares y ~ a + b*t: a, b and R^2."""
    design = np.stack([np.ones_like(ts), ts], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    residual = ys - (a + b * ts)
    total = ((ys - ys.mean()) ** 2).sum()
    return float(a), float(b), float(1 - (residual**2).sum() / total) if total > 0 else 1.0


def linear_eval_check(rows: list[TaskRow], full: bool = True) -> Check:
    """eval_seconds ~ a + b*T over the tasks after warm-up. Full re-evaluation (every task
    every time) must fit a line (R^2 >= LINEAR_R2); with every task, or sampled, re-evaluation
    is cheaper, so the check is only that the last window does not outgrow the line fitted to
    the first half by more than FLAT_BOUND."""
    w = window(len(rows))
    ts = np.array([r.task for r in rows[w:]], dtype=float)
    ys = np.array([r.eval_s for r in rows[w:]])
    a, b, r2 = linear_fit(ts, ys)
    half = len(ts) // 2
    a1, b1, _ = linear_fit(ts[:half], ys[:half])
    late = rows[-w:]
    predicted = a1 + b1 * statistics.mean(r.task for r in late)
    outgrow = statistics.mean(r.eval_s for r in late) / predicted if predicted > 0 else 0.0
    passed = outgrow <= FLAT_BOUND and (r2 >= LINEAR_R2 or not full)
    detail = (
        f"eval_seconds ~ {a * 1e3:.1f} ms + {b * 1e3:.2f} ms x T over tasks {w + 1}-"
        f"{rows[-1].task}, R^2 {r2:.3f} ({'bound' if full else 'not bound, sampled'} "
        f"{LINEAR_R2}); last {w} tasks / the first half's line: {outgrow:.2f} "
        f"(bound {FLAT_BOUND})"
    )
    return Check("re-evaluation time linear in T", passed, detail)


def budget_check(learner: ContinualLearner, max_slots: int, n_tasks: int) -> Check:
    expected = min(max_slots, n_tasks)
    slots = learner.bank.num_slots
    detail = f"bank holds {slots} slots after {n_tasks} tasks (max_slots {max_slots})"
    return Check("the bank holds max_slots slots", slots == expected, detail)


def soak_checks(soak: Soak, full_eval: bool = True, max_slots: int | None = None) -> list[Check]:
    rows = soak.rows
    checks = [
        memory_check(rows),
        growth_check(rows),
        copies_check(rows, soak.run),
        flat_check(rows, "checkpoint time per task flat", lambda r: r.checkpoint_s),
        flat_check(rows, "training + router fit time per task flat", lambda r: r.train_s + r.fit_s),
        linear_eval_check(rows, full_eval),
        flat_check(rows, "report time per task (not asserted)", lambda r: r.report_s, False),
    ]
    if max_slots is not None:
        checks.append(budget_check(soak.learner, max_slots, len(rows)))
    return checks


# ---------------------------------------------------------------- the command


HEADER = (
    f"{'tasks':>6} {'live MB':>7} {'dir MB':>8} {'grow kB':>8} {'own kB':>7} {'train ms':>9} "
    f"{'fit ms':>7} {'eval ms':>8} {'ckpt ms':>8} {'report ms':>9} {'s/task':>7} {'total s':>8} "
    f"{'proj. min':>9}"
)


def projected_seconds(rows: list[TaskRow], n_tasks: int) -> float:
    """The whole run's seconds of `learn`, projected from the tasks so far: the mean time
    besides re-evaluation over the last 20 tasks, and eval_seconds ~ a + b*T fitted to all."""
    done = sum(r.learn_s for r in rows)
    if len(rows) < 5:
        return float("nan")
    other = statistics.mean(r.learn_s - r.eval_s for r in rows[-20:])
    ts = np.array([r.task for r in rows], dtype=float)
    a, b, _ = linear_fit(ts, np.array([r.eval_s for r in rows]))
    rest = np.arange(len(rows) + 1, n_tasks + 1, dtype=float)
    return done + float((other + a + b * rest).sum())


def table_line(block: list[TaskRow], elapsed: float, projected: float) -> str:
    """The last task of `block`, with times and growth averaged over the block."""
    last = block[-1]

    def ms(key: str) -> float:
        return 1e3 * statistics.mean(getattr(r, key) for r in block)

    growth = statistics.mean(r.growth_bytes for r in block) / 1e3
    return (
        f"{last.task:>6} {last.live_bytes / 2**20:>7.0f} {last.dir_bytes / 2**20:>8.1f} "
        f"{growth:>8.1f} {last.own_bytes / 1e3:>7.1f} {ms('train_s'):>9.0f} {ms('fit_s'):>7.0f} "
        f"{ms('eval_s'):>8.0f} {ms('checkpoint_s'):>8.0f} {ms('report_s'):>9.0f} "
        f"{ms('learn_s') / 1e3:>7.2f} {elapsed:>8.0f} {projected / 60:>9.1f}"
    )


def run_soak(args: argparse.Namespace, max_slots: int | None, out: Path) -> Soak:
    """One soak of `args.tasks` tasks into run directory `out`, printing a table line every
    `args.print_every` tasks."""
    shape = Shape()
    settings = optional_settings(max_slots, args.eval_every, args.eval_sample)
    config = soak_config(shape, threads=args.threads, **settings)
    learner = ContinualLearner(soak_backbone(args.tasks, shape), config=config, run_dir=out)
    soak = Soak(learner)
    print(
        f"run {out}: {learner.backbone.name}, {args.tasks} tasks x ({shape.train_rows} train, "
        f"{shape.test_rows} test) rows, max_length {shape.max_length}; router features "
        f"{learner.router.options.get('layers', '?')!r}; threads {learner.threads}; "
        f"{', '.join(f'{k} {v}' for k, v in settings.items()) or 'no budget, full re-evaluation'}"
    )
    print(HEADER)
    start, every = time.perf_counter(), args.print_every or max(1, min(50, args.tasks // 5))
    for k in range(args.tasks):
        soak.learn(soak_task(k, shape))
        if (k + 1) % every == 0 or k + 1 == args.tasks:
            projected = projected_seconds(soak.rows, args.tasks)
            line = table_line(soak.rows[-every:], time.perf_counter() - start, projected)
            print(line, flush=True)
    learner.finish()
    names = sorted({p.name for p in own_files(out / "tasks" / soak.rows[-1].name)})
    print(f"own files counted per task: {', '.join(names)}; shared: {', '.join(SHARED_FILES)}")
    print(
        f"features: {learner.router.dim} wide (router.dim); slots in the bank: "
        f"{learner.bank.num_slots}"
    )
    return soak


def accuracy_line(learner: ContinualLearner) -> str:
    metrics = learner.report["metrics"]
    return f"ACC oracle {metrics['oracle']['acc']:.3f}, routed {metrics['routed']['acc']:.3f}"


def consolidations(learner: ContinualLearner) -> list[str]:
    """The records' entries whose key names a consolidation (a slot budget's merges)."""
    found = []
    for record in learner.records:
        for source in (record, record.get("strategy") or {}):
            for key, value in source.items():
                if "consolid" in key:
                    found.append(f"{record['name']}: {key} = {json.dumps(value)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=500, help="tasks in the stream")
    parser.add_argument("--max-slots", type=int, default=None, help="LearnerConfig.max_slots")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluation.every")
    parser.add_argument("--eval-sample", type=int, default=None, help="evaluation.sample")
    parser.add_argument("--compare-budget", action="store_true", help="also run without budget")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write rows and checks to this file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared box)"
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="draw no PNG plots (the library redraws them after each of the first 20 tasks, "
        "then every 10th)",
    )
    parser.add_argument("--print-every", type=int, default=0, help="table line every N tasks")
    args = parser.parse_args()
    if args.tasks < 8:
        parser.error("--tasks must be at least 8 (the checks compare windows of tasks)")
    if args.compare_budget and args.max_slots is None:
        parser.error("--compare-budget needs --max-slots")
    try:
        optional_settings(args.max_slots, args.eval_every, args.eval_sample)
    except ValueError as err:
        parser.error(str(err))
    from _timing import device_name  # benchmarks/ is on the path when this runs as a script

    if args.no_plots:
        skip_plots()
    out = Path(args.out or tempfile.mkdtemp(prefix="soak-"))
    print(
        f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"Python {platform.python_version()}"
    )
    soak = run_soak(args, args.max_slots, out / "run")
    full = args.eval_every is None and args.eval_sample is None
    checks = soak_checks(soak, full, args.max_slots)
    accuracy = accuracy_line(soak.learner)
    compared = None
    if args.compare_budget:
        print("\nthe same stream without the slot budget:")
        compared = run_soak(args, None, out / "run-no-budget")
        accuracy += f"; without the budget: {accuracy_line(compared.learner)}"
    print(f"\n{accuracy}")
    for line in consolidations(soak.learner):
        print(f"consolidation: {line}")
    total = sum(r.learn_s for r in soak.rows)
    print(f"{total:,.0f} s for {len(soak.rows)} tasks ({total / len(soak.rows):.2f} s per task)")
    for check in checks:
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[check.passed]
        print(f"{verdict} {check.name}: {check.detail}")
    if args.json:
        result = {
            "tasks": args.tasks,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
            "shape": dataclasses.asdict(Shape()),
            "accuracy": soak.learner.report["metrics"],
            "rows": [dataclasses.asdict(r) for r in soak.rows],
            "checks": [c._asdict() for c in checks],
        }
        if compared is not None:
            result["accuracy_without_budget"] = compared.learner.report["metrics"]
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    sys.exit(1 if any(c.passed is False for c in checks) else 0)


if __name__ == "__main__":
    main()
