"""Routing from a shallow frozen pass: routing accuracy, and the cost of routed prediction, when a
router's features come from the first blocks of the backbone only.

Routed prediction is two passes: the frozen features the router reads (modules off) and the
routed forward. A `layers` setting whose deepest depth k is below the last block runs the
embeddings and blocks 1..k only (`backbones.features.states_upto`), so `layers = [2]` costs about
2/6 of MiniLM's forward. Three parts:

1. Routing accuracy on the bundled all-MiniLM-L6-v2 (the only family with real weights offline)
   on both shared streams (the four CL benchmark tasks; DBpedia cut into 7 tasks): every
   registered scoring router (oracle needs no features; topk wraps mahalanobis, k 2) for each
   `layers` setting, fitted on at most --max-train training inputs per task in task order,
   scored on --max-test test inputs per task: the share of test rows whose top-1 task is their
   own. Each input's pooled states at every depth come from one full forward and each setting
   takes its depths from them (the shallow pass gives the same features:
   tests/test_shallow_features.py).
2. Cost on MiniLM, a batch of --batch real test inputs (padded to their longest): routed
   prediction (the setting's features pass, the router's decision, the routed forward with
   every task's LoRA slot) against the frozen forward, and the features pass alone against it;
   each ratio the median of back-to-back pairs, every setting timed in turn (`ratios_in_turns`).
3. Other families, random weights in MiniLM's shape (6 blocks, width 384), --batch rows of
   --tokens tokens: the features pass of each setting against the full frozen pass the features
   read (a decoder's stack without its LM head; T5's and BART's encoder), and the largest
   difference between the shallow features and the full pass's pooled states.

PASS/FAIL: the accuracy rule holds when a setting routes within 1 point of the router's default
setting; the cost goal is routed prediction <= 1.3x the frozen forward.

Run (from the repository root; about 25 minutes on a shared 2-core CPU, --parts, --streams and
--max-train shorten it):
python benchmarks/shallow_router.py [--data-root ../shared/data/cl_benchmark] [--streams both]
    [--max-train 1000] [--max-test 300] [--settings "0 1 2 3 0,1 1,2 last auto"] [--repeats 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from _timing import device_name, paired_ratio

from continual_peft import Backbone, ModuleBank
from continual_peft.backbones.causal import CausalBackbone
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.seq2seq import Seq2SeqBackbone
from continual_peft.backbones.tiny import tiny_config, word_tokenizer
from continual_peft.modules.lora import LoRAConfig
from continual_peft.routers import build_router
from continual_peft.routers.base import ROUTERS
from continual_peft.tasks.streams import load_stream

STREAMS = {
    "cl_benchmark": "streams/cl_benchmark.toml",
    "dbpedia_split": "streams/dbpedia_split.toml",
}
ACCURACY_POINTS = 1.0  # a setting may route at most this many points below the default's
COST_GOAL = 1.3  # routed prediction / frozen forward
FAMILIES = ("bert", "vit", "llama", "qwen2", "gpt2", "t5", "bart")
CPU = torch.device("cpu")


def parse_settings(text: str) -> list[str | list[int]]:
    """ "0 1 2 1,2 last auto" -> [[0], [1], [2], [1, 2], "last", "auto"]."""
    return [s if s in ("last", "auto") else [int(d) for d in s.split(",")] for s in text.split()]


def label(setting: str | list[int]) -> str:
    """How tables name a setting: "auto", "[1,2]"."""
    return setting if isinstance(setting, str) else str(setting).replace(" ", "")


@torch.no_grad()
def pooled_states(backbone: Backbone, inputs: list, batch_size: int = 64) -> torch.Tensor:
    """(N, n + 1, d): each input's mean-pooled states after the embeddings and every block,
    from one full frozen forward per batch (inputs batched by length, returned in order)."""
    items = backbone.encode(list(inputs)).items
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out = torch.zeros(len(items), backbone.block_count + 1, backbone.hidden_size, device=CPU)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = backbone.collate([items[i] for i in rows])
        states = backbone.layer_states(batch)  # n + 1 states, each (B, L, d)
        pooled = [backbone.pool(h.float(), batch["attention_mask"]) for h in states]
        out[torch.tensor(rows, device=CPU)] = torch.stack(pooled, dim=1).cpu()  # (B, n + 1, d)
    return out


def pick(pooled: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """(N, k·d) the depths' pooled states side by side, as `Backbone.embed` lays them out."""
    return pooled[:, depths].flatten(1)


def routing_accuracy(router, train: list[torch.Tensor], test: list[torch.Tensor]) -> list[float]:
    """Fit `router` on each task's features in order; per task, the share of its test rows
    routed to it (top-1)."""
    for features in train:
        router.add_task(features)
    shares = []
    for index, features in enumerate(test):
        chosen, _ = router.route(features)
        shares.append(float((chosen[:, 0] == index).double().mean()))
    return shares


def ratios_in_turns(
    calls: dict[str, Callable[[], object]], baseline: Callable[[], object], repeats: int
) -> dict[str, float]:
    """Per call, the median over `repeats` turns of time(call) / time(baseline), the two run
    back to back (after one warm-up of each). Every call is timed once per turn, so a burst of
    load on a shared machine touches every call's pairs alike, not all of one call's."""
    for call in (*calls.values(), baseline):
        call()
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            middle = time.perf_counter()
            baseline()
            ratios[name].append((middle - start) / (time.perf_counter() - middle))
    return {name: statistics.median(found) for name, found in ratios.items()}


def lora_bank(backbone: Backbone, slots: int) -> ModuleBank:
    """`slots` frozen LoRA slots (r 8 on query/value) with non-zero weights, as after training."""
    bank = ModuleBank(backbone, "lora", LoRAConfig(r=8, alpha=16, dropout=0.0))
    for s in range(slots):
        bank.add_slot(seed=s)
        for site in bank.sites.values():
            torch.nn.init.normal_(site.stack.trainable["lora_B"], std=0.02)
        bank.freeze_slot()
    return bank


def stream_accuracy(
    backbone: Backbone, spec: str, args: argparse.Namespace, settings: list
) -> tuple[dict, dict, list]:
    """Part 1 on one stream, printed as a table: per (router, setting) whether it routes within
    1 point of the router's default; also each setting's fitted mahalanobis router (part 2's
    decisions) and the stream's test inputs."""
    stream = load_stream(spec, args.data_root, args.max_train, args.max_test)
    names = [task.name for task in stream.tasks]
    start = time.perf_counter()
    train = [pooled_states(backbone, task.train_inputs) for task in stream.tasks]
    test = [pooled_states(backbone, task.test_inputs) for task in stream.tasks]
    print(
        f"\n{stream.name} ({' -> '.join(names)}): routers fitted on "
        f"{[len(t) for t in train]} training inputs, {[len(t) for t in test]} test inputs; "
        f"states in {time.perf_counter() - start:.0f} s\n"
    )
    print("| router | layers | depths | routing acc | worst task | vs default | within 1 point |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    holding, routers = {}, {}
    for name in [n for n in ROUTERS.names() if n != "oracle"]:
        default = build_router(name).layers
        baseline = None
        for setting in [default] + [s for s in settings if s != default]:
            depths = backbone.feature_depths(setting)
            router = build_router(name, layers=setting)
            shares = routing_accuracy(
                router, [pick(p, depths) for p in train], [pick(p, depths) for p in test]
            )
            rows = sum(len(t) for t in test)
            share = 100 * sum(s * len(t) for s, t in zip(shares, test, strict=True)) / rows
            baseline = share if baseline is None else baseline
            holds = holding[name, label(setting)] = share >= baseline - ACCURACY_POINTS
            if name == "mahalanobis":
                routers[label(setting)] = router
            worst = min(range(len(shares)), key=shares.__getitem__)
            mark = " (default)" if setting == default else ""
            print(
                f"| {name} | {label(setting)}{mark} | {depths} | {share:.1f} | "
                f"{100 * shares[worst]:.1f} ({names[worst]}) | {share - baseline:+.1f} | "
                f"{'PASS' if holds else 'FAIL'} |",
                flush=True,
            )
    return holding, routers, [x for task in stream.tasks for x in task.test_inputs]


@torch.no_grad()
def minilm_cost(
    backbone: Backbone, routers: dict, inputs: list, args: argparse.Namespace, settings: list
) -> dict[str, float]:
    """Part 2, printed as a table: per setting, the features pass and routed prediction (the
    features pass, mahalanobis's decision, the routed forward) against the frozen forward, on
    a batch of real test inputs; returns routed prediction's ratio per setting."""
    rows = random.Random(0).sample(inputs, args.batch)
    batch = backbone.collate(backbone.encode(rows).items)
    bank = lora_bank(backbone, args.slots)
    slots = torch.arange(args.batch, device=CPU) % args.slots  # every slot in play

    def frozen():
        with bank.base_only():
            backbone(**batch)

    def routed():
        with bank.route(slots):
            backbone(**batch)

    calls = {"routed": routed}
    for setting in settings:
        router = routers[label(setting)]

        def features(setting=setting):
            with bank.base_only():
                return backbone.embed(batch, setting)

        def predict(features=features, router=router):
            indices, weights = router.route(features())
            with bank.route(indices % args.slots, weights):
                backbone(**batch)

        calls[f"features {label(setting)}"] = features
        calls[f"predict {label(setting)}"] = predict
    ratios = ratios_in_turns(calls, frozen, args.repeats)
    print(
        f"\ncost on all-MiniLM-L6-v2: {args.batch} test inputs x "
        f"{int(batch['input_ids'].shape[1])} tokens, {args.slots} LoRA slots (r 8, query/value); "
        f"the routed forward alone: {ratios['routed']:.2f}x the frozen forward; each ratio the "
        f"median of {args.repeats} back-to-back pairs, every setting timed in turn\n"
    )
    print("| layers | depths | features / frozen | routed prediction / frozen | <= 1.3x |")
    print("| --- | --- | ---: | ---: | --- |")
    costs = {}
    for setting in settings:
        key = label(setting)
        cost = costs[key] = ratios[f"predict {key}"]
        print(
            f"| {key} | {backbone.feature_depths(setting)} | {ratios[f'features {key}']:.2f} | "
            f"{cost:.2f} | {'PASS' if cost <= COST_GOAL else 'FAIL'} |",
            flush=True,
        )
    return costs


def minilm(args: argparse.Namespace, settings: list) -> None:
    """Parts 1 and 2 on the bundled MiniLM, and which settings meet both rules."""
    backbone = Backbone.from_pretrained(None, args.max_length, "cpu", "float32")
    print(
        f"all-MiniLM-L6-v2 ({backbone.block_count} blocks, max_length {args.max_length}), "
        f"{torch.get_num_threads()} threads, {device_name(CPU)}"
    )
    holding, first = {}, None
    for name, spec in STREAMS.items():
        if args.streams in ("both", name):
            found, routers, inputs = stream_accuracy(backbone, spec, args, settings)
            first = first or (routers, inputs)
            for key, holds in found.items():
                holding.setdefault(key, []).append(holds)
    costs = minilm_cost(backbone, *first, args, settings)
    print("\n| layers | routed prediction / frozen | routers within 1 point on every stream |")
    print("| --- | ---: | --- |")
    for setting in settings:
        key = label(setting)
        held = [r for (r, s), marks in holding.items() if s == key and all(marks)]
        print(f"| {key} | {costs[key]:.2f} | {', '.join(held) or 'none'} |")


def family_backbone(
    family: str, *, blocks: int, width: int, rows: int, tokens: int
) -> tuple[Backbone, dict]:
    """A random-weight backbone of `family` with `blocks` blocks `width` wide, and one batch of
    `rows` inputs for it (`tokens` tokens each; images: 64x64 pixels, 65 tokens)."""
    from transformers import BartConfig, BartModel, BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    tokenizer = word_tokenizer(["a"])
    vocab, heads = 1000, max(1, width // 32)  # MiniLM: 12 heads of 32
    if family == "vit":
        config = ViTConfig(
            image_size=64,
            patch_size=8,
            num_channels=3,
            hidden_size=width,
            num_hidden_layers=blocks,
            num_attention_heads=heads,
            intermediate_size=4 * width,
        )
        backbone = ImageBackbone(ViTModel(config, add_pooling_layer=False), None, device="cpu")
        return backbone, backbone.collate(list(torch.rand(rows, 3, 64, 64, device=CPU)))
    if family == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=blocks,
            num_attention_heads=heads,
            intermediate_size=4 * width,
        )
        backbone = Backbone(BertModel(config, add_pooling_layer=False), tokenizer, device="cpu")
    elif family == "bart":
        config = BartConfig(
            vocab_size=vocab,
            d_model=width,
            encoder_layers=blocks,
            decoder_layers=blocks,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * width,
            decoder_ffn_dim=4 * width,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
        )
        model = BartModel(config).eval()
        backbone = Seq2SeqBackbone(model, tokenizer, device="cpu", dtype="float32")
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = tiny_config(family, vocab, hidden_size=width, layers=blocks)
        auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
        kind = Seq2SeqBackbone if family == "t5" else CausalBackbone
        backbone = kind(auto.from_config(config).eval(), tokenizer, device="cpu", dtype="float32")
    ids = torch.randint(4, vocab, (rows, tokens), device=CPU)
    return backbone, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def one_family(family: str, args: argparse.Namespace, settings: list) -> tuple[list[float], float]:
    """Each setting's features pass / the full frozen pass on `family`, and the largest
    difference between shallow features and the full pass's pooled states."""
    backbone, batch = family_backbone(
        family, blocks=args.blocks, width=args.width, rows=args.batch, tokens=args.tokens
    )
    full = backbone.layer_states(batch)  # every depth, one full forward
    mask = batch.get("attention_mask")  # None for images: every token is real

    def pooled(depth: int) -> torch.Tensor:
        hidden = full[depth].float()  # (B, L, d)
        return hidden.mean(dim=1) if mask is None else backbone.pool(hidden, mask)

    ratios, difference = [], 0.0
    for setting in settings:
        if setting != "last":  # "last" reads the model's last output: no hidden states
            expected = torch.cat([pooled(d) for d in backbone.feature_depths(setting)], dim=1)
            found = backbone.embed(batch, setting)
            difference = max(difference, float((found - expected).abs().max()))
        ratios.append(
            paired_ratio(
                lambda s=setting: backbone.embed(batch, s),
                lambda: backbone.embed(batch, "last"),
                args.repeats,
            )
        )
    return ratios, difference


def families(args: argparse.Namespace, settings: list) -> None:
    """Part 3: the shallow features pass on every family, random weights, MiniLM's shape."""
    print(
        f"\nother families: random weights, {args.blocks} blocks, width {args.width}, "
        f"{args.batch} rows x {args.tokens} tokens (ViT: 64x64 images, 65 tokens); features "
        "pass / the full frozen pass the features read, and the largest |shallow - full| "
        "difference of the pooled states (settings other than last)\n"
    )
    print("| family | " + " | ".join(label(s) for s in settings) + " | max difference |")
    print("| --- |" + " ---: |" * (len(settings) + 1))
    for family in FAMILIES:
        ratios, difference = one_family(family, args, settings)
        cells = " | ".join(f"{r:.2f}" for r in ratios)
        print(f"| {family} | {cells} | {difference:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--max-train", type=int, default=1000, help="router inputs per task")
    parser.add_argument("--max-test", type=int, default=300, help="test inputs per task")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--streams", default="both", choices=["both", *STREAMS])
    parser.add_argument("--settings", default="0 1 2 3 0,1 1,2 last auto")
    parser.add_argument("--slots", type=int, default=4, help="LoRA slots in part 2's bank")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="part 3's tokens per row")
    parser.add_argument("--blocks", type=int, default=6, help="part 3's blocks")
    parser.add_argument("--width", type=int, default=384, help="part 3's hidden size")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--parts", default="minilm,families", help="minilm, families or both")
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    if "minilm" in args.parts:
        minilm(args, settings)
    if "families" in args.parts:
        families(args, settings)


if __name__ == "__main__":
    main()
