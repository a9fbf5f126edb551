"""Export: a task's LoRA as a peft adapter and merged into a standalone model, both checked against
our own outputs (peft and transformers load them with no help from this package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, FAST_TRAIN, assert_close, tiny_bert, word_task
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from continual_peft import (
    STRATEGIES,
    Backbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    LoRAConfig,
    TrainConfig,
)
from continual_peft.cli import app
from continual_peft.errors import CorruptFileError
from continual_peft.integrations.peft_export import export_task
from continual_peft.strategies import load_strategy_spec

peft = pytest.importorskip("peft")

TEXTS = ["a red apple", "the dog sleeps at home", "happy again at work now"]
TASK = "animals"  # the second task


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny BERT saved by path, and a two-task run on it: (learner, run dir, base dir)."""
    root = tmp_path_factory.mktemp("export")
    base_dir = root / "base"
    tiny_bert(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    backbone = Backbone.from_pretrained(str(base_dir), max_length=32, device=DEVICE)
    learner = ContinualLearner(backbone=backbone, train=FAST_TRAIN, run_dir=root / "run")
    for name in ("colors", TASK):
        learner.learn(word_task(name, n_train=24, n_test=6))
    learner.finish()
    return learner, root / "run", base_dir


def ours(learner: ContinualLearner, task: str = TASK) -> tuple[torch.Tensor, dict]:
    """Our last hidden state for TEXTS under the task's slot, and the batch."""
    backbone = learner.backbone
    batch = backbone.collate(backbone.encode(TEXTS).items)
    with torch.no_grad(), learner.bank.use_slot(learner.learned[task].slot):
        return backbone(**batch), batch


def test_config_json_records_the_backbone_path(trained):
    _, run_dir, base_dir = trained
    run = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert run["backbone"]["name"] == str(base_dir)


def test_peft_export_loads_in_peft_and_matches(trained, tmp_path):
    learner, run_dir, base_dir = trained
    out = export_task(run_dir, TASK, "peft", tmp_path / "peft")
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


def test_merged_export_is_a_plain_model_with_our_outputs(trained, tmp_path):
    learner, run_dir, _ = trained
    out = export_task(run_dir, TASK, "merged", tmp_path / "merged")
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


def test_first_task_exports_its_own_slot(trained, tmp_path):
    learner, run_dir, base_dir = trained
    out = export_task(run_dir, "colors", "peft", tmp_path / "colors")
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out).eval()
    hidden, batch = ours(learner, "colors")
    with torch.no_grad():
        assert_close(model(**batch).last_hidden_state, hidden)


def test_all_linear_exports_full_layer_names(trained, tmp_path):
    """all-linear skips the pooler here but not in peft, so the layers are named in full."""
    base_dir = trained[2]
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
def test_bad_task_or_format_is_named(trained, tmp_path, task, fmt, expected):
    _, run_dir, _ = trained
    with pytest.raises(ContinualPeftError) as info:
        export_task(run_dir, task, fmt, tmp_path / "out")
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_hand_edited_task_file_is_refused(trained, tmp_path):
    """Every file export reads is checked against checkpoint.json: an edit is not exported."""
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
    record_file = run_dir / "tasks" / TASK / "task.json"
    record = json.loads(record_file.read_text(encoding="utf-8"))
    record_file.write_text(json.dumps({**record, "module": "prompt"}), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="task.json was altered .*sha256 differs"):
        export_task(run_dir, TASK, "peft", tmp_path / "out")


def test_one_flipped_byte_in_a_module_is_refused(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
    module = run_dir / "tasks" / TASK / "module.safetensors"
    data = bytearray(module.read_bytes())
    data[-1] ^= 0x01  # a weight's last byte: still a valid safetensors file
    module.write_bytes(bytes(data))
    with pytest.raises(
        ContinualPeftError, match="module.safetensors was altered .*sha256 differs.*--resume"
    ):
        export_task(run_dir, TASK, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_head_file(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
    (run_dir / "tasks" / TASK / "head.safetensors").unlink()
    with pytest.raises(
        ContinualPeftError, match="head.safetensors is missing \\(checkpoint.json names it"
    ):
        export_task(run_dir, TASK, "peft", tmp_path / "out")


def test_merged_refuses_a_different_backbone(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
    run = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    run["backbone"]["weights_sha256"] = "0123456789abcdef"
    (run_dir / "config.json").write_text(json.dumps(run), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="was trained on backbone .*mismatch: weights"):
        export_task(run_dir, TASK, "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_module_file(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
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
def test_cli_export(trained, tmp_path, fmt):
    _, run_dir, _ = trained
    out = tmp_path / fmt
    result = invoke("--run", run_dir, "--task", TASK, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    config = "adapter_config.json" if fmt == "peft" else "config.json"
    for name in (config, "head.safetensors", "labels.json", "continual_peft.json"):
        assert (out / name).is_file(), name


def test_cli_errors(trained, tmp_path):
    _, run_dir, _ = trained
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


def test_cli_refuses_a_non_empty_out_folder(trained, tmp_path):
    _, run_dir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    result = invoke("--run", run_dir, "--task", TASK, "--format", "peft", "--out", out)
    assert result.exit_code == 2, result.output
    assert "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cli_empty_out_folder_is_used(trained, tmp_path):
    _, run_dir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("--run", run_dir, "--task", TASK, "--out", out)  # --format defaults to peft
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_corrupt_module_file(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "run")
    module_file = run_dir / "tasks" / TASK / "module.safetensors"
    module_file.write_bytes(module_file.read_bytes()[:-10])
    result = invoke("--run", run_dir, "--task", TASK, "--format", "peft", "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "was altered" in result.stderr and "--resume" in result.stderr
    assert str(module_file) in result.stderr.replace("\n", "")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_strategy_exports_what_the_run_evaluated(strategy, tokenizer, tmp_path):
    """The exported adapter gives each task the hidden states the run evaluated it with: its
    own slot (per_task), the shared slot as it is now (seq, replay, ewc, joint), every slot
    summed into one LoRA of rank Σr (olora); a prompt pool (l2p) is refused with the reason."""
    base_dir = tmp_path / "base"
    tiny_bert(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    folder = Path(__file__).parents[1] / "strategies"
    specs = [
        p for p in (folder / f"{strategy}_lora.toml", folder / f"{strategy}.toml") if p.is_file()
    ]
    config = load_strategy_spec(specs[0]) if specs else LearnerConfig(strategy=strategy)
    config.train = TrainConfig(epochs=2, batch_size=8, lr=3e-2, warmup=0.0)
    backbone = Backbone.from_pretrained(str(base_dir), max_length=32, device=DEVICE)
    learner = ContinualLearner(backbone, config=config, run_dir=tmp_path / "run")
    for name in ("colors", "animals", "moods"):
        learner.learn(word_task(name, n_train=16, n_test=6))
    learner.finish()
    batch = backbone.collate(backbone.encode(TEXTS).items)
    for task in ("colors", "moods"):
        out = tmp_path / f"{task}-peft"
        if strategy == "l2p":
            with pytest.raises(ContinualPeftError, match="prompt_pool.*can express only"):
                export_task(tmp_path / "run", task, "peft", out)
            continue
        export_task(tmp_path / "run", task, "peft", out)
        model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out).eval()
        with torch.no_grad(), learner.use_task(task):
            evaluated = backbone(**batch)
        with torch.no_grad():
            assert_close(model(**batch.copy()).last_hidden_state, evaluated)
        provenance = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
        assert provenance["slots"] == learner.strategy.routing(learner, task)[0]
