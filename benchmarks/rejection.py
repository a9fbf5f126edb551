"""Rejection of unknown inputs, measured as the field measures out-of-distribution detection.

Features first: the frozen bundled all-MiniLM-L6-v2's mean-pooled states of every layer, for
each task of two streams (`streams/cl_benchmark.toml`: four tasks of different domains;
`streams/dbpedia_split.toml`: DBpedia's classes as 7 tasks of one domain) and for an
out-of-scope set built from tasks of other domains (CL_Benchmark's NLI, QQP, BoolQA, COPA,
MultiRC and WiC test files: sentence pairs, questions and passages). They are cached
(`--cache`), so every score below is computed on the same rows.

Then, per stream and per score (router, familiarity, layers):
1. calibration held through the stream: the tasks arrive in order, each router with
   `reject_rate` r; after every task, the share of every known task's test inputs rejected.
   Printed: the worst and mean |rate − r| over every (step, task), for thresholds
   recalibrated after every task from the stored held-out rows (what ships), thresholds fixed
   when their task arrived (held-out rows, nothing stored), and thresholds set on the fitted
   rows (the router before issue 27).
2. detection: leave-one-task-out (each task in turn left out of the router; its test inputs are
   the unknown ones) and out-of-scope (every task known; the out-of-scope set is unknown).
   AUROC and FPR at 95 % TPR of the known-vs-unknown score (a row's best familiarity over the
   known tasks; known = positive, scikit-learn's `roc_auc_score`/`roc_curve`), and at the
   configured rate the false-reject rate on known tasks' test inputs and the share of unknown
   inputs rejected.

Run: python benchmarks/rejection.py [--data-root ../shared/data/cl_benchmark]
     [--ood-root ../shared/data/CL_Benchmark] [--fit 2000] [--test 500] [--rates 0.02,0.05]
     [--cache /tmp/rejection-features] [--streams cl_benchmark,dbpedia_split]
     [--detect-rates 0.02] [--score LABEL ...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

from continual_peft import Backbone
from continual_peft.routers import build_router
from continual_peft.routers.base import conformal_rank, held_out_split
from continual_peft.tasks.streams import load_stream

STREAMS = {
    "cl_benchmark": "streams/cl_benchmark.toml",
    "dbpedia_split": "streams/dbpedia_split.toml",
}
# CL_Benchmark tasks of other domains than both streams (news, reviews, Wikipedia abstracts)
OUT_OF_SCOPE = [
    "NLI/MNLI",
    "NLI/RTE",
    "NLI/CB",
    "QQP/QQP",
    "BoolQA/BoolQA",
    "COPA/COPA",
    "MultiRC/MultiRC",
    "WiC/WiC",
]


@torch.no_grad()
def layer_features(backbone: Backbone, inputs: list, batch_size: int = 64) -> torch.Tensor:
    """(N, layers + 1, d) mean-pooled states of the embeddings and of every block."""
    items = backbone.encode(list(inputs)).items
    parts = []
    for start in range(0, len(items), batch_size):
        batch = backbone.collate(items[start : start + batch_size])
        out = backbone.model(**batch, output_hidden_states=True)
        pooled = [backbone.pool(h.float(), batch["attention_mask"]) for h in out.hidden_states]
        parts.append(torch.stack(pooled, dim=1))
    return torch.cat(parts)


def out_of_scope(root: Path, per_task: int) -> list[str]:
    """Up to `per_task` test sentences of each out-of-scope task, a seeded sample."""
    rows = []
    for name in OUT_OF_SCOPE:
        records = json.loads((root / name / "test.json").read_text())
        random.Random(name).shuffle(records)
        rows += [r["sentence"] for r in records[:per_task]]
    return rows


def extract(args: argparse.Namespace) -> None:
    """Compute and cache every feature the benchmark reads (a few minutes on a CPU)."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    backbone = Backbone.from_pretrained(None, 128, "cpu", "float32")
    start = time.perf_counter()
    for name, spec in STREAMS.items():
        target = cache / f"{name}.safetensors"
        if target.exists():
            continue
        stream = load_stream(spec, args.data_root, args.fit, args.test)
        tensors, names = {}, []
        for task in stream.tasks:
            names.append(task.name)
            tensors[f"{task.name}.train"] = layer_features(backbone, task.train_inputs)
            tensors[f"{task.name}.test"] = layer_features(backbone, task.test_inputs)
        save_file(tensors, target, metadata={"tasks": json.dumps(names)})
        print(
            f"{name}: {len(names)} tasks cached ({time.perf_counter() - start:.0f} s)", flush=True
        )
    target = cache / "out_of_scope.safetensors"
    if not target.exists():
        rows = out_of_scope(Path(args.ood_root), args.ood_per_task)
        save_file({"test": layer_features(backbone, rows)}, target)
        print(f"out of scope: {len(rows)} rows cached ({time.perf_counter() - start:.0f} s)")


def load_cache(cache: Path, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = cache / f"{name}.safetensors"
    with safe_open(path, "pt") as handle:
        meta = handle.metadata() or {}
    return json.loads(meta.get("tasks", "[]")), load_file(path)


# ----------------------------------------------------------------------------- scores
# Feature choices: layer depths of MiniLM's 7 hidden states (0: embeddings), side by side.
LAYERS = {"last": [6], "auto": [2, 4, 6]}


def pick(features: torch.Tensor, layers: str) -> torch.Tensor:
    """(N, 7, d) cached states as the (N, width) features of a layer choice."""
    return features[:, LAYERS[layers]].flatten(1)


class Shipped:
    """A router as it ships: its own held-out split, thresholds and familiarity."""

    def __init__(self, name: str, layers: str, rate: float, **options) -> None:
        self.router = build_router(name, reject_rate=rate, layers="last", **options)
        self.layers = layers
        self.frozen: list[torch.Tensor] = []  # thresholds as set when each task arrived

    def add(self, x: torch.Tensor) -> None:
        self.router.block_width = x.shape[2]  # as the engine sets it: the hidden width
        self.router.add_task(pick(x, self.layers))
        self.frozen.append(self.router.thresholds[-1].clone())

    def familiarity(self, x: torch.Tensor) -> torch.Tensor:
        return self.router._familiarity(pick(x, self.layers).double())

    def rejected(self, x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        limits = self.router.thresholds if thresholds is None else thresholds
        return (self.familiarity(x) < limits).all(dim=1)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        return self.router.scores(pick(x, self.layers)).argmax(dim=1)

    def own_thresholds(self) -> torch.Tensor:
        """Each task's threshold set on its own held-out rows alone (not solved together)."""
        router, start, own = self.router, 0, []
        for task, size in enumerate(router.calibration_sizes):
            rows = router.calibration[start : start + size].double()
            start += size
            k = conformal_rank(router.reject_rate, size)
            own.append(router._familiarity(rows)[:, task].kthvalue(k).values)
        return torch.stack(own)

    def state_bytes(self) -> int:
        tensors, _ = self.router.state()
        return sum(t.numel() * t.element_size() for t in tensors.values())


class Reference:
    """A score the project does not ship, calibrated the same way (the same held-out share and
    draw, the k-th smallest familiarity of the held-out rows, each task on its own): per-task
    Gaussians (each task's own Ledoit-Wolf covariance, scikit-learn), or Mahalanobis per
    layer, summed (Lee et al. 2018, without their input perturbation or the weights they fit on
    known outliers)."""

    def __init__(self, kind: str, layers: str, rate: float) -> None:
        self.kind, self.layers, self.rate = kind, layers, rate
        self.per_layer = [
            build_router("mahalanobis", layers="last", familiarity="mahalanobis")
            for _ in LAYERS[layers]
        ]
        self.gaussians: list[tuple[torch.Tensor, torch.Tensor]] = []  # per task: mean, precision
        self.held_out: list[torch.Tensor] = []
        self.thresholds = torch.empty(0, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        fit, held = held_out_split(x, min(1000, int(0.2 * len(x))), len(self.held_out))
        if self.kind == "per_task":
            gaussian = LedoitWolf().fit(pick(fit, self.layers).double().numpy())
            precision = torch.from_numpy(gaussian.precision_)
            self.gaussians.append((torch.from_numpy(gaussian.location_), precision))
        else:
            for depth, router in zip(LAYERS[self.layers], self.per_layer, strict=True):
                router.add_task(fit[:, depth])
        self.held_out.append(held)
        self.thresholds = torch.tensor(
            [
                self.familiarity(h)[:, t].kthvalue(conformal_rank(self.rate, len(h))).values
                for t, h in enumerate(self.held_out)
            ],
            dtype=torch.float64,
        )

    def familiarity(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "per_task":
            z = pick(x, self.layers).double()
            return torch.stack(
                [
                    -(((z - mean) @ precision) * (z - mean)).sum(1)
                    for mean, precision in self.gaussians
                ],
                dim=1,
            )
        pairs = zip(LAYERS[self.layers], self.per_layer, strict=True)
        return sum(router._familiarity(x[:, depth].double()) for depth, router in pairs)

    def rejected(self, x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        return (self.familiarity(x) < self.thresholds).all(dim=1)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        return self.familiarity(x).argmax(dim=1)

    def state_bytes(self) -> int:
        if self.kind == "per_task":
            return sum(p.numel() * 8 for _, p in self.gaussians)
        return sum(r.state()[0]["scatter"].numel() * 8 for r in self.per_layer)


def shipped(name: str, **options):
    return lambda layers, rate: Shipped(name, layers, rate, **options)


# label: (builder, layers). "knn" is every router's default familiarity; the router it sits in
# does not change it (mahalanobis here).
SCORES = {
    "knn, k = 10 (ships)": (shipped("mahalanobis"), "auto"),
    "knn, k = 10, last layer": (shipped("mahalanobis"), "last"),
    "mahalanobis, shared covariance": (shipped("mahalanobis", familiarity="mahalanobis"), "auto"),
    "mahalanobis, shared covariance, last": (
        shipped("mahalanobis", familiarity="mahalanobis"),
        "last",
    ),
    "relative mahalanobis (Ren 2021)": (shipped("mahalanobis", familiarity="relative"), "auto"),
    "prototype (cosine)": (shipped("prototype", familiarity="cosine"), "last"),
    "per-task gaussians": (lambda layers, rate: Reference("per_task", layers, rate), "auto"),
    "mahalanobis per layer, summed (Lee 2018)": (
        lambda layers, rate: Reference("layers", layers, rate),
        "auto",
    ),
    # how much k matters (not a choice: the default stays k = 10)
    "knn, k = 1": (shipped("mahalanobis", knn_k=1), "auto"),
    "knn, k = 50": (shipped("mahalanobis", knn_k=50), "auto"),
}
# the scores section 1 follows through the stream (the shipped ones)
CALIBRATED = (
    "knn, k = 10 (ships)",
    "mahalanobis, shared covariance",
    "relative mahalanobis (Ren 2021)",
    "prototype (cosine)",
)


def auroc_fpr(known: torch.Tensor, unknown: torch.Tensor) -> tuple[float, float]:
    """AUROC and FPR at 95 % TPR of known (positive) against unknown scores (scikit-learn)."""
    labels = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    scores = np.r_[known.numpy(), unknown.numpy()]
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(roc_auc_score(labels, scores)), float(fpr[np.searchsorted(tpr, 0.95)])


def held_through_stream(names, data, rate: float) -> None:
    """Section 1: per score, |measured − rate| over every (step, known task), five ways."""
    generator = torch.Generator().manual_seed(0)
    fit, new = {}, {}  # per task: 80 % of its training rows fit the router, 20 % stay new
    for name in names:
        rows = data[f"{name}.train"]
        order = torch.randperm(len(rows), generator=generator)
        cut = int(0.8 * len(rows))
        fit[name], new[name] = rows[order[:cut]], rows[order[cut:]]
    print(
        f"\nCalibration through the stream, reject_rate {rate}: worst and mean |measured − "
        "rate| over every (step, known task), in points, and the mean measured rate (%). "
        "Routers fit 80 % of each task's training rows; 'new training rows' are the other "
        "20 %, drawn as the fitted ones were; 'test' are the task's test rows.\n"
    )
    print(
        "| score | layers | ships: new training rows | ships: test | each threshold on its "
        "own: test | fixed at arrival: test | on fitted rows (before): test | 1 sd |"
    )
    print("| --- | --- |" + " ---: |" * 6)
    keys = ("ships-new", "ships", "own", "fixed", "old")
    for label, (build, layers) in SCORES.items():
        if label not in CALIBRATED:
            continue
        score, old = build(layers, rate), build(layers, 0.0)
        # the router before issue 27 thresholded its own score on the fitted rows (knn is new)
        before = score.router.familiarity != "knn"
        old_thresholds = []
        gaps: dict[str, list[float]] = {key: [] for key in keys}
        means: dict[str, list[float]] = {key: [] for key in keys}
        for step, name in enumerate(names):
            score.add(fit[name])
            old.add(fit[name])
            if before:
                own = old.familiarity(fit[name])[:, step]
                old_thresholds.append(torch.quantile(own, rate))
            for j in range(step + 1):
                test = data[f"{names[j]}.test"]
                shares = {
                    "ships-new": score.rejected(new[names[j]]),
                    "ships": score.rejected(test),
                    "own": score.rejected(test, score.own_thresholds()),
                    "fixed": score.rejected(test, torch.stack(score.frozen)),
                }
                if before:
                    shares["old"] = old.rejected(test, torch.stack(old_thresholds))
                for key, rejected in shares.items():
                    share = float(rejected.double().mean())
                    gaps[key].append(abs(share - rate))
                    means[key].append(share)
        cells = [
            f"{100 * max(gaps[k]):.1f} / {100 * np.mean(gaps[k]):.1f} "
            f"({100 * np.mean(means[k]):.1f})"
            if gaps[k]
            else "(new)"
            for k in keys
        ]
        sizes = score.router.calibration_sizes
        test_rows = min(len(data[f"{n}.test"]) for n in names)
        spread = math.sqrt(rate * (1 - rate) * (1 / min(sizes) + 1 / test_rows))
        print(f"| {label} | {layers} | {' | '.join(cells)} | {100 * spread:.1f} |", flush=True)


def detection(names, data, oos: torch.Tensor, rate: float) -> None:
    """Section 2: leave-one-task-out and out-of-scope detection per score."""
    print(
        f"\nDetection, reject_rate {rate} (%): AUROC, FPR at 95 % TPR, known-task false "
        "rejects and unknown inputs rejected; leave-one-task-out (mean over the left-out "
        "tasks, worst AUROC in brackets) and out-of-scope\n"
    )
    print(
        "| score | layers | LOTO AUROC | LOTO FPR95 | LOTO false rej. | LOTO unknown rej. "
        "| OOS AUROC | OOS FPR95 | OOS false rej. | OOS unknown rej. | routing acc "
        "| router state per task |"
    )
    print("| --- | --- |" + " ---: |" * 10)
    for label, (build, layers) in SCORES.items():
        loto = []
        for out in range(len(names)):
            score = build(layers, rate)
            known = [n for i, n in enumerate(names) if i != out]
            for name in known:
                score.add(data[f"{name}.train"])
            inside = torch.cat([data[f"{n}.test"] for n in known])
            outside = data[f"{names[out]}.test"]
            auc, fpr = auroc_fpr(
                score.familiarity(inside).amax(1), score.familiarity(outside).amax(1)
            )
            loto.append(
                (
                    auc,
                    fpr,
                    float(score.rejected(inside).double().mean()),
                    float(score.rejected(outside).double().mean()),
                )
            )
        score = build(layers, rate)
        for name in names:
            score.add(data[f"{name}.train"])
        inside = torch.cat([data[f"{n}.test"] for n in names])
        truth = torch.cat([torch.full((len(data[f"{n}.test"]),), i) for i, n in enumerate(names)])
        auc, fpr = auroc_fpr(score.familiarity(inside).amax(1), score.familiarity(oos).amax(1))
        routing = float((score.routed(inside) == truth).double().mean())
        mean = np.mean(loto, axis=0)
        worst = min(r[0] for r in loto)
        cells = [
            f"{mean[0]:.3f} ({worst:.3f})",
            f"{100 * mean[1]:.1f}",
            f"{100 * mean[2]:.1f}",
            f"{100 * mean[3]:.1f}",
            f"{auc:.3f}",
            f"{100 * fpr:.1f}",
            f"{100 * float(score.rejected(inside).double().mean()):.1f}",
            f"{100 * float(score.rejected(oos).double().mean()):.1f}",
            f"{100 * routing:.1f}",
            f"{score.state_bytes() / len(names) / 2**20:.2f} MB",
        ]
        print(f"| {label} | {layers} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--ood-root", default="../shared/data/CL_Benchmark")
    parser.add_argument("--fit", type=int, default=2000, help="training inputs per task")
    parser.add_argument("--test", type=int, default=500, help="test inputs per task")
    parser.add_argument("--ood-per-task", type=int, default=150)
    parser.add_argument("--rates", default="0.02,0.05")
    parser.add_argument("--cache", default="/tmp/rejection-features")
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--streams", default=",".join(STREAMS), help="which streams, by name")
    parser.add_argument(
        "--detect-rates", default=None, help="rates of section 2 (default: --rates)"
    )
    parser.add_argument(
        "--score",
        action="append",
        choices=list(SCORES),
        help="only these scores (repeat the option; default: every one)",
    )
    args = parser.parse_args()
    unknown = set(args.streams.split(",")) - set(STREAMS)
    if unknown:
        parser.error(f"unknown stream(s) {sorted(unknown)}; choose from {list(STREAMS)}")
    for label in set(SCORES) - set(args.score or SCORES):
        del SCORES[label]
    extract(args)
    if args.extract_only:
        return
    cache = Path(args.cache)
    oos = load_file(cache / "out_of_scope.safetensors")["test"]
    rates = [float(r) for r in args.rates.split(",")]
    detect_rates = [float(r) for r in (args.detect_rates or args.rates).split(",")]
    for stream in args.streams.split(","):
        names, data = load_cache(cache, stream)
        sizes = [len(data[f"{n}.train"]) for n in names]
        tests = [len(data[f"{n}.test"]) for n in names]
        print(
            f"\n## {stream}: {len(names)} tasks, training rows {sizes}, test rows {tests}, "
            f"out-of-scope rows {len(oos)}; {torch.get_num_threads()} threads"
        )
        for rate in rates:
            held_through_stream(names, data, rate)
        for rate in detect_rates:
            detection(names, data, oos, rate)


if __name__ == "__main__":
    main()
