"""A run says what it ran on: the backbone's family, model type, parameter count, dtype,
quantization and the frozen weights' size in memory, in `Backbone.describe()`, report.json,
report.md, the console report and config.json."""

from __future__ import annotations

import json

import pytest
from helpers import DEVICE, FAST_TRAIN, compute_dtype, tiny_bert, tiny_vit, word_task
from rich.console import Console

from continual_peft import (
    Backbone,
    CausalBackbone,
    ContinualLearner,
    ImageBackbone,
    LearnerConfig,
    Seq2SeqBackbone,
)
from continual_peft.backbones.placement import dtype_name
from continual_peft.backbones.tiny import tiny_model, word_tokenizer
from continual_peft.reports.data import short_count
from continual_peft.reports.run import console_report, render_markdown


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def size(model) -> int:
    """Bytes of the model's parameters and buffers, as they are now (a plain recomputation of
    transformers' `get_memory_footprint`)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def generative(architecture: str):
    tokenizer = word_tokenizer(["red", "blue"])
    model = tiny_model(architecture, len(tokenizer))
    kind = Seq2SeqBackbone if architecture == "t5" else CausalBackbone
    backbone = kind(
        model, tokenizer, max_length=16, name=f"tiny-{architecture}", device=DEVICE, dtype="float32"
    )
    return backbone, model


def encoder(tokenizer):
    model = tiny_bert(tokenizer)
    backbone = Backbone(
        model, tokenizer, max_length=16, name="tiny-bert", device=DEVICE, dtype="float32"
    )
    return backbone, model


def image(tokenizer):
    model = tiny_vit()
    return ImageBackbone(model, name="tiny-vit", device=DEVICE, dtype="float32"), model


BUILDERS = {
    "encoder": (encoder, "bert"),
    "causal": (lambda _: generative("llama"), "llama"),
    "seq2seq": (lambda _: generative("t5"), "t5"),
    "image": (image, "vit"),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_describe_names_family_model_type_parameters_and_dtype(family, tokenizer):
    build, model_type = BUILDERS[family]
    backbone, model = build(tokenizer)
    assert backbone.describe() == {
        "family": family,
        "model_type": model_type,
        "parameters": count(model),
        "dtype": "float32",
        "quantization": "none",
        "weights_bytes": size(model),
    }
    assert json.loads(json.dumps(backbone.describe())) == backbone.describe()  # plain JSON


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer):
    """A one-task run on a tiny BERT, with its run directory, and the model's parameter count."""
    run_dir = tmp_path_factory.mktemp("info") / "run"
    model = tiny_bert(tokenizer)
    parameters = count(model)
    backbone = Backbone(model, tokenizer, max_length=32, name="tiny-bert", device=DEVICE)
    weights = size(model)  # as loaded and cast, before any slot is put into the model
    learner = ContinualLearner(backbone, config=LearnerConfig(train=FAST_TRAIN), run_dir=run_dir)
    learner.learn(word_task("colors", n_train=16, n_test=8))
    return run_dir, parameters, weights


def test_the_run_records_its_backbone_in_report_json_and_config_json(finished):
    run_dir, parameters, weights = finished
    expected = {
        "family": "encoder",
        "model_type": "bert",
        "parameters": parameters,
        "dtype": dtype_name(compute_dtype()),
        "quantization": "none",
        "weights_bytes": weights,
    }
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    # counted as loaded: the LoRA slots the run put into the model are not the backbone's
    assert report["backbone"] == {"name": "tiny-bert", **expected}
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model"] == expected


def test_report_md_and_the_console_show_the_backbone(finished):
    run_dir, parameters, weights = finished
    line = (
        f"- backbone: tiny-bert (encoder, bert, {short_count(parameters)} parameters, "
        f"{dtype_name(compute_dtype())}, weights {weights / 1e6:.1f} MB in memory)"
    )
    assert line in (run_dir / "report.md").read_text(encoding="utf-8").splitlines()
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    console = Console(record=True, width=200)
    console.print(console_report(report))
    assert line.removeprefix("- ") in console.export_text()


def test_reports_written_before_the_backbone_key_still_render(finished):
    run_dir, _, _ = finished
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    del report["backbone"]  # an older report: only the config's fingerprint names it
    dtype = dtype_name(compute_dtype())
    assert f"- backbone: tiny-bert ({dtype})" in render_markdown(report).splitlines()
    Console(record=True).print(console_report(report))
    report["config"].pop("backbone_fingerprint")
    assert "- backbone: not recorded" in render_markdown(report).splitlines()
    console = Console(record=True, width=200)
    console.print(console_report(report))
    assert "backbone:" not in console.export_text()


@pytest.mark.parametrize(
    ("n", "shown"),
    [(512, "512"), (95_168, "95.2 k"), (22_713_216, "22.7 M"), (1_100_048_384, "1.1 B")],
)
def test_parameter_counts_read_in_thousands_millions_or_billions(n, shown):
    assert short_count(n) == shown
