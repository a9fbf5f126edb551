"""Route-or-merge on inputs of a task the router never saw (leave-one-task-out).

One `route_or_merge` learner (per-task LoRA slots, the Mahalanobis router at `reject_rate`, the
merged slot) learns every task of a stream. Then each task j in turn is the unknown one: a router
fitted on the other tasks' router inputs only, and a slot merged from the other tasks' slots
only, as if j had never been learned. Task j's test inputs are answered with j's own head (the
only decoder of its labels) under five backbone states, and the accuracy of each is printed:

- own slot: j's own slot (what the task given would get; the ceiling);
- bare: the frozen backbone, no slot;
- per_task + router: the router's pick among the other tasks' slots; a row it rejects gets the
  bare backbone (the alternative route-or-merge replaces);
- route_or_merge: the router's pick, but a rejected row or one whose top-two score gap is below
  `--margin` goes through the merged slot of the other tasks;
- merged: every row through the merged slot of the other tasks.

Run: python benchmarks/route_or_merge.py [--data-root ../shared/data/cl_benchmark]
     [--stream streams/cl_benchmark.toml] [--max-train 200] [--max-test 200] [--epochs 3]
     [--max-length 64] [--lr 2e-3] [--reject-rate 0.02] [--margin 0.0] [--method ties]
     [--density 0.2]
"""

from __future__ import annotations

import argparse
import time

import torch

from continual_peft import ContinualLearner, LearnerConfig
from continual_peft.engine.prediction import routed_predict, task_scores
from continual_peft.engine.state import make_router
from continual_peft.strategies.merge import merged_lora
from continual_peft.tasks.streams import load_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--stream", default="streams/cl_benchmark.toml")
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--reject-rate", type=float, default=0.02)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--density", type=float, default=0.2)
    args = parser.parse_args()
    stream = load_stream(
        args.stream, args.data_root, args.max_train, args.max_test, router_max_train=250
    )
    tasks = stream.tasks
    options = {"margin": args.margin, "method": args.method, "density": args.density}
    config = LearnerConfig.from_dict(
        {
            "strategy": "route_or_merge",
            "strategy_options": options,
            "router": "mahalanobis",
            "router_options": {"reject_rate": args.reject_rate},
            "backbone": {"max_length": args.max_length},
            "train": {"epochs": args.epochs, "batch_size": 16, "lr": args.lr},
        }
    )
    start = time.perf_counter()
    learner = ContinualLearner(config=config)
    for task in tasks:
        learner.learn(task)
    print(f"learned {len(tasks)} tasks in {time.perf_counter() - start:.0f} s")
    layers = learner.router.layers  # the hidden layers the router reads ("auto": several)
    features = {t.name: learner.features(t.router_inputs or t.train_inputs, layers) for t in tasks}
    columns = ["own slot", "bare", "per_task + router", "route_or_merge", "merged"]
    print(f"reject_rate {args.reject_rate}, margin {args.margin}, merge {options}")
    print("| unknown task | " + " | ".join(columns) + " | rejected | fell back |")
    print("| --- |" + " ---: |" * (len(columns) + 2))
    totals = {c: [] for c in columns}
    for state in learner.learned.values():
        row = leave_out(learner, state, features, args)
        for column in columns:
            totals[column].append(row[column])
        cells = " | ".join(f"{100 * row[c]:.1f}" for c in columns)
        print(
            f"| {state.task.name} | {cells} | {100 * row['rejected']:.1f} | "
            f"{100 * row['fell back']:.1f} |"
        )
    means = " | ".join(f"{100 * sum(v) / len(v):.1f}" for v in totals.values())
    print(f"| mean | {means} | | |")


@torch.no_grad()
def leave_out(learner, state, features, args) -> dict[str, float]:
    """Task `state` unknown: accuracies of its test inputs under each backbone state."""
    others = [s for s in learner.learned.values() if s is not state]
    router = make_router(learner.config, learner.backbone)
    for other in others:
        router.add_task(features[other.task.name])
    merged_states, _ = merged_lora(
        [learner.bank.slot_state(s.slot) for s in others],
        method=args.method,
        weight=1.0,
        density=args.density,
        space="delta",
        sign="total",
        slots=1,
        seed=0,
        device=learner.backbone.placement.device,
    )
    merged = learner.bank.load_slot(merged_states[0], "lora")
    try:
        test = learner.predictor.test_features(state, router.layers)
        ranking = router.rank(test, 2 if len(others) > 1 else 1)
        best = ranking.indices[:, 0].cpu()
        top = router.scores(test).double().cpu().topk(min(2, len(others)), dim=1)
        gap = top.values[:, 0] - top.values[:, -1]
        rejected = ranking.rejected.cpu()
        unsure = rejected | ((gap < args.margin) if len(others) > 1 else rejected)
        routed = torch.tensor(
            [others[int(i)].slot if i >= 0 else -1 for i in best], dtype=torch.long, device="cpu"
        )
        own = torch.full_like(routed, state.slot)
        bare = torch.full_like(routed, -1)
        fallback = torch.where(unsure, torch.full_like(routed, merged), routed)
        choices = {
            "own slot": own,
            "bare": bare,
            "per_task + router": routed,
            "route_or_merge": fallback,
            "merged": torch.full_like(routed, merged),
        }
        row = {name: accuracy(learner, state, slots) for name, slots in choices.items()}
    finally:
        learner.bank.truncate(learner.bank.num_slots - 1)  # the temporary merged slot
    row["rejected"] = float(rejected.double().mean())
    row["fell back"] = float(unsure.double().mean())
    return row


def accuracy(learner, state, slots: torch.Tensor) -> float:
    """The task's metric on its test set with its own head, row i through slot `slots[i]`
    (-1: the bare backbone)."""
    weights = (slots >= 0).float()[:, None]
    answers = routed_predict(
        learner.bank,
        learner.heads,
        state.test_items,
        slots=slots[:, None],
        weights=weights,
        head_tasks=[state.task.name] * len(slots),
        batch_size=learner.config.train.eval_batch_size,
    )
    return task_scores(learner.heads.metric(state.task.name), answers, state.task)[0]


if __name__ == "__main__":
    main()
