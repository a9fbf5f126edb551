"""Quantized frozen backbones: weight memory, a LoRA step's peak memory, and speed vs peft's QLoRA.

One random-weight Llama-shaped model is saved to a temporary folder (or `--folder`), then loaded
three ways, `quantize` none / 8bit / 4bit (`backbones.quantization`: bitsandbytes through
transformers' `BitsAndBytesConfig`; 4bit is NF4 with double quantization). Each setting runs in
two subprocesses of its own, one for its memory and one for its speed, so that nothing measured
shows in another measurement. Each loads the folder twice: our
`Backbone.from_pretrained(..., quantization=...)` with a `ModuleBank` LoRA slot, and a peft twin,
`AutoModelForCausalLM.from_pretrained` with the same `BitsAndBytesConfig` (our
`Quantization.hf_config`), wrapped by `get_peft_model` with the same rank, alpha and targets
(QLoRA's recipe without `prepare_model_for_kbit_training`, whose gradient checkpointing and
float32 norms would make it another computation). A training step, ours or peft's: the mean
cross-entropy of 3 target tokens + EOS after each prompt (`CausalBackbone.target_loss`; peft's
model gets the same inputs), backward, AdamW step.

1. Frozen weights: `memory_bytes` (transformers' `get_memory_footprint`: parameters and buffers,
   plus the quantization scales bitsandbytes keeps beside a weight, which it leaves out: 8-bit,
   a float32 scale per output row; 4-bit, the block absmax and its nested scales; the report's
   figure) and its ratio to none, and the scales alone; "predicted" is the per-weight formula of
   the README's memory table on this model's counts: 1 byte (8-bit) or 0.5 byte + 0.127 bit
   (NF4, double quantization) per quantized linear weight, the rest in the compute dtype. On a
   CPU, what the process holds after loading and one step: its anonymous RSS growth (heap:
   quantized weights, the slot, AdamW's state) and the resident pages of the model folder's
   files that it maps (transformers maps safetensors files and keeps full-precision tensors as
   views of the mapping). On CUDA: the allocator's growth.
2. Peak memory of a training step above what is resident before it, after one warm-up step
   (which touches lazily mapped weights and creates AdamW's moments): the higher of two
   steps, measured for ours and peft's alternately 3 times, median. On a CPU: the process's
   peak RSS (Linux `VmHWM`, the high-water mark `getrusage`'s `ru_maxrss` reports, reset just
   before the steps through `/proc/self/clear_refs`, after `malloc_trim` has handed freed heap
   back, so that a step cannot hide in memory freed earlier) minus the RSS before the steps,
   with glibc's mmap threshold fixed at 128 KiB in that subprocess (`MALLOC_MMAP_THRESHOLD_`:
   freed tensors go back to the OS, so the RSS follows the live ones; `run_setting`).
   On CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` before the steps.
3. Training throughput, ours and peft's, and the ratio of their step times: the median of
   back-to-back pairs (`_timing.paired_seconds`), so slow drifts of a shared machine stay out
   of it; likewise our quantized step against ours on the same model unquantized, loaded
   beside it. Rows/s across settings come from separate subprocesses, not from pairs.

After the memory steps, a guard copies our trained slot into peft's adapter and checks that both
give the same loss (the same quantized weights, inputs and LoRA), and that the slot moves it.

Shapes: `--quick` (hidden 512, 2 layers, vocab 2048; about 2 minutes on the shared 2-core CPU,
half of it six subprocesses importing torch and transformers) and the default (hidden 1024, 4
layers, vocab 4096; about 4 minutes). Head dim 64, no grouped KV heads, intermediate 11/4 x
hidden (Llama-2's shape), untied LM head. On a CPU the compute dtype is float32 and one thread is
the default; on CUDA bfloat16 (`dtype = "auto"`), and peft's adapters keep the model's dtype
(`autocast_adapter_dtype=False`), as our slots do.

Run: python benchmarks/quantization.py [--quick] [--device cpu|cuda] [--settings none,8bit,4bit]
     [--rows 4] [--tokens 64] [--rank 16] [--repeats 5] [--threads 1] [--folder DIR]
Needs the quant and test extras (`pip install -e ".[test,quant]"`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model is saved here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _timing import device_name, paired_seconds, resolve_device  # noqa: E402

SHAPES = {
    "quick": {"hidden_size": 512, "num_hidden_layers": 2, "vocab_size": 2048},
    "default": {"hidden_size": 1024, "num_hidden_layers": 4, "vocab_size": 4096},
}
SETTINGS = ("none", "8bit", "4bit")
TARGET_TOKENS = 3  # each row's target: this many tokens, then EOS
EOS = 3  # word_tokenizer's "</s>"
FIRST_ID = 16  # token ids are drawn past the tokenizer's special ids
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + an 8-bit absmax per 64 weights + a float32 per 256 of those
MIB = 2**20
ROUNDS = 3  # memory: ours' and peft's steps measured alternately this many times, median
MARK = "RESULT "  # a child's result line starts with this


# ---------------------------------------------------------------- the model folder


def llama_config(shape: dict):
    """A Llama config of `shape`: head dim 64, no grouped KV heads, intermediate 11/4 x hidden."""
    from transformers import LlamaConfig

    hidden = shape["hidden_size"]
    return LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=EOS,
    )


def save_model(folder: Path, shape: dict) -> Path:
    """Save a seeded random Llama of `shape` and a word tokenizer of its vocabulary to `folder`."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from continual_peft.backbones.tiny import PUNCTUATION, SPECIAL, word_tokenizer

    words = shape["vocab_size"] - len(SPECIAL) - len(PUNCTUATION)
    tokenizer = word_tokenizer([f"w{i}" for i in range(words)])
    assert len(tokenizer) == shape["vocab_size"], "the tokenizer must fill the vocabulary"
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    LlamaForCausalLM(llama_config(shape)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- memory, on the CPU and CUDA


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Memory:
    """Resident bytes now and the peak since `reset`: the process's RSS on a CPU (Linux), the
    CUDA allocator's on a GPU. None where this OS cannot tell them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    def now(self, field: str = "VmRSS") -> int | None:
        """Resident bytes: on a CPU the `/proc/self/status` field (VmRSS: all; RssAnon: heap
        and other anonymous memory; RssFile: mapped files' pages)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self._trim is not None:
            self._trim(0)  # freed heap back to the OS, so RSS counts what is held
        kib = _status_kib(field)
        return None if kib is None else kib * 1024

    def reset(self) -> bool:
        """Start the peak afresh at what is resident now; False where it cannot."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
                refs.write("5")  # VmHWM (and ru_maxrss) back to the current RSS
        except OSError:
            return False
        return True

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        kib = _status_kib("VmHWM")
        return None if kib is None else kib * 1024


def step_peak(step, memory: Memory, steps: int = 2) -> int | None:
    """The peak bytes above the resident ones while `steps` training steps run."""
    before = memory.now()
    if not memory.reset():
        return None
    for _ in range(steps):
        step()
    peak = memory.peak()
    return None if before is None or peak is None else max(peak - before, 0)


def median_or_none(values: list[int | None]) -> float | None:
    return None if None in values else statistics.median(values)


def mapped_bytes(folder: str) -> int | None:
    """Resident bytes of the files under `folder` that this process maps (Linux smaps)."""
    root, total, inside = os.path.realpath(folder) + os.sep, 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8") as smaps:
            for line in smaps:
                fields = line.split()
                if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping
                    inside = len(fields) >= 6 and fields[5].startswith(root)
                elif inside and fields[0] == "Rss:":
                    total += int(fields[1]) * 1024
    except OSError:
        return None
    return total


def held_since(before: dict, after: dict) -> dict:
    """`resident` growth from `before` to `after`; the model files' mapping as it stands."""
    return {
        k: v if k == "file" or v is None or before[k] is None else v - before[k]
        for k, v in after.items()
    }


def resident(memory: Memory, folder: str) -> dict:
    """On a CPU: anonymous RSS and the model files' mapped RSS; on CUDA: allocated bytes."""
    if memory.device.type == "cuda":
        return {"all": memory.now()}
    return {"anon": memory.now("RssAnon"), "file": mapped_bytes(folder)}


def scale_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the quantization scales, quantized linear weights): the library's count."""
    from continual_peft.backbones.quantization import scale_bytes as counted

    return counted(model)


# ---------------------------------------------------------------- one setting (a subprocess)


def make_rows(rows: int, tokens: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """`rows` prompts of `tokens` ids and their targets (TARGET_TOKENS ids + EOS), seeded."""
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randint(FIRST_ID, vocab, (rows, tokens), generator=g).tolist()
    targets = torch.randint(FIRST_ID, vocab, (rows, TARGET_TOKENS), generator=g).tolist()
    return prompts, [[*t, EOS] for t in targets]


def peft_loss(model, backbone, prompts: list[list[int]], targets: list[list[int]]):
    """`CausalBackbone.target_loss`, with peft's model doing the forward on the same inputs."""
    from continual_peft.backbones.lm import gather_logprobs, padded_targets

    joined = [p + t for p, t in zip(prompts, targets, strict=True)]
    inputs = backbone.inputs(backbone.collate(joined))
    inputs.pop("added")
    inputs.pop("prefix")
    width = max(len(t) for t in targets)
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, -width - 1 : -1]  # (B, m, V)
    ids, mask = padded_targets(backbone, targets, right_aligned=True)
    logprobs, counts = gather_logprobs(logits, ids, mask)
    return -logprobs.sum() / counts.sum()


def peft_twin(folder: str, backbone, quantization, rank: int):
    """peft's LoRA on the folder's model, loaded as our backbone was (same BitsAndBytesConfig,
    device and dtype), its adapter trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = backbone.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    options = {"device_map": {"": device}, "dtype": backbone.dtype}
    if quantization is not None:
        options["quantization_config"] = quantization.hf_config(backbone.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config, autocast_adapter_dtype=False).train()


def copy_slot(bank, slot: int, twin) -> None:
    """Put our slot's LoRA weights into peft's adapter, site by site."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in twin.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(bank.sites), "our sites and peft's layers differ"
    state = bank.slot_state(slot)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A["default"].weight.copy_(state[f"{name}.lora_A"])
            layer.lora_B["default"].weight.copy_(state[f"{name}.lora_B"])
            assert layer.scaling["default"] == float(state[f"{name}.scale"])


def training_step(loss_fn, optimizer, device: torch.device):
    """A step: the loss, backward, AdamW; waits for the GPU."""

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


@dataclass
class System:
    """A model with a trainable LoRA (ours: a slot of `bank`; peft's: its adapter), its loss on
    the benchmark's batch and its training step."""

    model: Any  # our backbone, or peft's model
    params: list[torch.nn.Parameter]
    loss: Callable[[], torch.Tensor]
    step: Callable[[], None]
    bank: Any = None
    slot: int = 0
    frozen: Callable[[], torch.Tensor] | None = None  # ours: the loss with every slot off


def ours_system(quantization, args) -> System:
    """The folder's model as our backbone, quantized as asked, with a fresh LoRA slot."""
    from continual_peft import Backbone, ModuleBank
    from continual_peft.modules.lora import LoRAConfig

    backbone = Backbone.from_pretrained(
        args.folder, args.tokens + 8, args.device, "auto", quantization
    )
    config = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=["all-linear"])
    bank = ModuleBank(backbone, "lora", config)
    slot = bank.add_slot(seed=0)
    backbone.train()
    prompts, targets = make_rows(args.rows, args.tokens, backbone.model.config.vocab_size)

    def loss():
        with bank.use_slot(slot):
            return backbone.target_loss(prompts, targets)

    def frozen():
        with bank.base_only():
            return backbone.target_loss(prompts, targets)

    params = bank.trainable_parameters()
    step = training_step(loss, torch.optim.AdamW(params, lr=1e-3), args.torch_device)
    return System(backbone, params, loss, step, bank, slot, frozen)


def peft_system(backbone, quantization, args) -> System:
    """peft's twin of our `backbone` (`peft_twin`), trained on the same batch."""
    twin = peft_twin(args.folder, backbone, quantization, args.rank)
    prompts, targets = make_rows(args.rows, args.tokens, backbone.model.config.vocab_size)

    def loss():
        return peft_loss(twin, backbone, prompts, targets)

    params = [p for p in twin.parameters() if p.requires_grad]
    step = training_step(loss, torch.optim.AdamW(params, lr=1e-3), args.torch_device)
    return System(twin, params, loss, step)


def guard(ours: System, theirs: System) -> tuple[float, float]:
    """Our slot copied into peft's adapter: |our loss - peft's| (asserted small), and how far
    the slot moves our loss from the frozen model's."""
    backbone = ours.model
    copy_slot(ours.bank, ours.slot, theirs.model)
    with torch.no_grad():
        lora = ours.loss()
        gap = float((lora - theirs.loss()).abs())
        moved = float((lora - ours.frozen()).abs())
    tolerance = 1e-4 if backbone.dtype == torch.float32 else 5e-2  # 16 bits: summed in turn
    assert gap <= tolerance, f"ours and peft's losses differ by {gap:.2e} (> {tolerance})"
    assert moved > gap, f"the slot barely moves the loss ({moved:.1e}): a vacuous guard"
    return gap, moved


def measure_memory(args, quantization) -> dict:
    """Part 1 and 2 of the module docstring, and the guard, in this process."""
    import bitsandbytes  # noqa: F401  (imported before the memory is read: not the model's)
    import peft  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    memory = Memory(args.torch_device)
    before = resident(memory, args.folder)
    ours = ours_system(quantization, args)
    backbone = ours.model
    ours.step()  # warm-up: the first forward touches lazily mapped weights, creates AdamW's state
    loaded = held_since(before, resident(memory, args.folder))
    theirs = peft_system(backbone, quantization, args)
    theirs.step()
    peaks = [(step_peak(ours.step, memory), step_peak(theirs.step, memory)) for _ in range(ROUNDS)]
    gap, moved = guard(ours, theirs)  # ours has trained: its B is no longer zero
    scales, quantized = scale_bytes(backbone.model)
    frozen = backbone.describe()  # counted as loaded, before the slots were injected
    return {
        "parameters": frozen["parameters"],
        "quantized_weights": quantized,
        "element_bytes": torch.empty(0, dtype=backbone.dtype).element_size(),
        "memory_bytes": frozen["weights_bytes"],
        "scale_bytes": scales,
        "load_growth": loaded,
        "ours_peak": median_or_none([p[0] for p in peaks]),
        "peft_peak": median_or_none([p[1] for p in peaks]),
        "trainable": [sum(p.numel() for p in system.params) for system in (ours, theirs)],
        "loss_gap": gap,
        "loss_moved": moved,
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }


def measure_speed(args, quantization) -> dict:
    """Part 3 of the module docstring, in this process."""
    ours = ours_system(quantization, args)
    theirs = peft_system(ours.model, quantization, args)
    ratio, ours_s, theirs_s = paired_seconds(ours.step, theirs.step, args.repeats)
    vs_none = None
    if quantization is not None:  # the same step on the unquantized model, side by side
        del theirs
        plain = ours_system(None, args)
        vs_none = paired_seconds(ours.step, plain.step, args.repeats)[0]
    return {"ours_s": ours_s, "peft_s": theirs_s, "ratio": ratio, "vs_none": vs_none}


def child(args) -> None:
    """One setting's memory or speed (`--child SETTING --phase memory|speed`), printed as JSON."""
    from continual_peft.backbones.quantization import Quantization

    if args.threads and args.torch_device.type == "cpu":
        torch.set_num_threads(args.threads)
    # expected and said once in the docstring: bitsandbytes casts 8-bit matmul inputs to float16
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    bits = {"none": None, "8bit": 8, "4bit": 4}[args.child]
    quantization = None if bits is None else Quantization(bits)
    measure = measure_memory if args.phase == "memory" else measure_speed
    print(MARK + json.dumps(measure(args, quantization)), flush=True)


# ---------------------------------------------------------------- the parent: run and print


def run_setting(setting: str, folder: Path, args) -> dict | str:
    """One setting, its memory and its speed each in a subprocess: the results, or the error
    printed. The memory's subprocess runs with glibc's mmap threshold fixed (at its initial
    128 KiB), so that large blocks go back to the OS when freed and the RSS follows the live
    tensors (with the threshold moving, freed blocks stay in the heap and peaks varied by tens
    of MiB from run to run); the speed's runs with the allocator as users get it."""
    found = {"setting": setting}
    for phase, env in [("memory", {"MALLOC_MMAP_THRESHOLD_": "131072"}), ("speed", {})]:
        command = [sys.executable, __file__, "--child", setting, "--phase", phase]
        command += ["--folder", str(folder), "--device", args.device, "--rows", str(args.rows)]
        command += ["--tokens", str(args.tokens), "--rank", str(args.rank)]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | env)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"{setting} ({phase}): exit code {done.returncode}: " + " / ".join(tail)[-600:]
        found |= json.loads(lines[-1].removeprefix(MARK))
    return found


def predicted_ratio(result: dict) -> float:
    """The README formula's weight bytes for this setting over the unquantized model's."""
    quantized, size = result["quantized_weights"], result["element_bytes"]
    rest = result["parameters"] - quantized
    per_weight = {"none": size, "8bit": 1.0, "4bit": NF4_BYTES}[result["setting"]]
    return (quantized * per_weight + rest * size) / (result["parameters"] * size)


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def print_tables(results: list[dict], args) -> None:
    base = next((r for r in results if r["setting"] == "none"), None)
    grown = list(results[0]["load_growth"])  # anon and file on a CPU, all on CUDA
    named = {"anon": "anonymous RSS growth", "file": "model file mapped", "all": "allocated"}
    print("\nFrozen weights (MiB), and what the process gained from loading to the first step:\n")
    print("| quantize | memory_bytes | / none | of which scales | predicted / none | ", end="")
    print(" | ".join(named[k] for k in grown) + " |")
    print("| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(grown))
    for r in results:
        ratio = "n/a" if base is None else f"{r['memory_bytes'] / base['memory_bytes']:.3f}"
        cells = [
            r["setting"],
            mib(r["memory_bytes"]),
            ratio,
            mib(r["scale_bytes"]),
            f"{predicted_ratio(r):.3f}",
            *(mib(r["load_growth"][k]) for k in grown),
        ]
        print("| " + " | ".join(cells) + " |")
    where = "peak RSS" if args.torch_device.type == "cpu" else "max_memory_allocated"
    print(f"\nOne LoRA training step ({where} above the resident memory before it, MiB) and")
    print("throughput (rows/s; time ratios: medians of back-to-back pairs):\n")
    print("| quantize | step peak, ours | step peak, peft | ours rows/s | peft rows/s | ", end="")
    print("ours / peft time | ours / ours unquantized time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        cells = [
            r["setting"],
            mib(r["ours_peak"]),
            mib(r["peft_peak"]),
            f"{args.rows / r['ours_s']:.1f}",
            f"{args.rows / r['peft_s']:.1f}",
            f"{r['ratio']:.2f}",
            "1" if r["vs_none"] is None else f"{r['vs_none']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def machine(args) -> str:
    name = device_name(args.torch_device)
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}"
        for p in ("torch", "transformers", "peft", "bitsandbytes")
    )
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    threads = f"{args.threads} thread(s)" if args.threads else "torch's threads"
    return f"{args.device} ({name}), {versions}, {threads} of {os.cpu_count()} CPUs{load}"


def parent(args) -> None:
    began = time.perf_counter()
    shape = SHAPES["quick" if args.quick else "default"]
    print(machine(args))
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as scratch:
        folder = Path(args.folder) if args.folder else save_model(Path(scratch), shape)
        config = llama_config(shape) if not args.folder else None
        described = (
            f"random Llama, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"intermediate {config.intermediate_size}, {config.num_attention_heads} heads, "
            f"vocab {config.vocab_size}"
            if config is not None
            else f"the model in {folder}"
        )
        print(
            f"{described}; batch {args.rows} rows x {args.tokens} + {TARGET_TOKENS + 1} tokens; "
            f"LoRA r {args.rank}, alpha {2 * args.rank}, all-linear; {args.repeats} pairs"
        )
        results = []
        for setting in args.settings:
            found = run_setting(setting, folder, args)
            if isinstance(found, str):
                print(f"error: {found}", flush=True)
                continue
            results.append(found)
            print(
                f"{setting}: {found['parameters']:,} parameters, {found['quantized_weights']:,} "
                f"quantized, compute dtype {found['dtype']}, trainable ours/peft "
                f"{found['trainable'][0]:,}/{found['trainable'][1]:,}; guard: our slot in peft's "
                f"adapter, the same loss within {found['loss_gap']:.1e} (the slot moves it "
                f"by {found['loss_moved']:.1e})",
                flush=True,
            )
    if results:
        print_tables(results, args)
    print(f"\n{time.perf_counter() - began:.0f} s in all")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small shape, 3 pairs")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="pairs; default 5, quick 3")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 0: torch's choice")
    parser.add_argument("--folder", default=None, help="a local Llama-like folder to load instead")
    parser.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["memory", "speed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    resolve_device(args)
    args.settings = [s.strip() for s in args.settings.split(",")]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        sys.exit(f"error: unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    args.repeats = args.repeats or (3 if args.quick else 5)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
