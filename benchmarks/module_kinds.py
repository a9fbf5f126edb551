"""Module kinds side by side on MiniLM: size, training and inference cost, and accuracy.

The seed survey's first experiment (arXiv 2501.13787: every family of PEFT against a linear
probe). For every registered module kind, a hybrid slot (`prefix+adapter`, the MAM adapter's
recipe) and the `linear_probe` strategy (the head alone, no module), in one run on the same
machine:
- trainable parameters per task (the slot plus a 4-way head);
- training step time / the frozen backbone's forward+backward (gradients taken w.r.t. the input
  embeddings, the least any method that backpropagates through the backbone must pay; the
  linear probe needs no backward through the backbone at all);
- inference time / the frozen backbone's forward;
- oracle ACC after learning the four shared CL benchmark tasks with a small budget (per_task),
  each with the settings of its spec (`strategies/per_task_<kind>.toml`, `per_task_hybrid.toml`,
  `linear_probe.toml`: learning rates included), and the seconds that training took.

Run: python benchmarks/module_kinds.py --data-root ../shared/data/cl_benchmark
     [--kinds lora,adapter,...,linear_probe] [--max-train 200] [--max-test 200] [--epochs 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _timing import paired_ratio

from continual_peft import Backbone, ContinualLearner, LearnerConfig, ModuleBank, load_strategy_spec
from continual_peft.modules import MODULE_KINDS, WHOLE_METHOD_KINDS
from continual_peft.tasks.streams import load_stream

PROBE = "linear_probe"  # a strategy, not a kind: the head alone on the frozen backbone
HYBRID = "prefix+adapter"
SPECS = {HYBRID: "per_task_hybrid", PROBE: "linear_probe"}  # else per_task_<kind>
ENTRIES = [k for k in MODULE_KINDS.names() if k not in WHOLE_METHOD_KINDS] + [HYBRID, PROBE]


def kind_costs(kind: str, batch: dict) -> tuple[int, float, float]:
    """(trainable parameters, train step / frozen fwd+bwd, inference / frozen forward).

    The frozen references run on the same backbone with every module off (`base_only`), back to
    back with the kind's own step; the frozen backward goes to the input embeddings, the least
    any method that backpropagates through the backbone must pay.
    """
    backbone = Backbone.from_pretrained(max_length=batch["input_ids"].shape[1])
    probe = kind == PROBE
    bank = ModuleBank(backbone, "lora" if probe else kind)  # the probe: no slot ever opens
    slot = None if probe else bank.add_slot(seed=0)
    head = torch.nn.Linear(backbone.hidden_size, 4)
    params = bank.trainable_parameters() + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    labels = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def using():  # the kind's slot, or (the probe) no module
        return bank.base_only() if probe else bank.use_slot(slot)

    def step():
        with using(), torch.set_grad_enabled(not probe):
            pooled = backbone.embed(batch)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def frozen_step():
        embeds = backbone.model.get_input_embeddings()(ids).detach().requires_grad_()
        with bank.base_only():
            backbone.model(
                inputs_embeds=embeds, attention_mask=mask
            ).last_hidden_state.sum().backward()

    def infer():
        with torch.no_grad(), using():
            backbone(ids, mask)

    def frozen_infer():
        with torch.no_grad(), bank.base_only():
            backbone(ids, mask)

    train = paired_ratio(step, frozen_step)
    return sum(p.numel() for p in params), train, paired_ratio(infer, frozen_infer)


def accuracy(kind: str, args: argparse.Namespace) -> tuple[float, float]:
    """(oracle ACC, seconds of training over the stream)."""
    stream = load_stream("streams/cl_benchmark.toml", args.data_root, args.max_train, args.max_test)
    # each kind with its own spec file's settings (prompts and prefixes need larger learning rates)
    spec = Path(f"strategies/{SPECS.get(kind, f'per_task_{kind}')}.toml")
    config = load_strategy_spec(spec) if spec.exists() else LearnerConfig(module=kind)
    config.train.epochs = args.epochs
    config.backbone.max_length = args.max_length
    learner = ContinualLearner(config=config, stream=stream.name)
    for task in stream.tasks:
        learner.learn(task)
    seconds = sum(record["train_seconds"] for record in learner.records)
    return learner.report["metrics"]["oracle"]["acc"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(ENTRIES))
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, args.max_length)),
        "attention_mask": torch.ones(16, args.max_length, dtype=torch.long),
    }
    threads = torch.get_num_threads()
    print(f"all-MiniLM-L6-v2, batch 16 x {args.max_length} tokens, {threads} threads")
    budget = f"{args.max_train} train / {args.max_test} test per task, {args.epochs} epochs"
    print(f"accuracy: per_task, oracle routing, 4 CL benchmark tasks, {budget}\n")
    print("| kind | trainable params / task | train step / frozen fwd+bwd | ", end="")
    print("inference / frozen fwd | ACC | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in args.kinds.split(","):
        params, train, infer = kind_costs(kind, batch)
        acc, seconds = ("skipped", "") if args.skip_accuracy else accuracy(kind, args)
        shown = acc if args.skip_accuracy else f"{100 * acc:.1f} | {seconds:.0f}"
        ratios = f"{train:.2f} | {infer:.2f}"
        print(f"| {kind} | {params:,} | {ratios} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
