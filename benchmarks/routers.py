"""Task-agnostic inference: every router on the same trained slots, on two streams.

1. `streams/cl_benchmark.toml`: the four shared tasks (AG News, Amazon, Yelp, DBpedia), which
   differ by domain.
2. `streams/dbpedia_split.toml`: DBpedia's 14 classes as 7 two-class tasks, one domain (the hard
   case: tasks differ by topic only).

For each stream, per-task LoRA slots are trained once (oracle routing, `--max-train` examples per
task: 200 by default, the issue's setting). Then each router is fitted on the frozen features of
the tasks' training inputs, in task order, twice: on the slot's own training inputs, and on every
training input of the task (at most `--router-cap` per task; frozen features cost one forward
pass and no training). Reported per router and fit: routing accuracy (share of test inputs sent
to their own task), routed ACC, oracle ACC and their ratio.

Run: python benchmarks/routers.py [--data-root ../shared/data/cl_benchmark] [--streams both]
     [--max-train 200] [--max-test 200] [--epochs 2] [--router-cap 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from continual_peft import ContinualLearner, LearnerConfig, TrainConfig
from continual_peft.routers import ROUTERS
from continual_peft.tasks.streams import load_stream

ROUTER_OPTIONS = {
    "prototype": {},
    "mahalanobis": {},
    "gate": {},
    "topk": {"base": "mahalanobis", "k": 2},
}
STREAMS = {
    "cl_benchmark": "streams/cl_benchmark.toml",
    "dbpedia_split": "streams/dbpedia_split.toml",
}


def one_stream(spec: str, args: argparse.Namespace) -> None:
    """Train the slots of one stream, then fit and score every router on them."""
    stream = load_stream(spec, args.data_root, args.max_train, args.max_test)
    start = time.perf_counter()
    learner = ContinualLearner(config=LearnerConfig(train=TrainConfig(epochs=args.epochs)))
    for task in stream.tasks:
        learner.learn(task)
    trained = time.perf_counter() - start
    oracle = learner.report["metrics"]["oracle"]["acc"]
    every = load_stream(spec, args.data_root, args.router_cap, 1)  # every training input, capped
    fits = {
        f"{args.max_train} (the slot's)": [learner.features(t.train_inputs) for t in stream.tasks],
        f"all (<= {args.router_cap})": [learner.features(t.train_inputs) for t in every.tasks],
    }
    sizes = [len(t.train_inputs) for t in every.tasks]
    names = [t.name for t in stream.tasks]
    print(
        f"\n{stream.name}: all-MiniLM-L6-v2, per_task LoRA r=8, {args.max_train}/{args.max_test} "
        f"examples per task, {args.epochs} epochs ({trained:.0f} s), every training input: "
        f"{sizes}, order {' -> '.join(names)}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| router | fitted on | routing acc | routed ACC | oracle ACC | routed / oracle | "
        "worst task's routing |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, options in ROUTER_OPTIONS.items():
        for fit, features in fits.items():
            router = ROUTERS.get(name)(**options)
            for task_features in features:
                router.add_task(task_features)
            accuracy, routing = learner.routed_accuracy(router)
            acc, route = sum(accuracy) / len(accuracy), sum(routing) / len(routing)
            worst = min(range(len(routing)), key=routing.__getitem__)
            print(
                f"| {name} | {fit} | {100 * route:.1f} | {100 * acc:.1f} | {100 * oracle:.1f} | "
                f"{acc / oracle:.3f} | {100 * routing[worst]:.1f} ({names[worst]}) |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--streams", default="both", choices=["both", *STREAMS])
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--router-cap", type=int, default=10000)
    args = parser.parse_args()
    for name, spec in STREAMS.items():
        if args.streams in ("both", name):
            one_stream(spec, args)


if __name__ == "__main__":
    main()
