"""Load test of `continual-peft serve`: throughput and p50/p99 latency for 1..64 concurrent clients,
with and without dynamic batching, with the texts drawn from one task or from every task.

Loopback only, bounded: each (batching, spread, clients) cell sends requests of one text each for
`--seconds` (and at most `--max-requests`), every client waiting for its answer before it asks
again. The server is a real `continual-peft serve` process (torch on `--server-threads`
threads); the clients share the same machine, so on a small CPU they compete with it: compare
cells of one run, not absolute numbers across machines.

    no batching: --batch-wait-ms 0 --max-batch 1    (one forward per request)
    batching:    --batch-wait-ms 5 --max-batch 64   (the server's defaults)

Run: python benchmarks/serve_load.py [--run RUN] [--clients 1,4,16,64] [--seconds 8]
Without --run it first trains a small run on the shared four tasks (bundled MiniLM, Mahalanobis
router, 64 training rows per task, one epoch) into a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _timing import device_name

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "cl_benchmark"
STREAM = HERE.parent / "streams" / "cl_benchmark.toml"
BATCHING = {"off": ["--batch-wait-ms", "0", "--max-batch", "1"], "on": []}


def train_run(folder: Path) -> Path:
    """A small routed run on the shared four tasks (a few minutes on two cores)."""
    run = folder / "run"
    command = [
        *[sys.executable, "-m", "continual_peft", "run", str(STREAM)],
        *["--data-root", str(DATA), "--out", str(run), "--router", "mahalanobis"],
        *["--max-train", "64", "--max-test", "32", "--epochs", "1", "--baseline", "none"],
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return run


def test_texts(per_task: int = 64) -> dict[str, list[str]]:
    """Texts from each shared task's test file."""
    texts = {}
    for task in sorted(p.name for p in DATA.iterdir() if p.is_dir()):
        with open(DATA / task / "test.jsonl", encoding="utf-8") as lines:
            rows = [json.loads(line) for _, line in zip(range(per_task), lines, strict=False)]
        texts[task] = [row["text"] for row in rows]
    return texts


class Server:
    """A `continual-peft serve` process on a free loopback port."""

    def __init__(self, run: Path, options: list[str], threads: int) -> None:
        command = [sys.executable, "-m", "continual_peft", "serve", str(run), "--port", "0"]
        command += ["--threads", str(threads), "--log-level", "warning", *options]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        for line in self.process.stderr:
            if " at http://" in line:
                self.url = line.rsplit(" at ", 1)[1].strip()
                return
        raise SystemExit("the server did not start")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)


async def load(url: str, texts: list[str], clients: int, seconds: float, cap: int) -> dict:
    """Requests per second and latency percentiles (ms) of `clients` closed-loop clients."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, seed: int) -> None:
        nonlocal failures
        pick = random.Random(seed)
        while time.perf_counter() < deadline and len(latencies) + failures < cap:
            started = time.perf_counter()
            response = await http.post(f"{url}/predict", json={"texts": [pick.choice(texts)]})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await http.post(f"{url}/predict", json={"texts": texts[:1]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(http, seed) for seed in range(clients)))
        elapsed = time.perf_counter() - started
    ms = sorted(1000 * x for x in latencies)
    return {
        "requests": len(ms),
        "failed": failures,
        "per_second": len(ms) / elapsed,
        "p50": statistics.median(ms) if ms else float("nan"),
        "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A routed run to serve (default: train one).")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="Per cell.")
    parser.add_argument("--max-requests", type=int, default=20_000, help="Per cell.")
    parser.add_argument("--server-threads", type=int, default=1)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    texts = test_texts()
    spreads = {
        "1 task": texts[sorted(texts)[0]],
        "all tasks": [t for v in texts.values() for t in v],
    }
    with tempfile.TemporaryDirectory() as folder:
        run = args.run or train_run(Path(folder))
        checkpoint = json.loads((run / "checkpoint.json").read_text())
        if checkpoint["status"] != "finished":
            raise SystemExit(f"{run} is not finished ({checkpoint['status']}); resume it first")
        tasks = len(checkpoint["tasks"])
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        print(
            f"machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} CPU(s); server "
            f"torch threads {args.server_threads}; run: {tasks} tasks, MiniLM, one text per "
            f"request, {args.seconds:g} s per cell"
        )
        print(
            f"{'batching':>8} {'texts from':>10} {'clients':>7} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'rows/forward':>12} {'failed':>6}"
        )
        for mode, options in BATCHING.items():
            server = Server(run, options, args.server_threads)
            try:
                for spread, pool in spreads.items():
                    for clients in levels:
                        before = _batches(server.url)
                        cell = asyncio.run(
                            load(server.url, pool, clients, args.seconds, args.max_requests)
                        )
                        after = _batches(server.url)
                        rows = (after[1] - before[1]) / max(1.0, after[0] - before[0])
                        print(
                            f"{mode:>8} {spread:>10} {clients:>7} {cell['per_second']:>8.1f} "
                            f"{cell['p50']:>8.1f} {cell['p99']:>8.1f} {rows:>12.1f} "
                            f"{cell['failed']:>6}"
                        )
            finally:
                code = server.stop()
            print(f"server ({mode}) exited {code} on SIGTERM")
        print(f"load average after: {os.getloadavg()[0]:.2f} (other processes share the CPUs)")


def _batches(url: str) -> tuple[float, float]:
    """(forwards, rows) the server has counted so far."""
    text = httpx.get(f"{url}/metrics").text
    found = {}
    for line in text.splitlines():
        for name in ("continual_peft_batch_rows_count", "continual_peft_batch_rows_sum"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    return found.get("continual_peft_batch_rows_count", 0.0), found.get(
        "continual_peft_batch_rows_sum", 0.0
    )


if __name__ == "__main__":
    main()
