"""Export for multi-LoRA servers (`export --format vllm`): every task's adapter loads in peft and
gives our outputs, and `AdapterRouter` on the exported folder picks exactly the tasks `predict`
routes to, rejected texts included; runs a server could not reproduce are refused by name.

On the session's finished encoder run (conftest.py) and a two-task tiny Llama run whose router
rejects unfamiliar texts."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, LM_WORDS, assert_close, save_tiny_bert, word_task
from safetensors.torch import load_file
from test_export import ours as encoder_ours
from test_export_generative import batch, same, theirs
from test_export_generative import ours as lm_ours
from transformers import AutoModel, AutoModelForCausalLM
from typer.testing import CliRunner

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, Task
from continual_peft.backbones.tiny import save_tiny
from continual_peft.cli import app
from continual_peft.config import LearnerConfig
from continual_peft.engine.evaluation import predict_records
from continual_peft.engine.loading import load_learner
from continual_peft.integrations.peft_export import export_task
from continual_peft.integrations.vllm_export import AdapterRouter, export_adapters

peft = pytest.importorskip("peft")

# known inputs of both tasks, and texts the router has never seen the like of (rejected)
LM_TEXTS = ["red", "blue plum", "fruit of red", "animal of green", "green", "fruit of fruit"]
STRANGE = ["crow crow crow", "of of of of", "plum fox crow apple", "yes no"]
ENCODER_TEXTS = ["a red apple", "the dog sleeps at home", "happy again at work now", "blue sky"]


def lm_tasks() -> list[Task]:
    pairs = [("red", "yes"), ("blue", "no"), ("green", "no"), ("red apple", "yes")]
    pairs += [("blue plum", "no"), ("green fox", "no")]
    colors = Task.from_examples("colors", train=pairs * 2, test=pairs)
    colors.template = "Input: {text} Output:"
    pairs = [("fruit of red", "apple"), ("fruit of blue", "plum"), ("fruit of green", "fox")]
    pairs += [("animal of red", "fox"), ("animal of blue", "crow"), ("animal of green", "crow")]
    fruit = Task.from_examples("fruit", train=pairs * 2, test=pairs)
    fruit.kind, fruit.template = "generation", "Input: {text} Output:"
    return [colors, fruit]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """(learner, run dir, tiny Llama folder, export) of a per-task LoRA run whose prototype
    router rejects what looks like neither task (reject_rate 0.3)."""
    root = tmp_path_factory.mktemp("vllm-llama")
    base = save_tiny(root / "base", "llama", LM_WORDS)
    config = LearnerConfig.from_dict(
        {
            "router": "prototype",
            "router_options": {"reject_rate": 0.3, "calibration_share": 0.5, "knn_k": 2},
            "train": {"epochs": 1, "batch_size": 6, "lr": 2e-2, "warmup": 0.0},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["all-linear"]},
            "generation": {"max_new_tokens": 3},
        }
    )
    backbone = Backbone.from_pretrained(str(base), max_length=32, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=config, run_dir=root / "run")
    for task in lm_tasks():
        learner.learn(task)
    learner.finish()
    return learner, root / "run", base, export_adapters(root / "run", root / "vllm")


@pytest.fixture(scope="module")
def encoder_export(finished_run, tmp_path_factory) -> Path:
    return export_adapters(finished_run.run, tmp_path_factory.mktemp("vllm-bert") / "out")


def predicted_tasks(run_dir: Path, texts: list[str]) -> list[str | None]:
    """The `task` of `predict`'s rows for texts without a task (routed)."""
    learner = load_learner(run_dir, device=DEVICE)
    return [row["task"] for row in predict_records(learner, [{"text": t} for t in texts])]


# ---------------------------------------------------------------- the adapters


def test_every_encoder_adapter_loads_in_peft_with_our_outputs(finished_run, encoder_export):
    learner, base = finished_run.learner, finished_run.base
    info = json.loads((encoder_export / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["tasks"] == list(learner.learned)  # the router's order
    model = None
    for name in info["tasks"]:
        folder = encoder_export / "adapters" / name
        if model is None:  # as a multi-adapter server: one base, adapters loaded by name
            model = peft.PeftModel.from_pretrained(
                AutoModel.from_pretrained(base), folder, adapter_name=name
            )
        else:
            model.load_adapter(folder, adapter_name=name)
        model.set_adapter(name)
        hidden, inputs = encoder_ours(learner, name)
        with torch.no_grad():
            assert_close(model.eval()(**inputs).last_hidden_state, hidden)
        head = load_file(folder / "head.safetensors")  # what an encoder's answer needs besides
        kept = load_file(finished_run.run / "tasks" / name / "head.safetensors")
        assert all(torch.equal(head[key], kept[key]) for key in kept)


def test_every_lm_adapter_loads_in_peft_with_our_logits(lm_run):
    learner, _, base, out = lm_run
    inputs = batch(learner, "llama")
    for name in ("colors", "fruit"):
        folder = out / "adapters" / name
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        same(theirs(model, inputs), lm_ours(learner, inputs, name))
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4


def test_the_folder_holds_what_servers_read(lm_run):
    _, run_dir, base, out = lm_run
    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["format"] == "vllm" and info["tasks"] == ["colors", "fruit"]
    assert info["max_lora_rank"] == 4 and info["vllm_max_lora_rank"] == 8  # vLLM's next size
    assert info["base_model_name_or_path"] == str(base.resolve())
    assert info["source_run"] == str(run_dir.resolve()) and info["generative"] is True
    assert info["adapters"]["fruit"]["prompt_template"] == "Input: {text} Output:"
    assert info["adapters"]["fruit"]["shares_slots_with"] == []  # per_task: a slot each
    assert info["router"]["rejection"]["reject_rate"] == 0.3
    modules = (out / "lora-modules.txt").read_text(encoding="utf-8").split()
    assert modules == [f"{n}=adapters/{n}" for n in ("colors", "fruit")]  # moves with the folder
    assert all((out / m.split("=")[1] / "adapter_config.json").is_file() for m in modules)
    assert sorted(p.name for p in (out / "router").iterdir()) == [
        "router.json",
        "router.safetensors",
    ]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "--enable-lora --max-lora-rank 8 --max-loras 2" in readme and "LoRAX" in readme
    assert "An encoder" not in readme and "None where the router rejects" in readme


# ---------------------------------------------------------------- the routing function


def test_adapter_router_chooses_as_predict_with_rejections(lm_run):
    _, run_dir, _, out = lm_run
    texts = LM_TEXTS + STRANGE
    router = AdapterRouter.from_folder(out, device=DEVICE)
    chosen = router(texts)
    assert chosen == predicted_tasks(run_dir, texts)
    assert {"colors", "fruit", None} <= set(chosen)  # both tasks picked, some texts rejected
    assert router([]) == []
    assert router.prompt("fruit", "fruit of red") == "Input: fruit of red Output:"
    assert router.adapters["fruit"] == out / "adapters" / "fruit"


def test_adapter_router_chooses_as_predict_on_an_encoder(finished_run, encoder_export):
    router = AdapterRouter.from_folder(encoder_export, device=DEVICE, batch_size=3)
    chosen = router(ENCODER_TEXTS)
    assert chosen == predicted_tasks(finished_run.run, ENCODER_TEXTS)
    assert set(chosen) == {"colors", "animals"}
    assert router.prompt("colors", "a red apple") == "a red apple"  # no template


def test_route_py_prints_each_texts_adapter(lm_run, monkeypatch, capsys):
    _, run_dir, _, out = lm_run
    texts = ["fruit of red", "of of of of"]
    monkeypatch.setattr(sys, "argv", ["route.py", *texts])
    runpy.run_path(str(out / "route.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    expected = predicted_tasks(run_dir, texts)
    assert [line.split("\t")[0] for line in lines] == [t or "-" for t in expected]


def test_the_router_refuses_a_bare_string_and_a_foreign_folder(encoder_export, tmp_path):
    router = AdapterRouter.from_folder(encoder_export, device=DEVICE)
    with pytest.raises(ContinualPeftError, match=r"a list of texts"):
        router("a red apple")
    with pytest.raises(ContinualPeftError, match="unknown adapter 'nope'"):
        router.prompt("nope", "x")
    with pytest.raises(ContinualPeftError, match="holds no continual_peft.json"):
        AdapterRouter.from_folder(tmp_path)


# ---------------------------------------------------------------- the command line

runner = CliRunner()


def test_cli_exports_every_task(finished_run, tmp_path):
    out = tmp_path / "out"
    args = ["export", "--run", str(finished_run.run), "--format", "vllm", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "every task and the router" in result.output
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["animals", "colors"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--format", "vllm", "--task", "colors"], "exports every task of the run"),
        (["--format", "peft"], "exports one task: give --task NAME"),
        (["--format", "merged"], "or --format vllm for every task"),
        (["--format", "gguf"], "unknown export format 'gguf'"),
    ],
)
def test_cli_task_goes_with_one_task_formats_only(finished_run, tmp_path, args, expected):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--run", str(finished_run.run), *args, "--out", out])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_cli_refuses_a_non_empty_out_folder(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    args = ["export", "--run", str(finished_run.run), "--format", "vllm", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------- refusals


def test_export_task_points_to_export_adapters(finished_run, tmp_path):
    with pytest.raises(ContinualPeftError, match="call .*vllm_export.export_adapters"):
        export_task(finished_run.run, "colors", "vllm", tmp_path / "out")


def test_another_backbone_is_refused(finished_run, tmp_path, tokenizer):
    other = save_tiny_bert(tmp_path / "other", tokenizer, seed=1)  # same shapes, other weights
    with pytest.raises(ContinualPeftError, match="was trained on backbone .*mismatch: weights"):
        export_adapters(finished_run.run, tmp_path / "out", backbone=str(other))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def tiny_run(base: Path, run_dir: Path, names: list[str], **settings) -> Path:
    """A one-epoch run of small word tasks on the session's tiny BERT."""
    config = LearnerConfig.from_dict(
        {"train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "warmup": 0.0}, **settings}
    )
    backbone = Backbone.from_pretrained(str(base), max_length=32, device=DEVICE)
    learner = ContinualLearner(backbone, config=config, run_dir=run_dir)
    for name in names:
        learner.learn(word_task(name, n_train=16, n_test=3))
    learner.finish()
    return run_dir


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "has no router .*--format peft"),
        (
            {"router": "prototype", "tasks": {"moods": {"module": "prompt"}}},
            r"task\(s\) 'moods' \(prompt\) go through modules that are not LoRA",
        ),
        (
            {"router": "topk", "router_options": {"base": "prototype", "k": 2}},
            "mixes the modules of each row's 2 best tasks",
        ),
        (
            {"strategy": "route_or_merge", "router": "prototype"},
            "'route_or_merge' answers the rows its router rejects .*fallback",
        ),
    ],
    ids=["oracle", "prompt-task", "topk", "route-or-merge"],
)
def test_runs_a_server_cannot_reproduce_are_refused(finished_run, tmp_path, settings, expected):
    run_dir = tiny_run(finished_run.base, tmp_path / "run", ["colors", "moods"], **settings)
    with pytest.raises(ContinualPeftError, match=expected):
        export_adapters(run_dir, tmp_path / "out")
    result = runner.invoke(
        app, ["export", "--run", str(run_dir), "--format", "vllm", "--out", tmp_path / "out"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_shared_slots_are_said(finished_run, tmp_path):
    """seq trains one slot for every task: each adapter holds it, and the metadata says so."""
    run_dir = tiny_run(
        finished_run.base, tmp_path / "run", ["colors", "moods"], strategy="seq", router="prototype"
    )
    out = export_adapters(run_dir, tmp_path / "out")
    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["adapters"]["colors"]["shares_slots_with"] == ["moods"]
    assert info["adapters"]["moods"]["shares_slots_with"] == ["colors"]
    tensors = [load_file(out / "adapters" / n / "adapter_model.safetensors") for n in info["tasks"]]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert "Shared slots" in (out / "README.md").read_text(encoding="utf-8")
