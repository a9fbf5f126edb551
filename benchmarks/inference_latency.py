"""Inference latency of each way to serve a learned task, as a ratio to the frozen backbone.

The seed survey's second first experiment (arXiv 2501.13787): "latency of adapters vs merged
LoRA vs frozen". On the bundled MiniLM, one batch, every row timed back to back with the frozen
forward (`_timing.paired_seconds`, so slow drifts of a shared machine stay out of the ratio):

- frozen: the backbone alone, every module off;
- merged LoRA: a LoRA slot added into a copy of the weights (`integrations.lora_layers.
  merge_lora`), then the plain model: what `export --format merged` serves;
- LoRA (unmerged): every row on one slot, the delta computed beside the frozen weights;
- routed LoRA: rows spread over `--tasks` slots in one forward (each row its own task), and
  the same plus the router's frozen feature pass, which task-agnostic prediction pays first
  (the default router reads the full pass; `docs/routers.md` has a cheaper shallow one);
- every other module kind on one slot (adapter, prompt, prefix, bitfit, ia3, and a hybrid).

Every slot holds non-zero random values (a fresh LoRA's B is zero; a trained one's is not), so
nothing is skipped for being zero. No training, no data: this measures cost only.

Run: python benchmarks/inference_latency.py [--batch 32] [--tokens 128] [--tasks 4]
"""

from __future__ import annotations

import argparse

import torch
from _timing import device_name, paired_seconds

from continual_peft import Backbone, ModuleBank
from continual_peft.integrations.lora_layers import merge_lora
from continual_peft.modules import MODULE_KINDS, WHOLE_METHOD_KINDS

HYBRID = "prefix+adapter"  # strategies/per_task_hybrid.toml


def random_slots(bank: ModuleBank, kind: str, count: int) -> list[int]:
    """`count` frozen slots of `kind` whose every tensor is random and non-zero."""
    slots = []
    for seed in range(count):
        slot = bank.add_slot(seed=seed, kind=kind)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        bank.freeze_slot()
        slots.append(slot)
    return slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.tokens)),
        "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long),
    }
    backbone = Backbone.from_pretrained(max_length=args.tokens)
    backbone.eval()
    bank = ModuleBank(backbone, "lora")
    lora = random_slots(bank, "lora", args.tasks)
    kinds = [k for k in MODULE_KINDS.names() if k not in ("lora", *WHOLE_METHOD_KINDS)]
    others = {kind: random_slots(bank, kind, 1)[0] for kind in [*kinds, HYBRID]}
    ids, mask = batch["input_ids"], batch["attention_mask"]

    merged = Backbone.from_pretrained(max_length=args.tokens)
    state = bank.slot_state(lora[0])
    sites = {}
    for key, tensor in state.items():
        layer, _, name = key.rpartition(".")
        sites.setdefault(layer, {})[name] = tensor
    merge_lora(merged.model, sites)
    merged.eval()
    with torch.no_grad(), bank.use_slot(lora[0]):  # the merged model is the slot, not a guess
        unmerged = backbone(ids, mask)
    torch.testing.assert_close(merged(ids, mask), unmerged, atol=1e-4, rtol=0)

    def run(context) -> callable:
        def forward() -> None:
            with torch.no_grad(), context():
                backbone(ids, mask)

        return forward

    rows = torch.tensor([lora[r % len(lora)] for r in range(args.batch)], device="cpu")

    def routed_with_features() -> None:
        with torch.no_grad():
            with bank.base_only():
                backbone(ids, mask)  # the router's frozen feature pass
            with bank.route(rows):
                backbone(ids, mask)

    def merged_forward() -> None:
        with torch.no_grad():
            merged(ids, mask)

    frozen = run(bank.base_only)
    entries = [
        ("merged LoRA", merged_forward),
        ("LoRA, one slot (unmerged)", run(lambda: bank.use_slot(lora[0]))),
        (f"routed LoRA, rows over {args.tasks} slots", run(lambda: bank.route(rows))),
        ("routed LoRA + router feature pass", routed_with_features),
        *[
            (f"{kind}, one slot", run(lambda s=slot: bank.use_slot(s)))
            for kind, slot in others.items()
        ],
    ]
    threads = torch.get_num_threads()
    where = device_name(torch.device("cpu"))
    print(
        f"all-MiniLM-L6-v2, batch {args.batch} x {args.tokens} tokens, {threads} threads, {where}"
    )
    print("| serving | ms / batch | frozen ms (same pairs) | ratio to frozen |")
    print("| --- | ---: | ---: | ---: |")
    for name, forward in entries:
        ratio, mine, base = paired_seconds(forward, frozen, args.repeats)
        print(f"| {name} | {1000 * mine:.1f} | {1000 * base:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
