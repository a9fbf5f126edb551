"""Soak: a long stream of tiny tasks, with memory (resident set, now and peak) against task count.

Each task is a two-label keyword task on a tiny BERT built from a config (no download): per-task
LoRA r=1, a prototype router, 1 epoch, everything written to a run directory after every task,
heatmap PNG included. Memory should stay flat: a task adds a few kB of slot, head and statistics.

Run: python benchmarks/soak.py [--tasks 100] [--out runs/soak]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time

import psutil
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from continual_peft import Backbone, ContinualLearner, LearnerConfig, LoRAConfig, Task, TrainConfig
from continual_peft.backbones.text import default_model_path
from continual_peft.config import BackboneConfig

WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tea", "milk", "car", "bus", "oak", "elm"]
FILLER = ["the", "a", "big", "small", "old", "new", "one", "two", "here", "there", "now"]


def tiny_task(k: int) -> Task:
    """Task k: which of its two keywords a short sentence holds (8 train, 4 test)."""
    rng = random.Random(k)
    labels = rng.sample(WORDS, 2)
    rows = []
    for i in range(12):
        words = [labels[i % 2], *rng.sample(FILLER, 2)]
        rng.shuffle(words)
        rows.append((" ".join(words), labels[i % 2]))
    return Task.from_examples(f"t{k:03d}", train=rows[:8], test=rows[8:], labels=labels)


def tiny_backbone() -> Backbone:
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    return Backbone(model, tokenizer, max_length=16, name="tiny-bert", device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = LearnerConfig(
        router="prototype",
        modules={"lora": LoRAConfig(r=1)},
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0),
        backbone=BackboneConfig(max_length=16),
    )
    out = args.out or tempfile.mkdtemp(prefix="soak-") + "/run"
    learner = ContinualLearner(tiny_backbone(), config=config, run_dir=out)
    process, start = psutil.Process(), time.perf_counter()
    marks = sorted({1, 10, 25, 50, 75, args.tasks} & set(range(1, args.tasks + 1)))
    print(f"tiny BERT (d=32, 2 layers), per_task LoRA r=1, prototype router, 1 thread; run {out}")
    print(f"{'tasks':>6} {'RSS MB':>8} {'peak RSS MB':>12} {'s/task (last)':>14} {'total s':>8}")
    last, last_time = 0, start
    for k in range(args.tasks):
        learner.learn(tiny_task(k))
        if k + 1 in marks:
            now = time.perf_counter()
            rss = process.memory_info().rss / 2**20
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux
            per_task = (now - last_time) / (k + 1 - last)
            print(f"{k + 1:>6} {rss:>8.0f} {peak:>12.0f} {per_task:>14.2f} {now - start:>8.0f}")
            sys.stdout.flush()
            last, last_time = k + 1, now
    learner.finish()
    metrics = learner.report["metrics"]
    print(
        f"final: oracle ACC {metrics['oracle']['acc']:.3f}, routed ACC "
        f"{metrics['routed']['acc']:.3f}, oracle forgetting {metrics['oracle']['forgetting']:.3f}"
    )


if __name__ == "__main__":
    main()
