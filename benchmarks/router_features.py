"""Which frozen features tell tasks apart: routing accuracy of feature choices, no slots trained.

Routing accuracy depends only on the frozen features and the router, not on the slots, so this
compares feature choices quickly: for each
stream, each choice of features and each router, the routers are fitted on every task's training
inputs (at most --fit per task), in task order, and the share of each task's test inputs routed
to it is printed (mean over tasks, and the worst task).

Feature choices, all mean-pooled over real tokens of the frozen bundled all-MiniLM-L6-v2 (6
layers, d = 384):
- `last`: the last layer (`layers = "last"`);
- `mid+last`: layers 3 and 6 concatenated (768);
- `all-mean`: the mean over layers 1..6 (384);
- `concat-2-4-6`: layers 2, 4 and 6 concatenated (1152): `layers = "auto"` on MiniLM.

Each router is given these features by hand (its own `layers` setting is not used here).

Run: python benchmarks/router_features.py [--data-root ../shared/data/cl_benchmark]
     [--fit 1000] [--test 300] [--streams both]
"""

from __future__ import annotations

import argparse
import time

import torch

from continual_peft import Backbone
from continual_peft.routers import ROUTERS
from continual_peft.tasks.streams import load_stream

STREAMS = {
    "cl_benchmark": "streams/cl_benchmark.toml",
    "dbpedia_split": "streams/dbpedia_split.toml",
}
CHOICES = {
    "last": lambda layers: layers[-1],
    "mid+last": lambda layers: torch.cat([layers[3], layers[6]], dim=1),
    "all-mean": lambda layers: torch.stack(layers[1:]).mean(dim=0),
    "concat-2-4-6": lambda layers: torch.cat([layers[2], layers[4], layers[6]], dim=1),
}
ROUTER_OPTIONS = {  # label: (router, options)
    "prototype": ("prototype", {}),
    "mahalanobis": ("mahalanobis", {}),
    "gate": ("gate", {}),
    "gate, weight_decay 1e-4": (
        "gate",
        {"weight_decay": 1e-4},
    ),  # a weaker weight decay than the default
}


@torch.no_grad()
def layer_features(backbone: Backbone, inputs: list, batch_size: int = 64) -> list[torch.Tensor]:
    """Per layer (embeddings = 0, then each block), the (N, d) mean-pooled states."""
    items = backbone.encode(list(inputs)).items
    parts: list[list[torch.Tensor]] = []
    for start in range(0, len(items), batch_size):
        batch = backbone.collate(items[start : start + batch_size])
        out = backbone.model(**batch, output_hidden_states=True)
        pooled = [backbone.pool(h.float(), batch["attention_mask"]) for h in out.hidden_states]
        parts.append(pooled)
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def one_stream(spec: str, backbone: Backbone, args: argparse.Namespace) -> None:
    stream = load_stream(spec, args.data_root, args.fit, args.test)
    start = time.perf_counter()
    train = [layer_features(backbone, t.train_inputs) for t in stream.tasks]
    test = [layer_features(backbone, t.test_inputs) for t in stream.tasks]
    names = [t.name for t in stream.tasks]
    sizes = [len(t.train_inputs) for t in stream.tasks]
    seconds = time.perf_counter() - start
    print(
        f"\n{stream.name}: {len(names)} tasks, fitted on {sizes} inputs, {args.test} test "
        f"inputs per task, features in {seconds:.0f} s\n"
    )
    print("| features | router | routing acc | worst task |")
    print("| --- | --- | ---: | ---: |")
    for choice, pick in CHOICES.items():
        for name, (router_name, options) in ROUTER_OPTIONS.items():
            router = ROUTERS.get(router_name)(**options)
            for layers in train:
                router.add_task(pick(layers))
            routing = []
            for index, layers in enumerate(test):
                chosen, _ = router.route(pick(layers))
                routing.append(float((chosen[:, 0] == index).double().mean()))
            worst = min(range(len(routing)), key=routing.__getitem__)
            print(
                f"| {choice} | {name} | {100 * sum(routing) / len(routing):.1f} | "
                f"{100 * routing[worst]:.1f} ({names[worst]}) |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cl_benchmark")
    parser.add_argument("--streams", default="both", choices=["both", *STREAMS])
    parser.add_argument("--fit", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    args = parser.parse_args()
    backbone = Backbone.from_pretrained(None, 128, "cpu", "float32")
    for name, spec in STREAMS.items():
        if args.streams in ("both", name):
            one_stream(spec, backbone, args)


if __name__ == "__main__":
    main()
