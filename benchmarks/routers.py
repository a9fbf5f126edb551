"""Task-agnostic inference: every router on the same trained slots, on two streams, and its cost.

1. `streams/cl_benchmark.toml`: the four shared tasks (AG News, Amazon, Yelp, DBpedia), which
   differ by domain.
2. `streams/dbpedia_split.toml`: DBpedia's 14 classes as 7 two-class tasks, one domain (the hard
   case: tasks differ by topic only).

For each stream, per-task LoRA slots are trained once (oracle routing, `--max-train` examples per
task: 200 by default, the issue's setting). Then each router is fitted on the frozen features of
the tasks' training inputs, in task order, twice:
- "default": as `continual-peft run` fits it now: every training input of the task (at most
  `ROUTER_CAP`), features of the router's default `layers`;
- "slot's, last": the slot's own training inputs, last-layer features (`layers = "last"`).
Reported per router and fit: routing accuracy (share of test inputs sent to their own task),
routed ACC, oracle ACC and their ratio, and the worst task's routing accuracy.

3. Unknown inputs: prototype and mahalanobis with `reject_rate` 0.01, 0.02 and 0.05, fitted
   (default fit) on every task but one; the share of the left-out task's test inputs rejected
   (ideally all) and of the other tasks' test inputs (ideally about reject_rate), averaged over
   the left-out tasks. (The gate rejects by the same Gaussians as mahalanobis.) This section
   does not depend on the slots: `--sections rejection --max-train 8 --epochs 1` is quick.

4. Cost at T = 64 tasks: a routing decision (the frozen forward that reads the router's layers,
   plus the router's own scoring over 64 tasks) against the frozen forward alone (last layer),
   per input, on the same real inputs, timed back to back. The 64 tasks' statistics come from
   the stream's features shifted at random (a decision's cost does not depend on what the
   statistics say); the gate is refitted with few steps, which changes its weights, not its cost.

Run: python benchmarks/routers.py [--data-root ../shared/data/cl_benchmark] [--streams both]
     [--max-train 200] [--max-test 200] [--epochs 2] [--speed-tasks 64]
     [--sections routed,rejection,speed] [--reject-rates 0.01,0.02,0.05]
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import paired_seconds

from continual_peft import ContinualLearner, LearnerConfig, TrainConfig
from continual_peft.routers import build_router
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import ROUTER_CAP

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


def one_stream(spec: str, args: argparse.Namespace) -> ContinualLearner:
    """Train the slots of one stream, then fit and score every router on them."""
    stream = load_stream(spec, args.data_root, args.max_train, args.max_test)
    start = time.perf_counter()
    learner = ContinualLearner(config=LearnerConfig(train=TrainConfig(epochs=args.epochs)))
    for task in stream.tasks:
        learner.learn(task)
    trained = time.perf_counter() - start
    pools = [t.router_inputs or t.train_inputs for t in stream.tasks]
    names = [t.name for t in stream.tasks]
    print(
        f"\n{stream.name}: all-MiniLM-L6-v2, per_task LoRA r=8, {args.max_train}/{args.max_test} "
        f"examples per task, {args.epochs} epochs ({trained:.0f} s), every training input "
        f"(cap {ROUTER_CAP}): {[len(p) for p in pools]}, order {' -> '.join(names)}, "
        f"{torch.get_num_threads()} threads\n"
    )
    cache: dict[tuple[str, str], list[torch.Tensor]] = {}

    def features(fit: str, layers) -> list[torch.Tensor]:
        key = (fit, repr(layers))
        if key not in cache:
            inputs = pools if fit == "default" else [t.train_inputs for t in stream.tasks]
            cache[key] = [learner.features(rows, layers) for rows in inputs]
        return cache[key]

    if "routed" in args.sections:
        routed(learner, features, names, args)
    if "rejection" in args.sections:
        for rate in args.reject_rates:
            rejection(learner, features, names, rate)
    return learner


def routed(learner: ContinualLearner, features, names: list[str], args) -> None:
    """Every router fitted both ways, on the trained slots (see the module docstring)."""
    oracle = learner.report["metrics"]["oracle"]["acc"]
    print(
        "| router | fitted on | layers | routing acc | routed ACC | oracle ACC | routed / oracle "
        "| worst task's routing |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, options in ROUTER_OPTIONS.items():
        for fit in ("default", "slot's, last"):
            last = {} if fit == "default" else {"layers": "last"}
            router = build_router(name, **options, **last)
            for task_features in features(fit, router.layers):
                router.add_task(task_features)
            accuracy, routing = learner.routed_accuracy(router)
            acc, route = sum(accuracy) / len(accuracy), sum(routing) / len(routing)
            worst = min(range(len(routing)), key=routing.__getitem__)
            where = "every input" if fit == "default" else f"{args.max_train} (the slot's)"
            print(
                f"| {name} | {where} | {router.layers} | {100 * route:.1f} | {100 * acc:.1f} | "
                f"{100 * oracle:.1f} | {acc / oracle:.3f} | {100 * routing[worst]:.1f} "
                f"({names[worst]}) |",
                flush=True,
            )


def rejection(learner: ContinualLearner, features, names: list[str], rate: float) -> None:
    """Leave one task out of the router; how many of its test inputs, and of the others', are
    rejected (see the module docstring). The gate rejects by the same Gaussians as
    mahalanobis, so it is left out."""
    states = list(learner.learned.values())
    print(f"\nUnknown inputs: reject_rate {rate}, each task in turn left out of the router\n")
    print("| router | layers | unknown rows rejected | known rows rejected |")
    print("| --- | --- | ---: | ---: |")
    for name in ("prototype", "mahalanobis"):
        unknown, known = [], []
        for out in range(len(names)):
            router = build_router(name, reject_rate=rate)
            fitted = features("default", router.layers)
            for task in range(len(names)):
                if task != out:
                    router.add_task(fitted[task])
            for task, state in enumerate(states):
                _, weights = router.route(learner.predictor.test_features(state, router.layers))
                share = float((weights[:, 0] == 0).double().mean())
                (unknown if task == out else known).append(share)
        print(
            f"| {name} | {router.layers} | {100 * sum(unknown) / len(unknown):.1f} | "
            f"{100 * sum(known) / len(known):.1f} |",
            flush=True,
        )


def speed(learner: ContinualLearner, inputs: list, args: argparse.Namespace) -> None:
    """Per input: features of the router's layers + its decision over T tasks, against the
    frozen forward alone (last layer)."""
    items = learner.backbone.encode(inputs).items
    generator = torch.Generator(device="cpu").manual_seed(0)
    print(
        f"\nCost of a routing decision at T = {args.speed_tasks} tasks, {len(items)} real inputs, "
        f"eval batch {learner.config.train.eval_batch_size}, {torch.get_num_threads()} threads\n"
    )
    print("| router | layers | features | decision / frozen forward | ms per input |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, options in ROUTER_OPTIONS.items():
        if name == "gate":
            options = {**options, "steps": 5, "samples_per_task": 32}  # cost only: see above
        router = build_router(name, **options)
        own = learner.predictor.features(items, router.layers)
        for _ in range(args.speed_tasks):
            shift = torch.randn(own.shape[1], generator=generator, device="cpu") * 0.05
            router.add_task(own[:64] + shift.to(own.device) * own[:64].std())

        def decide(router=router) -> None:
            router.route(learner.predictor.features(items, router.layers))

        def forward() -> None:
            learner.predictor.features(items, "last")

        ratio, top, _ = paired_seconds(decide, forward, repeats=5)
        print(
            f"| {name} | {router.layers} | {own.shape[1]} | {ratio:.3f} | "
            f"{1000 * top / len(items):.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--streams", default="both", choices=["both", *STREAMS])
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--speed-tasks", type=int, default=64)
    parser.add_argument("--sections", default="routed,rejection,speed", help="which to print")
    parser.add_argument("--reject-rates", default="0.01,0.02,0.05", help="for rejection")
    args = parser.parse_args()
    args.sections = args.sections.split(",")
    args.reject_rates = [float(rate) for rate in args.reject_rates.split(",")]
    learner = None
    for name, spec in STREAMS.items():
        if args.streams in ("both", name):
            learner = one_stream(spec, args)
    assert learner is not None
    if "speed" in args.sections:
        inputs = [x for state in learner.learned.values() for x in state.task.test_inputs[:64]]
        speed(learner, inputs[:256], args)


if __name__ == "__main__":
    main()
