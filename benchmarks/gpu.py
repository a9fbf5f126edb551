"""GPU figures in one run: routed forward vs frozen vs peft, LoRA training vs peft, end to end.

Measures what `../shared/tools/gpu/perf.py` measures, so the figures compare:
random-weight TinyLlama-1.1B and BERT-large shapes, batch 32 x 512 tokens, LoRA r = 16 (alpha 32)
on every linear layer, every row of the batch on a different slot (slot = row mod T).

1. Routed forward / frozen forward of the same model, T = 1, 8, 32, 128 slots: ours with the
   default precision (`dtype = "auto"`: bfloat16 weights on a CUDA device with bfloat16) and with
   float32 weights; peft's mixed batch (`adapter_names=`, bfloat16 weights) for T = 1, 8, 32.
2. LoRA training tokens/s, ours (default precision) and peft's (bfloat16 weights), same model,
   batch, rank and targets, with achieved TFLOP/s and its share of the GPU's dense bf16 peak.
   Model FLOPs per token of a step with FROZEN weights: 2·P forward + 2·P backward (input
   gradients only: frozen weights get no weight gradients) + 12·n_layers·seq·d for attention
   scores and values (forward 4·seq·d, backward twice that), P = parameters in linear layers.
3. Peak GPU memory of each training step.
4. With `--run-demo SPEC --data-root DIR`: wall time of `continual-peft run SPEC` on this device.

Every time is the median of several runs after warm-up, each bracketed by
`torch.cuda.synchronize()`; each ratio pairs numbers from the same run and model.

Run: python benchmarks/gpu.py [--quick] [--device cuda|cpu] [--run-demo streams/cl_benchmark.toml
--data-root ../shared/data/cl_benchmark]. `--device cpu` uses tiny shapes: a dry run of the
script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from continual_peft import Backbone, ModuleBank
from continual_peft.backbones.placement import pick_device
from continual_peft.errors import ContinualPeftError
from continual_peft.modules.lora import LoRAConfig

# dense bf16 peak (no sparsity), TFLOP/s, from the vendor data sheets
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 5, warm: int = 2) -> float:
    """Median seconds of `fn` after `warm` runs."""
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shape_config(shape: str, small: bool):
    from transformers import BertConfig, LlamaConfig

    if shape == "bert-large":
        return BertConfig(
            hidden_size=64 if small else 1024,
            num_hidden_layers=2 if small else 24,
            num_attention_heads=4 if small else 16,
            intermediate_size=128 if small else 4096,
            vocab_size=30522,
            max_position_embeddings=512,
        )
    return LlamaConfig(
        hidden_size=64 if small else 2048,
        intermediate_size=128 if small else 5632,
        num_hidden_layers=2 if small else 22,
        num_attention_heads=4 if small else 32,
        num_key_value_heads=2 if small else 4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModel

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(shape_config(shape, torch.device(device).type == "cpu"))
    return model.to(dtype).eval()


def make_batch(device: str, rows: int, tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(100, 29_000, (rows, tokens), generator=generator, device="cpu")
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def flops_per_token(model, tokens: int) -> float:
    """Model FLOPs of one token of a LoRA training step with frozen weights (module docstring)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    attention = 12 * config.num_hidden_layers * tokens * config.hidden_size
    return 4.0 * linear + attention


def peak_share(tflops: float, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peak is None else round(tflops / peak, 4)


def ours(shape: str, dtype_name: str, slot_counts: list[int], args) -> None:
    """Routed forward ratios and a training step through the library's own Backbone/ModuleBank."""
    device = args.device
    model = build_model(shape, device, torch.float32)
    flops = flops_per_token(model, args.tokens)
    backbone = Backbone(
        model, None, max_length=args.tokens, name=shape, device=device, dtype=dtype_name
    )
    label = f"ours/{dtype_name}({backbone.dtype})"
    batch = make_batch(device, args.rows, args.tokens)
    config = LoRAConfig(r=16, alpha=32.0, dropout=0.0, targets=["all-linear"])
    bank = ModuleBank(backbone, "lora", config)

    def frozen():
        with torch.no_grad(), bank.base_only():
            backbone(**batch)

    base = timed(frozen, device)
    emit(
        system=label,
        shape=shape,
        what="frozen_forward",
        ms=round(base * 1e3, 3),
        tok_s=round(args.rows * args.tokens / base),
    )
    made = 0
    for slots in slot_counts:
        while made < slots:
            bank.add_slot(seed=made)
            for site in bank.sites.values():
                torch.nn.init.normal_(site.stack.trainable["lora_B"], std=0.02)
            bank.freeze_slot()
            made += 1
        indices = torch.arange(args.rows, device="cpu") % slots

        def routed(indices=indices):
            with torch.no_grad(), bank.route(indices):
                backbone(**batch)

        seconds = timed(routed, device)
        emit(
            system=label,
            shape=shape,
            what="routed_forward",
            T=slots,
            ratio=round(seconds / base, 3),
            ms=round(seconds * 1e3, 3),
        )
    train_step(label, shape, backbone, bank, batch, flops, args)


def train_step(label, shape, backbone, bank, batch, flops, args) -> None:
    device = args.device
    slot = bank.add_slot(seed=999)
    params = bank.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    backbone.train()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        with bank.use_slot(slot):
            loss = backbone(**batch).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, device)
    report_training(label, shape, seconds, flops, sum(p.numel() for p in params), args)


def report_training(label, shape, seconds, flops, trainable, args) -> None:
    tokens = args.rows * args.tokens
    tflops = tokens * flops / seconds / 1e12
    on_gpu = args.torch_device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(args.torch_device) / 2**30 if on_gpu else 0.0
    share = peak_share(tflops, args.torch_device)
    emit(
        system=label,
        shape=shape,
        what="train_step",
        ms=round(seconds * 1e3, 3),
        tok_s=round(tokens / seconds),
        tflops=round(tflops, 2),
        peak_share=share,
        trainable=trainable,
        peak_gb=round(peak, 2),
    )


def peft_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def peft_side(shape: str, slot_counts: list[int], args) -> None:
    from peft import LoraConfig, get_peft_model

    device = args.device
    dtype = peft_dtype(device)
    model = build_model(shape, device, dtype)
    batch = make_batch(device, args.rows, args.tokens)

    def frozen():
        with torch.no_grad():
            model(**batch)

    base = timed(frozen, device)
    label = f"peft({dtype})"
    emit(system=label, shape=shape, what="frozen_forward", ms=round(base * 1e3, 3))
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    wrapped = get_peft_model(model, config, adapter_name="t0").eval()
    made = 1
    for slots in slot_counts:
        while made < slots:
            wrapped.add_adapter(f"t{made}", config)
            made += 1
        names = [f"t{r % slots}" for r in range(args.rows)]

        def routed(names=names):
            with torch.no_grad():
                wrapped(**batch, adapter_names=names)

        seconds = timed(routed, device)
        emit(
            system=label,
            shape=shape,
            what="routed_forward",
            T=slots,
            ratio=round(seconds / base, 3),
            ms=round(seconds * 1e3, 3),
        )


def peft_training(shape: str, args) -> None:
    from peft import LoraConfig, get_peft_model

    device = args.device
    dtype = peft_dtype(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, device, dtype)
    flops = flops_per_token(model, args.tokens)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    wrapped = get_peft_model(model, config).train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(device, args.rows, args.tokens)

    def step():
        loss = wrapped(**batch).last_hidden_state.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, device)
    report_training(f"peft({dtype})", shape, seconds, flops, sum(p.numel() for p in params), args)


def run_demo(args) -> None:
    """Wall time of one `continual-peft run` on this device (the library end to end)."""
    command = [
        sys.executable,
        "-m",
        "continual_peft",
        "run",
        args.run_demo,
        "--device",
        args.device,
        "--out",
        args.demo_out,
        *args.demo_args,
    ]
    if args.data_root:
        command += ["--data-root", args.data_root]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
    emit(
        what="end_to_end_run",
        spec=args.run_demo,
        seconds=round(seconds, 1),
        exit_code=done.returncode,
        output_tail=tail,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="T = 1, 8, 32 only")
    parser.add_argument("--shapes", default="tinyllama,bert-large")
    parser.add_argument("--run-demo", default=None, help="a stream spec to run end to end")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--demo-out", default="runs/gpu-benchmark")
    parser.add_argument("--demo-args", nargs="*", default=[])
    args = parser.parse_args()
    try:
        args.torch_device = pick_device(args.device)  # cpu or a CUDA device of this machine
    except ContinualPeftError as err:
        sys.exit(f"error: {err}")
    args.device = str(args.torch_device)
    small = args.torch_device.type == "cpu"  # a dry run of this script, not a measurement
    args.rows, args.tokens = (4, 16) if small else (32, 512)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use TF32, as peft users' would
    slots = [1, 8, 32] if args.quick else [1, 8, 32, 128]
    gpu = "cpu (dry run)" if small else torch.cuda.get_device_name(args.torch_device)
    emit(torch=torch.__version__, device=gpu, rows=args.rows, tokens=args.tokens)
    # the default precision; on the CPU dry run bfloat16 stands in for it, so that path runs too
    default = "bfloat16" if small else "auto"
    for shape in args.shapes.split(","):
        for name, fn, fn_args in [
            ("peft", peft_side, (shape, [1, 8, 32])),
            ("peft-training", peft_training, (shape,)),
            (f"ours-{default}", ours, (shape, default, slots)),
            ("ours-float32", ours, (shape, "float32", slots)),
        ]:
            try:
                fn(*fn_args, args)
            except Exception as err:  # one broken path must not hide the others' figures
                emit(error=f"{name} {shape}: {type(err).__name__}: {err}"[:600])
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.run_demo:
        run_demo(args)


if __name__ == "__main__":
    main()
