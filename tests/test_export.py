"""Export: a task's LoRA as a peft adapter and merged into a standalone model, both checked against
our own outputs (peft and transformers load them with no help from this package), on the
session's finished run (conftest.py). That every strategy exports what its run evaluated is in
test_cases.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, EXPORTED, assert_close, save_tiny_bert, word_task
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, LoRAConfig, TrainConfig
from continual_peft.cli import app
from continual_peft.errors import CorruptFileError
from continual_peft.integrations.peft_export import export_task

peft = pytest.importorskip("peft")

TEXTS = ["a red apple", "the dog sleeps at home", "happy again at work now"]
TASK = EXPORTED  # the finished run's second task


def ours(learner: ContinualLearner, task: str = TASK) -> tuple[torch.Tensor, dict]:
    """Our last hidden state for TEXTS under the task's slot, and the batch."""
    backbone = learner.backbone
    batch = backbone.collate(backbone.encode(TEXTS).items)
    with torch.no_grad(), learner.bank.use_slot(learner.learned[task].slot):
        return backbone(**batch), batch


def test_config_json_records_the_backbone_path(finished_run):
    run = json.loads((finished_run.run / "config.json").read_text(encoding="utf-8"))
    assert run["backbone"]["name"] == str(finished_run.base)


def test_peft_export_loads_in_peft_and_matches(finished_run, tmp_path):
    learner, base_dir, out = finished_run.learner, finished_run.base, finished_run.peft
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out).eval()
    hidden, batch = ours(learner)
    with torch.no_grad():
        theirs = model(**batch).last_hidden_state
        with learner.bank.base_only():
            bare = learner.backbone(**batch)
    assert_close(theirs, hidden)
    assert not torch.allclose(hidden, bare, atol=1e-3)  # the LoRA is not a no-op

    # peft re-saving what it loaded writes the same tensors and the same value for every field
    model.save_pretrained(tmp_path / "resaved")
    mine = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    again = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text(encoding="utf-8"))
    for key, value in mine.items():
        same = set(value) == set(again[key]) if key == "target_modules" else value == again[key]
        assert same, (key, value, again[key])
    assert mine["peft_type"] == "LORA" and mine["r"] == 8 and mine["lora_alpha"] == 16
    assert sorted(mine["target_modules"]) == ["query", "value"]
    assert mine["base_model_name_or_path"] == str(base_dir.resolve())
    mine_t = load_file(out / "adapter_model.safetensors")
    again_t = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert mine_t.keys() == again_t.keys()
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in mine_t
    for key in mine_t:
        assert torch.equal(mine_t[key], again_t[key]), key


def test_merged_export_is_a_plain_model_with_our_outputs(finished_run):
    learner, run_dir, out = finished_run.learner, finished_run.run, finished_run.merged
    assert (out / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(out).eval()
    hidden, batch = ours(learner)
    with torch.no_grad():
        theirs = model(**batch).last_hidden_state
    assert_close(theirs, hidden)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXTS)["input_ids"] == learner.backbone.encode(TEXTS).items
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels == learner.learned[TASK].task.labels
    head = torch.nn.Linear(theirs.shape[-1], len(labels))
    head.load_state_dict(load_file(out / "head.safetensors"))
    with torch.no_grad():
        logits = head(learner.backbone.pool(theirs.float(), batch["attention_mask"]))
    expected = learner.logits(TEXTS, [TASK] * len(TEXTS))[:, : len(labels)]
    assert_close(logits, expected)
    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["task"] == TASK and info["source_run"] == str(run_dir.resolve())
    assert info["backbone"]["weights_sha256"] == learner.fingerprint()["weights_sha256"]


def test_first_task_exports_its_own_slot(finished_run, tmp_path):
    learner, run_dir, base_dir = finished_run.learner, finished_run.run, finished_run.base
    out = export_task(run_dir, "colors", "peft", tmp_path / "colors")
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out).eval()
    hidden, batch = ours(learner, "colors")
    with torch.no_grad():
        assert_close(model(**batch).last_hidden_state, hidden)


def test_all_linear_exports_full_layer_names(finished_run, tmp_path):
    """all-linear skips the pooler here but not in peft, so the layers are named in full."""
    base_dir = finished_run.base
    backbone = Backbone.from_pretrained(str(base_dir), max_length=32, device=DEVICE)
    lora = LoRAConfig(r=4, alpha=12.0, targets=["all-linear"])
    train = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
    learner = ContinualLearner(
        backbone=backbone, module_config=lora, train=train, run_dir=tmp_path / "r"
    )
    learner.learn(word_task("moods", n_train=16, n_test=3))
    out = export_task(tmp_path / "r", "moods", "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["target_modules"] == sorted(learner.bank.sites) and config["lora_alpha"] == 12
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out).eval()
    wrapped = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(learner.bank.sites)  # the pooler is left alone
    hidden, batch = ours(learner, "moods")
    with torch.no_grad():
        assert_close(model(**batch).last_hidden_state, hidden)


@pytest.mark.parametrize(
    ("task", "fmt", "expected"),
    [
        ("nope", "peft", "unknown task 'nope'"),
        ("nope", "peft", "['colors', 'animals']"),  # in learning order
        (TASK, "onnx", "unknown export format 'onnx'"),
        (TASK, "onnx", "('peft', 'merged')"),
    ],
)
def test_bad_task_or_format_is_named(finished_run, tmp_path, task, fmt, expected):
    with pytest.raises(ContinualPeftError) as info:
        export_task(finished_run.run, task, fmt, tmp_path / "out")
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_hand_edited_task_file_is_refused(run_copy, tmp_path):
    """Every file export reads is checked against checkpoint.json: an edit is not exported."""
    run_dir = run_copy
    record_file = run_dir / "tasks" / TASK / "task.json"
    record = json.loads(record_file.read_text(encoding="utf-8"))
    record_file.write_text(json.dumps({**record, "module": "prompt"}), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="task.json was altered .*sha256 differs"):
        export_task(run_dir, TASK, "peft", tmp_path / "out")


def test_one_flipped_byte_in_a_module_is_refused(run_copy, tmp_path):
    run_dir = run_copy
    module = run_dir / "tasks" / TASK / "module.safetensors"
    data = bytearray(module.read_bytes())
    data[-1] ^= 0x01  # a weight's last byte: still a valid safetensors file
    module.write_bytes(bytes(data))
    with pytest.raises(
        ContinualPeftError, match="module.safetensors was altered .*sha256 differs.*--resume"
    ):
        export_task(run_dir, TASK, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_head_file(run_copy, tmp_path):
    run_dir = run_copy
    (run_dir / "tasks" / TASK / "head.safetensors").unlink()
    with pytest.raises(
        ContinualPeftError, match="head.safetensors is missing \\(checkpoint.json names it"
    ):
        export_task(run_dir, TASK, "peft", tmp_path / "out")


def test_merged_refuses_a_different_backbone(run_copy, tmp_path, tokenizer):
    other = save_tiny_bert(tmp_path / "other", tokenizer, seed=1)  # same shapes, other weights
    with pytest.raises(ContinualPeftError, match="was trained on backbone .*mismatch: weights"):
        export_task(run_copy, TASK, "merged", tmp_path / "out", backbone=str(other))
    assert not (tmp_path / "out").exists()


def test_an_edited_fingerprint_in_config_json_is_refused(run_copy, tmp_path):
    """config.json's copy of the backbone's fingerprint must agree with the checkpoint's: an edit
    (or a deleted fingerprint) would otherwise switch the backbone check off."""
    for edit in ("weights", "deleted"):
        run = json.loads((run_copy / "config.json").read_text(encoding="utf-8"))
        if edit == "weights":
            run["backbone"]["weights_sha256"] = "0123456789abcdef"
        else:
            del run["backbone"]
        (run_copy / "config.json").write_text(json.dumps(run), encoding="utf-8")
        with pytest.raises(ContinualPeftError, match="config.json was edited: its backbone"):
            export_task(run_copy, TASK, "merged", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_corrupt_module_file(run_copy, tmp_path):
    run_dir = run_copy
    module_file = run_dir / "tasks" / TASK / "module.safetensors"
    module_file.write_bytes(module_file.read_bytes()[:100])
    with pytest.raises(CorruptFileError):
        export_task(run_dir, TASK, "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, ["export", *(str(a) for a in args)])


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_cli_export(finished_run, tmp_path, fmt):
    run_dir = finished_run.run
    out = tmp_path / fmt
    result = invoke("--run", run_dir, "--task", TASK, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    config = "adapter_config.json" if fmt == "peft" else "config.json"
    for name in (config, "head.safetensors", "labels.json", "continual_peft.json"):
        assert (out / name).is_file(), name


def test_cli_errors(finished_run, tmp_path):
    run_dir = finished_run.run
    common = ("--run", run_dir, "--out", tmp_path / "out")
    cases = [
        (("--task", "nope", *common), ["unknown task 'nope'", "'colors', 'animals'"]),
        (("--task", TASK, "--format", "gguf", *common), ["'gguf'", "'peft', 'merged'"]),
    ]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        for text in expected:
            assert text in result.stderr, result.stderr


def test_cli_refuses_a_non_empty_out_folder(finished_run, tmp_path):
    run_dir = finished_run.run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    result = invoke("--run", run_dir, "--task", TASK, "--format", "peft", "--out", out)
    assert result.exit_code == 2, result.output
    assert "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cli_empty_out_folder_is_used(finished_run, tmp_path):
    run_dir = finished_run.run
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("--run", run_dir, "--task", TASK, "--out", out)  # --format defaults to peft
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_corrupt_module_file(run_copy, tmp_path):
    run_dir = run_copy
    module_file = run_dir / "tasks" / TASK / "module.safetensors"
    module_file.write_bytes(module_file.read_bytes()[:-10])
    result = invoke("--run", run_dir, "--task", TASK, "--format", "peft", "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "was altered" in result.stderr and "--resume" in result.stderr
    assert str(module_file) in result.stderr.replace("\n", "")
    assert not (tmp_path / "o").exists()
