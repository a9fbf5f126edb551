"""Data-parallel scaling: training and evaluation examples/s on 1 process and on N (torchrun).

Each configuration is one real `torchrun --standalone --nproc_per_node N -m continual_peft run`
(plain `python -m continual_peft run` for 1 process) of the same stream, spec and global batch,
one after another in this one invocation, so the ratios compare like with like on the same
machine at the same time. From each run's report.json:

- train examples/s = Σ_tasks train_examples · epochs / Σ_tasks train_seconds
- eval examples/s  = rows re-evaluated after each task (every learned task's test set, oracle
  routing, plus the "before" pass of the new task) / Σ_tasks eval_seconds

Rows: `1 proc x T threads` for each T of --threads (the same cores used by threads instead of
processes), then `N procs x 1 thread` for each N of --processes. The ratio column divides by the
first row. Every run must end with the same accuracy matrix as the first (checked and printed).

Default workload: the bundled all-MiniLM-L6-v2 (22.7M parameters), LoRA r = 8 on query/value,
two synthetic keyword tasks of --train examples each, batch 32, max_length 64, 1 epoch.

Run: python benchmarks/distributed.py [--processes 2] [--threads 1,2] [--train 512] [--test 256]
     [--device cpu|cuda] [--backbone PATH] [--batch-size 32] [--epochs 1]
On a machine with G GPUs: --device cuda --processes 1,2,...,G --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = {
    "colors": ["red", "blue", "green", "yellow"],
    "animals": ["cat", "dog", "fish", "bird"],
}
FILLER = ["the", "a", "of", "to", "and", "in", "is", "it", "on", "was", "for", "with", "as"]


def write_stream(root: Path, train: int, test: int) -> Path:
    """Two keyword tasks as JSONL (the label is the keyword a sentence holds) and their spec."""
    rng, blocks = random.Random(0), []
    for name, labels in WORDS.items():
        for split, count in (("train", train), ("test", test)):
            lines = []
            for i in range(count):
                words = [labels[i % len(labels)], *rng.choices(FILLER, k=rng.randint(6, 40))]
                rng.shuffle(words)
                lines.append(
                    json.dumps({"text": " ".join(words), "label": labels[i % len(labels)]})
                )
            path = root / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        blocks.append(
            f'[[tasks]]\nname = "{name}"\ntrain = "{name}/train.jsonl"\n'
            f'test = "{name}/test.jsonl"\n'
        )
    spec = root / "stream.toml"
    spec.write_text('name = "keywords"\n\n' + "\n".join(blocks), encoding="utf-8")
    return spec


def one_run(args, root: Path, processes: int, threads: int) -> dict:
    """One launch; its throughput from report.json, and its wall time."""
    out = root / f"run-{processes}x{threads}"
    options = [
        "run",
        str(root / "stream.toml"),
        "--out",
        str(out),
        "--baseline",
        "none",
        "--module",
        "lora",
        "--rank",
        "8",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        "64",
        "--lr",
        "5e-3",
        "--device",
        args.device,
    ]
    if args.backbone:
        options += ["--backbone", args.backbone]
    command = [sys.executable, "-m", "continual_peft", *options]
    if processes > 1:
        command[1:3] = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            "continual_peft",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    tasks = report["tasks"]
    trained = sum(t["train_examples"] for t in tasks) * args.epochs
    tests = [t["test_examples"] for t in tasks]
    evaluated = sum(sum(tests[: i + 1]) + tests[i] for i in range(len(tests)))
    return {
        "train/s": trained / sum(t["train_seconds"] for t in tasks),
        "eval/s": evaluated / sum(t["eval_seconds"] for t in tasks),
        "wall s": wall,
        "matrix": report["accuracy_matrix"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="2", help="process counts beyond 1, e.g. 2,4")
    parser.add_argument("--threads", default="1,2", help="threads of the 1-process rows")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="")
    args = parser.parse_args()
    rows = [(1, int(t)) for t in args.threads.split(",")]
    rows += [(int(n), 1) for n in args.processes.split(",") if int(n) > 1]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, device {args.device}; {len(WORDS)} tasks x {args.train} "
        f"train / {args.test} test, batch {args.batch_size} (global), {args.epochs} epoch(s)"
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_stream(root, args.train, args.test)
        results = [(n, t, one_run(args, root, n, t)) for n, t in rows]
    first = results[0][2]
    print(
        f"{'configuration':>22} {'train ex/s':>11} {'ratio':>6} {'eval ex/s':>10} {'ratio':>6} "
        f"{'wall s':>7}  same matrix"
    )
    for n, t, r in results:
        name = f"{n} proc{'s' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
        print(
            f"{name:>22} {r['train/s']:>11.1f} {r['train/s'] / first['train/s']:>6.2f} "
            f"{r['eval/s']:>10.1f} {r['eval/s'] / first['eval/s']:>6.2f} {r['wall s']:>7.1f}  "
            f"{r['matrix'] == first['matrix']}"
        )


if __name__ == "__main__":
    main()
