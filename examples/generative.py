"""Continual learning on a generative backbone: per_task vs seq on the toy generative stream.

    python examples/generative.py                                   # tiny random Llama, CPU, ~1 min
    python examples/generative.py --backbone /models/Qwen2.5-0.5B   # a local causal/seq2seq LM
    python examples/generative.py --architecture t5                 # a tiny T5 instead

Three string-mapping tasks ("fruit of red" -> "apple", "animal of red" -> "fox", ...) that map
the same colours to different targets: one shared LoRA (seq) forgets, a LoRA per task does not.
Prints each strategy's exact-match matrix R[i, j] (oracle routing), ACC, forgetting and the
routed ACC of a prototype router.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from continual_peft import ContinualLearner, LearnerConfig
from continual_peft.backbones.tiny import ARCHITECTURES, save_tiny
from continual_peft.tasks.toy import TOY_WORDS, toy_generative_stream

SETTINGS = {
    "router": "prototype",
    "train": {"epochs": 20, "batch_size": 8, "lr": 5e-3, "warmup": 0.0},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
    "generation": {"max_new_tokens": 4},
}


def run(strategy: str, backbone: str, max_length: int = 32) -> dict:
    """Learn the toy stream with `strategy` on the model folder `backbone`; its report."""
    config = LearnerConfig.from_dict(
        {**SETTINGS, "strategy": strategy, "backbone": {"name": backbone, "max_length": max_length}}
    )
    learner = ContinualLearner(config=config)
    for task in toy_generative_stream(train_per_task=24, test_per_task=12).tasks:
        learner.learn(task)
    return learner.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="a local causal or seq2seq model folder")
    saved = [a for a in ARCHITECTURES if a != "qwen2"]  # save_tiny cannot save a usable qwen2
    parser.add_argument(
        "--architecture",
        default="llama",
        choices=saved,
        help="the tiny model built when no --backbone is given",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.backbone or str(save_tiny(tmp, args.architecture, TOY_WORDS))
        for strategy in ("per_task", "seq"):
            start = time.perf_counter()
            report = run(strategy, folder)
            oracle, routed = report["metrics"]["oracle"], report["metrics"]["routed"]
            print(f"\n{strategy}: {time.perf_counter() - start:.0f} s, exact match R[i, j]:")
            for row in report["accuracy_matrix"]["oracle"]:
                print("  " + "  ".join("  -  " if v is None else f"{v:5.2f}" for v in row))
            print(
                f"  ACC {oracle['acc']:.3f}  forgetting {oracle['forgetting']:.3f}  "
                f"routed ACC {routed['acc']:.3f}"
            )


if __name__ == "__main__":
    main()
