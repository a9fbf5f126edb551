"""The generative form of the CL_Benchmark protocol: the shipped spec's per-task instruction
templates read by a decoder-only and an encoder-decoder backbone, which answer by scoring the
label strings or by greedy generation, as in the published T5 / LLaMA setups. On a tiny model
over a word vocabulary that holds the templates' words, in a folder in the published layout."""

from __future__ import annotations

import json
import random
import re
import tomllib
import warnings
from pathlib import Path

import pytest
from helpers import DEVICE

from continual_peft import CausalBackbone, LearnerConfig, Seq2SeqBackbone
from continual_peft.backbones.tiny import tiny_model, word_tokenizer
from continual_peft.experiments.runner import run_stream
from continual_peft.tasks.streams import load_stream

CL_LONG = Path(__file__).resolve().parents[1] / "streams" / "cl_long.toml"
TASKS = {"sst2": ["Good", "Bad"], "cb": ["entailment", "contradiction", "neutral"]}
FILLERS = ["plum", "fox", "crow", "apple", "fruit", "red", "blue", "green"]


def write_folder(root: Path) -> list[str]:
    """sst2 and cb in the published layout (each sentence names its label among fillers); the
    words a tokenizer needs: the templates', the labels', the sentences'."""
    raw = tomllib.loads(CL_LONG.read_text(encoding="utf-8"))
    words = set(FILLERS)
    for entry in raw["tasks"]:
        if entry["name"] not in TASKS:
            continue
        labels, rng = TASKS[entry["name"]], random.Random(entry["name"])
        folder = root / entry["folder"]
        folder.mkdir(parents=True)
        for split, n in (("train", 24), ("test", 12)):
            records = [
                {
                    "sentence": f"{labels[i % len(labels)]} {' '.join(rng.sample(FILLERS, 2))}",
                    "label": labels[i % len(labels)],
                }
                for i in range(n)
            ]
            (folder / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
        (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
        words |= set(re.findall(r"\w+", entry["template"])) | set(labels)
    return sorted(words)


@pytest.mark.parametrize(
    ("architecture", "decode"), [("llama", "generate"), ("t5", "score")], ids=["llama", "t5"]
)
def test_the_long_stream_in_its_templates_on_a_generative_backbone(
    tmp_path: Path, architecture: str, decode: str
):
    tokenizer = word_tokenizer(write_folder(tmp_path / "data"))
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone

    def backbone():
        model = tiny_model(architecture, len(tokenizer))
        options = {"max_length": 48, "device": DEVICE, "dtype": "float32"}
        return kind(model, tokenizer, name=f"tiny-{architecture}", **options)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published layout's warnings: test_cl_benchmark.py
        templates = tomllib.loads(CL_LONG.read_text())["tasks"]
        others = [t["name"] for t in templates if t["name"] not in TASKS]
        stream = load_stream(
            CL_LONG, data_root=tmp_path / "data", order=list(TASKS), exclude=others
        )
    for task in stream.tasks:  # each task reads its own instruction, the input in its place
        template = next(t["template"] for t in templates if t["name"] == task.name)
        assert task.template == template
        assert task.prompt("X") == template.replace("{text}", "X")
    config = LearnerConfig.from_dict(
        {
            "train": {"epochs": 12 if architecture == "llama" else 30, "lr": 1e-2, "warmup": 0.0},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"decode": decode, "max_new_tokens": 2},
        }
    )
    learner = run_stream(stream, config, tmp_path / "run", make_backbone=backbone)
    report = learner.report
    assert report["task_names"] == list(TASKS) and report["status"] == "finished"
    assert [t["metric"] for t in report["tasks"]] == ["accuracy", "accuracy"]
    accuracy = report["accuracy_matrix"]["oracle"][-1]
    if architecture == "llama":  # each label is named in its input: learnable in 12 epochs
        assert report["metrics"]["oracle"]["acc"] >= 0.9
    else:  # the tiny T5 learns sst2 in this budget, not yet cb's three labels
        assert accuracy[0] >= 0.9
