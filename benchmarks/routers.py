"""Task-agnostic inference on the four CL benchmark tasks: every router on the same trained slots.

Trains per-task LoRA slots once (oracle routing), then fits each router on the frozen features of
the tasks' training inputs, in task order, and reports per router: routing accuracy (share of
test inputs sent to their own task), routed ACC, oracle ACC and their ratio.

Run: python benchmarks/routers.py --data-root ../shared/data/cl_benchmark
     [--max-train 500] [--max-test 500] [--epochs 2]
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--max-train", type=int, default=500)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--router-train", type=int, default=0,
        help="fit routers on this many training inputs per task (default: those of the slots)",
    )  # fmt: skip
    args = parser.parse_args()
    stream = load_stream("streams/cl_benchmark.toml", args.data_root, args.max_train, args.max_test)
    config = LearnerConfig(train=TrainConfig(epochs=args.epochs))
    learner = ContinualLearner(config=config, stream=stream.name)
    for task in stream.tasks:
        learner.learn(task)
    oracle = learner.report["metrics"]["oracle"]["acc"]
    fit = stream
    if args.router_train:  # frozen features are cheap next to training: routers may see more
        fit = load_stream("streams/cl_benchmark.toml", args.data_root, args.router_train, 1)
    train_features = [learner.features(task.train_inputs) for task in fit.tasks]
    names = [t.name for t in stream.tasks]
    print(
        f"all-MiniLM-L6-v2, per_task LoRA r=8, {args.max_train}/{args.max_test} examples per "
        f"task, {args.epochs} epochs, routers fitted on {args.router_train or args.max_train} "
        f"inputs per task, order {' -> '.join(names)}, {torch.get_num_threads()} threads"
    )
    print(
        "| router | routing accuracy | routed ACC | oracle ACC | routed / oracle | "
        + " | ".join(f"routing {n}" for n in names)
        + " |"
    )
    print("| --- |" + " ---: |" * (4 + len(names)))
    print(
        f"| oracle | 100.0 | {100 * oracle:.1f} | {100 * oracle:.1f} | 1.000 |"
        + " 100.0 |" * len(names)
    )
    for name, options in ROUTER_OPTIONS.items():
        router = ROUTERS.get(name)(**options)
        for features in train_features:
            router.add_task(features)
        accuracy, routing = learner.routed_accuracy(router)
        acc, route = sum(accuracy) / len(accuracy), sum(routing) / len(routing)
        per_task = " | ".join(f"{100 * r:.1f}" for r in routing)
        print(
            f"| {name} | {100 * route:.1f} | {100 * acc:.1f} | {100 * oracle:.1f} | "
            f"{acc / oracle:.3f} | {per_task} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
