"""Cost of the routed forward against the frozen backbone alone, and against peft's mixed batch.

Every row of the batch uses a different LoRA slot (slot = row mod T), so at most `batch` slots are
in play. Each ratio is the median of back-to-back pairs (this, then the frozen backbone), so
slow drifts of a shared, noisy machine stay out of it.

Run: python benchmarks/routed_forward.py [--slots 1,8,32,128] [--batch 32] [--tokens 128]
peft's row (needs `pip install -e ".[test]"`) uses `adapter_names=`, its mixed-batch inference.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_seconds, paired_ratio

from continual_peft import Backbone, ModuleBank
from continual_peft.backbones.text import default_model_path
from continual_peft.modules.lora import LoRAConfig


def our_bank(slots: int, config: LoRAConfig) -> tuple[Backbone, ModuleBank]:
    """MiniLM with `slots` frozen LoRA slots holding non-zero weights, as after training."""
    backbone = Backbone.from_pretrained(max_length=512)
    bank = ModuleBank(backbone, "lora", config)
    for s in range(slots):
        bank.add_slot(seed=s)
        for site in bank.sites.values():
            torch.nn.init.normal_(site.stack.trainable["lora_B"], std=0.02)
        bank.freeze_slot()
    return backbone, bank


def peft_mixed(slots: int, config: LoRAConfig):
    """peft's model with `slots` adapters, or None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(default_model_path()))
    peft_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=config.targets, init_lora_weights=False
    )
    model = get_peft_model(model, peft_config, adapter_name="t0")
    for s in range(1, slots):
        model.add_adapter(f"t{s}", peft_config)
    return model.eval()  # peft refuses adapter_names in training mode


def measure(slots: int, batch: dict, repeats: int, config: LoRAConfig) -> tuple:
    """(frozen ms, ours / frozen, peft / frozen or None), each ratio timed back to back."""
    backbone, bank = our_bank(slots, config)
    rows = batch["input_ids"].shape[0]
    indices = torch.arange(rows) % slots
    names = [f"t{r % slots}" for r in range(rows)]

    def frozen():
        with bank.base_only():
            backbone(**batch)

    def routed():
        with bank.route(indices):
            backbone(**batch)

    peft_model = peft_mixed(slots, config)
    with torch.no_grad():
        frozen_ms = median_seconds(frozen, repeats) * 1e3
        ours = paired_ratio(routed, frozen, repeats)
        theirs = None
        if peft_model is not None:
            theirs = paired_ratio(lambda: peft_model(**batch, adapter_names=names), frozen, repeats)
    return frozen_ms, ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", default="1,8,32,128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LoRAConfig(r=8, alpha=16, dropout=0.0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.tokens)),
        "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long),
    }
    print(
        f"all-MiniLM-L6-v2, batch {args.batch} x {args.tokens} tokens, LoRA r=8 on query/value, "
        f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}"
    )
    print(f"{'T':>5} {'frozen ms':>10} {'routed/frozen':>14} {'peft/frozen':>12}")
    for slots in [int(s) for s in args.slots.split(",")]:
        frozen_ms, ours, theirs = measure(slots, batch, args.repeats, config)
        peft_ratio = f"{theirs:12.2f}" if theirs is not None else f"{'n/a':>12}"
        print(f"{slots:>5} {frozen_ms:10.1f} {ours:14.2f} {peft_ratio}", flush=True)


if __name__ == "__main__":
    main()
