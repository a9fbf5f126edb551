"""Generative backbones: label scoring and greedy generation with mixed slots, vs frozen and peft.

A batch of B prompts whose rows use T distinct LoRA slots (row i on slot i mod T, so at T > B only
B of them are in play), for T = 1, 2, 8, 32, 128, on a random-weight Llama-shaped causal LM. Our
bank and a peft twin of the model hold the same T slots / adapters (opened as T grows):

1. Label scoring: every slot has its own C label strings (1-3 tokens, then EOS), scored with one
   forward per label position, as `LanguageModelHeads.row_logits` does. Ours:
   `CausalBackbone.target_logprobs` under `bank.route` (the whole mixed batch in one routed
   forward); frozen: the same under `bank.base_only()`; peft: the same inputs (position ids,
   logits of the last m + 1 positions only) through the peft model with `adapter_names=[one per
   row]`, its mixed-batch inference.
2. Generation: greedy decoding of N new tokens with the KV cache: `backbone.generate` under
   `bank.route` vs frozen vs peft's `generate(..., adapter_names=...)`; tokens/s = B x steps / time.

Each ratio is a time over the frozen model's time (> 1: slower), the median of back-to-back
pairs in one run, so slow drifts of a shared machine stay out of it; the frozen model is our
backbone with every slot off. Before timing, a guard checks, in float32 on the tiny shape, that
ours and peft holding the same weights give the same label scores (one slot for all rows, and
one slot per row), and counts the rows for which they write the same tokens.

Shapes: `tiny` (default: hidden 256, 2 layers, vocab 4096; 73-82 s on the shared 2-core CPU)
and `tinyllama` (TinyLlama-1.1B's: hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632,
vocab 32000), in bfloat16 on CUDA by default. LoRA r = 16, alpha 32, on every linear layer but the
LM head (`--targets all-linear`) or on q/k/v/o (`--targets qkvo`). peft's adapters keep the
model's dtype (`autocast_adapter_dtype=False`), as our stacks do. On a CPU the default is one
thread: on the shared 2-core box, two threads ran several times slower and far noisier whenever
another job held a core; `--threads 0` leaves torch's own choice.

Run: python benchmarks/generative.py [--shape tiny|tinyllama] [--slots 1,2,8,32,128] [--batch 32]
     [--tokens 32] [--labels 4] [--new-tokens 8] [--targets all-linear|qkvo] [--repeats 3]
     [--device cuda|cpu] [--dtype bfloat16|float32] [--threads 1]
On a GPU, e.g.: --shape tinyllama --tokens 512 --new-tokens 32 --repeats 5 (add --batch 128 to
put all 128 slots in play at T = 128). peft's columns (`pip install -e ".[test]"`) are n/a
without peft.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from _timing import device_name, paired_seconds, resolve_device

from continual_peft import CausalBackbone, ModuleBank
from continual_peft.backbones.lm import gather_logprobs, padded_targets
from continual_peft.backbones.tiny import word_tokenizer
from continual_peft.modules.lora import LoRAConfig

SHAPES = {
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 704,
        "vocab_size": 4096,
    },
    "tinyllama": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
        "vocab_size": 32000,
    },
}
TARGETS = {"all-linear": ["all-linear"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]}
FIRST_ID = 16  # prompt and label tokens are drawn past the tokenizer's special ids
EOS = 3  # word_tokenizer's "</s>"


@dataclass
class Setup:
    """Our backbone and bank, and a peft twin of the same model holding the same adapters."""

    backbone: CausalBackbone
    bank: ModuleBank
    twin: torch.nn.Module  # the same model, for peft
    peft: torch.nn.Module | None = None  # the twin with peft's adapters; None without peft
    made_s: tuple[float, float] = (0.0, 0.0)  # seconds spent opening our slots, peft's adapters


@dataclass
class Inputs:
    prompts: list[list[int]]  # B prompts of token ids
    labels: list[list[list[int]]]  # per slot, C labels of token ids, EOS last


def llama(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight `LlamaForCausalLM` of `shape`, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def build(shape: str, args, dtype: str) -> Setup:
    """Our backbone and bank on a random `shape` model (no slots yet), and its twin for peft."""
    model = llama(shape, args.torch_device, getattr(torch, dtype))
    twin = copy.deepcopy(model)
    backbone = CausalBackbone(
        model,
        word_tokenizer(["x"]),
        max_length=args.tokens + 8,
        name=f"random-{shape}",
        device=args.device,
        dtype=dtype,
    )
    config = LoRAConfig(
        r=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=TARGETS[args.targets]
    )
    return Setup(backbone, ModuleBank(backbone, "lora", config), twin)


def grow(setup: Setup, slots: int, with_peft: bool) -> None:
    """Open frozen LoRA slots up to `slots` (random non-zero B, as after training), and the
    same adapters on peft's twin."""
    bank = setup.bank
    start = time.perf_counter()
    while bank.num_slots < slots:
        torch.manual_seed(bank.num_slots)
        bank.add_slot(seed=bank.num_slots)
        for site in bank.sites.values():
            torch.nn.init.normal_(site.stack.trainable["lora_B"], std=0.02)
        bank.freeze_slot()
    middle = time.perf_counter()
    if with_peft:
        setup.peft = peft_adapters(setup.twin if setup.peft is None else setup.peft, bank)
    ours, theirs = setup.made_s
    setup.made_s = (ours + middle - start, theirs + time.perf_counter() - middle)


def peft_adapters(model: torch.nn.Module, bank: ModuleBank) -> torch.nn.Module:
    """`model` (peft's, or the bare twin) with one peft LoRA adapter `t<s>` per slot of `bank`,
    holding that slot's weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = bank.config
    targets = "all-linear" if config.targets == ["all-linear"] else config.targets
    theirs = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=targets
    )
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, theirs, adapter_name="t0", autocast_adapter_dtype=False)
    for slot in range(len(model.peft_config), bank.num_slots):
        model.add_adapter(f"t{slot}", theirs, autocast_adapter_dtype=False)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(bank.sites), "our sites and peft's layers differ"
    with torch.no_grad():
        for slot in range(bank.num_slots):  # all again: cheap next to add_adapter
            state = bank.slot_state(slot)
            for name, layer in layers.items():
                layer.lora_A[f"t{slot}"].weight.copy_(state[f"{name}.lora_A"])
                layer.lora_B[f"t{slot}"].weight.copy_(state[f"{name}.lora_B"])
                assert layer.scaling[f"t{slot}"] == float(state[f"{name}.scale"])
    return model.eval()  # peft refuses adapter_names in training mode


def make_inputs(rows: int, tokens: int, labels: int, slots: int, vocab: int) -> Inputs:
    """Prompts of 3/4 tokens to `tokens` tokens (left padding in play), labels per slot."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(FIRST_ID, vocab, (n,), generator=g).tolist()

    lengths = torch.randint(tokens * 3 // 4, tokens + 1, (rows,), generator=g).tolist()
    label_sets = [
        [[*ids(int(torch.randint(1, 4, (), generator=g))), EOS] for _ in range(labels)]
        for _ in range(slots)
    ]
    return Inputs([ids(n) for n in lengths], label_sets)


def peft_logprobs(model, backbone: CausalBackbone, prompts, targets, names: list[str]):
    """`CausalBackbone.target_logprobs`, with peft's model and `adapter_names` doing the forward."""
    joined = [p + t for p, t in zip(prompts, targets, strict=True)]
    inputs = backbone.inputs(backbone.collate(joined))
    inputs.pop("added")
    width = max(len(t) for t in targets)
    logits = model(**inputs, logits_to_keep=width + 1, adapter_names=names).logits
    ids, mask = padded_targets(backbone, targets, right_aligned=True)
    return gather_logprobs(logits[:, -width - 1 : -1], ids, mask)


def peft_generate(model, backbone: CausalBackbone, prompts, new_tokens: int, names: list[str]):
    """`LanguageModelBackbone.generate`, with peft's `generate(..., adapter_names=...)`."""
    from transformers import GenerationConfig

    batch = backbone.collate(prompts)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=backbone.pad_id,
        eos_token_id=EOS,
    )
    out = model.generate(
        **backbone.generation_inputs(batch), generation_config=config, adapter_names=names
    )
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [ids[: ids.index(EOS)] if EOS in ids else ids for ids in rows]


def systems(setup: Setup, inputs: Inputs, slots: int, new_tokens: int) -> dict[str, Callable]:
    """For T = `slots`: label scores (B, C) and generated ids of ours, frozen and peft."""
    backbone, bank, prompts = setup.backbone, setup.bank, inputs.prompts
    rows = [i % slots for i in range(len(prompts))]
    index = torch.tensor(rows, dtype=torch.long, device="cpu")[:, None]  # (B, 1)
    weights = torch.ones(index.shape, dtype=torch.float32, device="cpu")  # (B, 1)
    names = [f"t{s}" for s in rows]
    per_label = [[inputs.labels[s][c] for s in rows] for c in range(len(inputs.labels[0]))]

    def score(logprobs: Callable) -> torch.Tensor:
        return torch.stack([logprobs(prompts, t)[0] for t in per_label], dim=1)  # (B, C)

    def with_slots(fn: Callable, routed: bool) -> Callable:
        def run():
            with bank.route(index, weights) if routed else bank.base_only():
                return fn()

        return run

    found = {
        "score ours": with_slots(lambda: score(backbone.target_logprobs), True),
        "score frozen": with_slots(lambda: score(backbone.target_logprobs), False),
        "write ours": with_slots(lambda: backbone.generate(prompts, new_tokens), True),
        "write frozen": with_slots(lambda: backbone.generate(prompts, new_tokens), False),
    }
    if setup.peft is not None:
        model = setup.peft
        found["score peft"] = lambda: score(
            lambda p, t: peft_logprobs(model, backbone, p, t, names)
        )
        found["write peft"] = lambda: peft_generate(model, backbone, prompts, new_tokens, names)
    return found


def guard(args) -> str:
    """Ours and peft, same weights, float32, tiny shape: the same label scores (asserted), on
    one slot for every row and on one slot per row."""
    if args.no_peft:
        return "guard skipped: peft is not installed"
    slots, rows = 8, 8
    setup = build("tiny", args, "float32")
    grow(setup, slots, with_peft=True)
    inputs = make_inputs(rows, args.tokens, args.labels, slots, SHAPES["tiny"]["vocab_size"])
    gap, moved, same = 0.0, 0.0, 0
    for routed in (1, slots):
        run = systems(setup, inputs, routed, args.new_tokens)
        with torch.no_grad():
            ours, theirs, frozen = run["score ours"](), run["score peft"](), run["score frozen"]()
            written = zip(run["write ours"](), run["write peft"](), strict=True)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        gap = max(gap, float((ours - theirs).abs().max()))
        moved = max(moved, float((ours - frozen).abs().max()))
        same += sum(a == b for a, b in written)
    assert moved > 1e-2, f"the slots barely change the scores ({moved:.1e}): a vacuous guard"
    return (
        f"guard (float32, tiny, {rows} rows on 1 slot, then on {slots}): ours and peft give "
        f"the same label scores, max |diff| {gap:.1e} (the slots move them by up to "
        f"{moved:.2f}); the same greedy tokens in {same}/{2 * rows} rows"
    )


def synced(fn: Callable, device: torch.device, seen: list | None = None) -> Callable:
    """`fn` without gradients, waiting for the GPU; its last output kept in `seen`."""

    def run():
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if seen is not None:
            seen[:] = [out]

    return run


def measure(setup: Setup, inputs: Inputs, slots: int, args) -> list[float | None]:
    """One row of the table for T = `slots`: label scoring frozen ms and ratios; generation
    tokens/s of frozen, ours, peft and ratios (None for peft without peft)."""
    found = systems(setup, inputs, slots, args.new_tokens)
    seen = {k: [] for k in found}
    run = {k: synced(fn, args.torch_device, seen[k]) for k, fn in found.items()}

    def pair(what: str, system: str) -> tuple:
        if f"{what} {system}" not in run:
            return None, None, None
        return paired_seconds(run[f"{what} {system}"], run[f"{what} frozen"], args.repeats)

    score_ours, _, score_frozen_s = pair("score", "ours")
    score_peft = pair("score", "peft")[0]
    write_ours, ours_s, frozen_s = pair("write", "ours")
    write_peft, peft_s, _ = pair("write", "peft")
    tokens = {k: args.batch * steps(rows[0], args.new_tokens) for k, rows in seen.items() if rows}
    return [
        score_frozen_s * 1e3,
        score_ours,
        score_peft,
        tokens["write frozen"] / frozen_s,
        tokens["write ours"] / ours_s,
        peft_s and tokens["write peft"] / peft_s,
        write_ours,
        write_peft,
    ]


def steps(rows: list[list[int]], new_tokens: int) -> int:
    """Decoding steps `generate` ran: all `new_tokens` unless every row wrote EOS earlier."""
    return min(new_tokens, max(len(r) for r in rows) + 1)


COLUMNS = [
    ("frozen ms", 10, 1),
    ("ours/frozen", 12, 2),
    ("peft/frozen", 12, 2),
    ("frozen tok/s", 13, 0),
    ("ours tok/s", 11, 0),
    ("peft tok/s", 11, 0),
    ("ours/frozen", 12, 2),
    ("peft/frozen", 12, 2),
]


def table_header(args) -> str:
    scoring = f"label scoring: {args.labels} forwards of {args.batch} rows"
    writing = f"generation: {args.new_tokens} new tokens x {args.batch} rows, greedy, KV cache"
    names = " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)
    return f"{'':5} {scoring:<36} | {writing}\n{'T':>5} {names[:36]} | {names[37:]}"


def table_row(slots: int, values: list[float | None]) -> str:
    cells = [
        f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"
        for value, (_, width, digits) in zip(values, COLUMNS, strict=True)
    ]
    return f"{slots:>5} {' '.join(cells[:3])} | {' '.join(cells[3:])}"


def machine(args, dtype: str) -> str:
    """The device, library versions, threads and dtype, in one line."""
    name = device_name(args.torch_device)
    peft = "absent" if args.no_peft else importlib.metadata.version("peft")
    return (
        f"{args.device} ({name}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft}, threads {torch.get_num_threads()} of "
        f"{os.cpu_count()} CPUs, {dtype}"
    )


def settings(args) -> str:
    shape = ", ".join(f"{k} {v}" for k, v in SHAPES[args.shape].items())
    return (
        f"random {args.shape} Llama ({shape}); batch {args.batch} prompts of "
        f"{args.tokens * 3 // 4}-{args.tokens} tokens (row i on slot i mod T), "
        f"labels: {args.labels} per slot, 1-3 tokens + EOS each; LoRA r {args.rank}, alpha "
        f"{2 * args.rank}, on {args.targets}; each ratio: time / frozen time, median of "
        f"{args.repeats} back-to-back pairs"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--slots", default="1,2,8,32,128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="longest prompt (shortest: 3/4)")
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=list(TARGETS), default="all-linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on a CPU",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 0: torch's choice")
    args = parser.parse_args()
    resolve_device(args)
    args.slot_counts = sorted(int(s) for s in args.slots.split(","))
    args.no_peft = importlib.util.find_spec("peft") is None
    return args


def main() -> None:
    began = time.perf_counter()
    args = parse_args()
    if args.threads and args.torch_device.type == "cpu":
        torch.set_num_threads(args.threads)
    # peft reads a deprecated transformers attribute; the warning says nothing about this run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    dtype = args.dtype or ("bfloat16" if args.torch_device.type == "cuda" else "float32")
    print(machine(args, dtype))
    print(settings(args))
    print(guard(args), flush=True)
    setup = build(args.shape, args, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    inputs = make_inputs(args.batch, args.tokens, args.labels, args.slot_counts[-1], vocab)
    print(table_header(args))
    for slots in args.slot_counts:
        grow(setup, slots, with_peft=not args.no_peft)
        print(table_row(slots, measure(setup, inputs, slots, args)), flush=True)
    ours, theirs = setup.made_s
    peft = "" if args.no_peft else f", peft's {slots} adapters in {theirs:.1f} s"
    print(
        f"set-up: our {slots} slots opened in {ours:.1f} s{peft}; "
        f"{time.perf_counter() - began:.0f} s in all"
    )


if __name__ == "__main__":
    main()
