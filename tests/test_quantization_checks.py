"""Quantized frozen backbones (`continual_peft.backbones.quantization`): what is refused, and
what a quantized run keeps.

- The config: unknown values and details of another quantization are refused by key; an
  unquantized config is recorded as before quantization existed.
- Without the [quant] extra, or on a device bitsandbytes cannot quantize on: a clear error
  before any weights load, and no run folder.
- A folder saved quantized by bitsandbytes loads as it was saved (the same values as quantizing
  its full-precision folder); asked for other settings, or quantized by another method (GPTQ),
  it is refused by name.
- A 4-bit run loads its folder 4-bit wherever it is named (library, predict, eval, export,
  resume); a backbone quantized otherwise is refused naming both; its report says so.
- What a quantized model holds: fewer bytes, as many weights; a layer the folder lacks (BERT's
  or ViT's pooler) stays in full precision and runs.

Tiny models saved to folders once per module; one tiny 4-bit run shared by the run's tests.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    DEVICE,
    LM_WORDS,
    load_tokenizer,
    quantized_backbone,
    require_bitsandbytes,
    save_tiny_bert,
    tiny_vit,
    word_task,
    write_stream,
)
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, LearnerConfig
from continual_peft.backbones.quantization import (
    Quantization,
    memory_bytes,
    parameter_count,
    quantized_layers,
)
from continual_peft.backbones.tiny import save_tiny
from continual_peft.cli import app
from continual_peft.config import QUANT_KEYS

NF4 = "4bit (nf4, double quantization)"
INT8 = "8bit (LLM.int8, outlier threshold 6)"
FULL = "none (full precision)"
TASK = "colors"
TRAIN = ["--epochs", "4", "--lr", "0.01", "--batch-size", "8", "--max-length", "32"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


@dataclass(frozen=True)
class Folders:
    bert: Path  # a tiny BERT saved without its pooler, and its tokenizer
    llama: Path  # a tiny Llama over LM_WORDS, and its word tokenizer
    stream: Path  # one word task (TASK), 24 train / 10 test rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Folders:
    root = tmp_path_factory.mktemp("quant")
    save_tiny(root / "llama", "llama", LM_WORDS)
    stream = write_stream(root / "data", [word_task(TASK, n_train=24, n_test=10)])
    return Folders(save_tiny_bert(root / "bert", load_tokenizer()), root / "llama", stream)


@pytest.fixture(scope="module")
def llamas(folders) -> dict[int, Backbone]:
    """The tiny Llama loaded in full precision (0), 8-bit and 4-bit."""
    require_bitsandbytes()
    full = Backbone.from_pretrained(str(folders.llama), 32, DEVICE, "float32")
    return {0: full, **{bits: quantized_backbone(folders.llama, bits) for bits in (8, 4)}}


@pytest.fixture
def no_weights_load(monkeypatch):
    """Loading any model's weights fails the test: a refusal must come before them."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the refusal")

    for auto in ("AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", refuse)


# ---------------------------------------------------------------- the config


# (the [backbone] table, the key its refusal names)
BAD_CONFIGS = [
    ({"quantize": "3bit"}, "quantize"),
    ({"quantize": "4bit", "quant_type": "int4"}, "quant_type"),
    ({"quant_type": "fp4"}, "quant_type"),
    ({"double_quant": False}, "double_quant"),
    ({"quant_skip": ["lm_head"]}, "quant_skip"),
    ({"quantize": "8bit", "quant_type": "fp4"}, "quant_type"),
    ({"quantize": "8bit", "double_quant": False}, "double_quant"),
    ({"quantize": "4bit", "int8_threshold": 4.0}, "int8_threshold"),
    ({"quantize": "8bit", "int8_threshold": 0.0}, "int8_threshold"),
    ({"quantize": "8bit", "int8_threshold": -1.0}, "int8_threshold"),
]


@pytest.mark.parametrize(
    ("backbone", "key"),
    BAD_CONFIGS,
    ids=[",".join(f"{k}={v}" for k, v in table.items()) for table, _ in BAD_CONFIGS],
)
def test_the_config_refuses_a_bad_or_inapplicable_quantization_by_key(backbone, key):
    with pytest.raises(ContinualPeftError, match=rf"backbone\.{key} = "):
        LearnerConfig.from_dict({"backbone": backbone})


def test_only_a_quantized_config_records_the_quantization_details():
    plain = LearnerConfig().to_dict()["backbone"]
    assert plain["quantize"] == "none" and not set(QUANT_KEYS) & set(plain)  # as before
    settings = {"quantize": "4bit", "quant_type": "fp4", "double_quant": False}
    quantized = LearnerConfig.from_dict({"backbone": {**settings, "quant_skip": ["pooler"]}})
    recorded = quantized.to_dict()["backbone"]
    assert set(QUANT_KEYS) <= set(recorded) and recorded["quant_skip"] == ["pooler"]
    for config in (LearnerConfig(), quantized):
        assert LearnerConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------- refused before loading


@pytest.mark.parametrize("missing", ["bitsandbytes", "accelerate"])
def test_without_the_extra_a_quantized_load_names_it(folders, monkeypatch, missing):
    # as if not installed: `import` fails and `importlib.util.find_spec` finds nothing
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.setitem(sys.modules, f"{missing}.functional", None)  # bitsandbytes' kernels
    with pytest.raises(ContinualPeftError, match=rf"needs {missing}.*\[quant\]"):
        Backbone.from_pretrained(str(folders.bert), 32, DEVICE, "float32", Quantization(4))
    out = folders.stream.parent.parent / f"no-{missing}"
    args = ["run", folders.stream, "--backbone", folders.bert, "--quantize", "4bit"]
    result = invoke(*args, "--device", DEVICE, "--out", out)
    assert result.exit_code != 0
    assert f"needs {missing}" in result.output and "[quant]" in result.output
    assert not out.exists()


@pytest.mark.parametrize(("bits", "kernel"), [(4, "quantize_4bit"), (8, "int8_vectorwise_quant")])
def test_a_device_bitsandbytes_cannot_quantize_on_is_refused_before_loading(
    folders, monkeypatch, no_weights_load, bits, kernel
):
    require_bitsandbytes()
    import bitsandbytes.functional

    def fails(*args, **kwargs):
        raise RuntimeError("no kernel for this device\n(a long native trace)")

    monkeypatch.setattr(bitsandbytes.functional, kernel, fails)
    with pytest.raises(ContinualPeftError) as info:
        Backbone.from_pretrained(str(folders.bert), 32, DEVICE, "float32", Quantization(bits))
    message = str(info.value)
    assert f"quantize = '{bits}bit' is not supported on device" in message
    assert "no kernel for this device." in message and "native trace" not in message
    assert "quantize = 'none'" in message  # what to do instead


# ---------------------------------------------------------------- folders saved quantized


@pytest.fixture(scope="module")
def saved_4bit(folders, llamas, tmp_path_factory) -> Path:
    """The tiny Llama loaded 4-bit and saved so by `save_pretrained` (bitsandbytes' format)."""
    folder = tmp_path_factory.mktemp("saved") / "llama-4bit"
    llamas[4].model.save_pretrained(folder)
    llamas[4].tokenizer.save_pretrained(folder)
    return folder


def embedded(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.embed(backbone.collate(backbone.encode(texts).items))


def test_a_folder_saved_4bit_loads_as_saved(llamas, saved_4bit):
    texts = ["red apple of fox", "blue crow"]
    saved = json.loads((saved_4bit / "config.json").read_text(encoding="utf-8"))
    assert saved["quantization_config"]["quant_method"] == "bitsandbytes"
    for asked in (None, Quantization(4)):  # nothing asked: the folder's own settings
        loaded = Backbone.from_pretrained(str(saved_4bit), 32, DEVICE, "float32", asked)
        assert loaded.quantization == Quantization(4) and loaded.quantization_name == NF4
        # the very values quantizing the full-precision folder makes
        assert torch.equal(embedded(loaded, texts), embedded(llamas[4], texts))


@pytest.mark.parametrize(
    ("asked", "named"),
    [(Quantization(8), INT8), (Quantization(4, quant_type="fp4"), "fp4")],
    ids=["8bit", "4bit-fp4"],
)
def test_a_folder_saved_4bit_asked_for_other_settings_is_refused_naming_both(
    saved_4bit, no_weights_load, asked, named
):
    with pytest.raises(ContinualPeftError) as info:
        Backbone.from_pretrained(str(saved_4bit), 32, DEVICE, "float32", asked)
    message = str(info.value)
    assert f"was saved quantized as {NF4}, but quantize asks for {asked.describe()}" in message
    assert named in message and "quantize = '4bit'" in message


@pytest.mark.parametrize("asked", [None, Quantization(4)], ids=["none", "4bit"])
def test_a_folder_quantized_by_gptq_is_refused_before_loading(
    folders, tmp_path, no_weights_load, asked
):
    folder = Path(shutil.copytree(folders.llama, tmp_path / "llama-gptq"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=r"already quantized by 'gptq'.*full-precision"):
        Backbone.from_pretrained(str(folder), 32, DEVICE, "float32", asked)


@pytest.mark.parametrize(
    ("field", "named"),
    [
        ("4bit", r"quantization_config is of type str \('4bit'\), not a table"),
        (4, r"quantization_config is of type int \(4\), not a table"),
        (["bitsandbytes"], r"quantization_config is of type list"),
        ({"bits": 4}, r"already quantized by 'unknown'"),
    ],
    ids=["str", "int", "list", "no-method"],
)
def test_a_broken_quantization_config_is_named_not_a_traceback(
    folders, tmp_path, no_weights_load, field, named
):
    folder = Path(shutil.copytree(folders.llama, tmp_path / "llama-broken"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = field
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ContinualPeftError, match=named):
        Backbone.from_pretrained(str(folder), 32, DEVICE, "float32")
    result = invoke("run", "--backbone", folder, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "quantiz" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a run trained 4-bit


@pytest.fixture(scope="module")
def quant_run(folders) -> Path:
    """A finished one-task run (per_task LoRA, oracle) on the tiny BERT quantized 4-bit."""
    require_bitsandbytes()
    run = folders.stream.parent.parent / "run-4bit"
    args = ["run", folders.stream, "--backbone", folders.bert, "--quantize", "4bit"]
    result = invoke(*args, *TRAIN, "--device", DEVICE, "--baseline", "none", "--out", run)
    assert result.exit_code == 0, result.output
    return run


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text(encoding="utf-8"))


def test_a_4bit_run_loads_its_folder_4bit_when_the_folder_is_named(folders, quant_run):
    task = word_task(TASK, n_train=24, n_test=10)
    learner = ContinualLearner.load(quant_run, backbone=str(folders.bert), device=DEVICE)
    assert learner.backbone.quantization == Quantization(4)
    own = ContinualLearner.load(quant_run, device=DEVICE)  # the folder config.json names
    assert own.backbone.quantization == Quantization(4)
    answers = learner.predict(task.test_inputs, task=TASK)
    assert answers == own.predict(task.test_inputs, task=TASK)
    right = [answer == task.labels[y] for answer, y in zip(answers, task.test_labels, strict=True)]
    assert sum(right) / len(right) == report(quant_run)["accuracy_matrix"]["oracle"][-1][-1]


@pytest.mark.parametrize(("bits", "given"), [(0, FULL), (8, INT8)], ids=["none", "8bit"])
def test_a_4bit_run_refuses_a_backbone_quantized_otherwise_naming_both(
    folders, quant_run, bits, given
):
    backbone = (
        quantized_backbone(folders.bert, bits)
        if bits
        else Backbone.from_pretrained(str(folders.bert), 32, DEVICE, "float32")
    )
    with pytest.raises(ContinualPeftError) as info:
        ContinualLearner.load(quant_run, backbone=backbone, device=DEVICE)
    message = str(info.value)
    assert f"quantized {NF4}" in message and f"the backbone given is quantized {given}" in message
    assert "quantize = '4bit'" in message


def test_predict_eval_and_export_load_the_named_folder_as_the_run_ran(folders, quant_run, tmp_path):
    rows = word_task(TASK, n_train=24, n_test=10)
    lines = [{"text": text, "task": TASK} for text in rows.test_inputs]
    given = tmp_path / "input.jsonl"
    given.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    common = ["--run", quant_run, "--device", DEVICE]
    own = invoke("predict", *common, "--input", given, "--output", tmp_path / "own.jsonl")
    moved = ["--backbone", folders.bert]
    named = invoke("predict", *common, "--input", given, *moved, "--output", tmp_path / "b.jsonl")
    assert own.exit_code == named.exit_code == 0, own.output + named.output
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "own.jsonl").read_text()

    scored = invoke("eval", folders.stream, *common, *moved)
    assert scored.exit_code == 0, scored.output
    row = next(line for line in scored.output.splitlines() if line.startswith(f"│ {TASK} "))
    accuracy = 100 * report(quant_run)["accuracy_matrix"]["oracle"][-1][-1]
    assert row.split("│")[3].strip() == f"{accuracy:.1f}"  # oracle ACC: the run's own

    out = tmp_path / "export"
    exported = invoke("export", "--run", quant_run, "--task", TASK, "--out", out, *moved)
    assert exported.exit_code == 0, exported.output
    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert info["quantization"]["describe"] == NF4
    assert info["quantization"]["bitsandbytes_config"]["load_in_4bit"] is True
    merged = ["--format", "merged", "--out", tmp_path / "merged", *moved]
    refused = invoke("export", "--run", quant_run, "--task", TASK, *merged)
    assert refused.exit_code != 0 and "merged export is refused" in refused.output


def test_a_4bit_run_resumes_only_4bit(folders, quant_run, tmp_path):
    args = ["run", folders.stream, "--resume"]
    other = invoke(*args, quant_run, "--quantize", "8bit", "--baseline", "none")
    assert other.exit_code != 0
    assert "backbone.quantize: '4bit' in the run, '8bit' here" in other.output
    # a run that lost a file re-trains on its own 4-bit backbone, to the same numbers
    run = Path(shutil.copytree(quant_run, tmp_path / "run"))
    (run / "tasks" / TASK / "head.safetensors").unlink()
    resumed = invoke(*args, run, "--device", DEVICE, "--baseline", "none")
    assert resumed.exit_code == 0, resumed.output
    assert "resumes from the start" in resumed.output
    assert report(run)["accuracy_matrix"] == report(quant_run)["accuracy_matrix"]
    for name in sorted(path.relative_to(run) for path in run.glob("tasks/*/*.safetensors")):
        ours, theirs = load_file(run / name), load_file(quant_run / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_report_states_the_quantization_and_the_weights_size(folders, quant_run):
    described = quantized_backbone(folders.bert, 4).describe()
    full = Backbone.from_pretrained(str(folders.bert), 32, DEVICE, "float32").describe()
    assert report(quant_run)["backbone"]["weights_bytes"] == described["weights_bytes"]
    assert described["weights_bytes"] < full["weights_bytes"]
    said = f"quantized {NF4}, weights {described['weights_bytes'] / 1e6:.1f} MB in memory"
    assert said in (quant_run / "report.md").read_text(encoding="utf-8")
    shown = invoke("report", quant_run)
    assert shown.exit_code == 0 and said in " ".join(shown.output.split())


# ---------------------------------------------------------------- what a quantized model holds


def test_4bit_holds_fewer_bytes_than_8bit_than_full_precision_and_as_many_weights(llamas):
    sizes = [memory_bytes(llamas[bits].model) for bits in (4, 8, 0)]
    assert sizes == sorted(set(sizes))  # strictly growing
    weights = sum(p.numel() for p in llamas[0].model.parameters())
    assert [parameter_count(llamas[bits].model) for bits in (4, 8, 0)] == [weights] * 3
    for backbone in llamas.values():  # what reports and config.json record
        assert backbone.describe()["weights_bytes"] == memory_bytes(backbone.model)
        assert backbone.describe()["parameters"] == weights
    assert len(quantized_layers(llamas[4].model)) == len(quantized_layers(llamas[8].model)) > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_the_folder_lacks_stays_in_full_precision_and_runs(folders, bits):
    """The tiny BERT is saved without the pooler its forward still calls."""
    backbone = quantized_backbone(folders.bert, bits)
    assert type(backbone.model.pooler.dense) is nn.Linear
    assert type(backbone.model.encoder.layer[0].attention.self.query) is not nn.Linear
    assert embedded(backbone, ["red apple", "blue car house"]).isfinite().all()


def test_a_tiny_vit_loads_4bit(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "vit")
    backbone = quantized_backbone(tmp_path / "vit", 4)
    assert backbone.kind == "image" and backbone.quantization_name == NF4
    assert len(quantized_layers(backbone.model)) == 12  # q, k, v, out, up, down x 2 layers
    full = Backbone.from_pretrained(str(tmp_path / "vit"), 32, DEVICE, "float32")
    assert backbone.describe()["weights_bytes"] < full.describe()["weights_bytes"]
    images = [torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        out = backbone.embed(backbone.collate(backbone.encode(images).items))
    assert out.shape == (3, 64) and out.isfinite().all()


def test_the_8bit_cast_notice_is_not_logged_and_other_messages_pass(llamas, caplog):
    """bitsandbytes logs that it casts to float16 on every 8-bit matmul: silenced, as news of
    nothing; its logger still passes other records."""
    import logging

    with caplog.at_level(logging.WARNING):
        embedded(llamas[8], ["red apple"])
        logging.getLogger("bitsandbytes.autograd._functions").warning("something else")
    assert "MatMul8bitLt" not in caplog.text
    assert "something else" in caplog.text


# ---------------------------------------------------------------- settings that would do nothing


def test_a_folder_claiming_quantization_over_full_precision_weights_is_refused(folders, tmp_path):
    """A config.json that says bitsandbytes but weights that are full precision (a copied
    config): nothing would be quantized while the run says it is."""
    folder = Path(shutil.copytree(folders.bert, tmp_path / "claims-4bit"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for asked in (None, Quantization(4, quant_type="fp4", double_quant=False)):
        with pytest.raises(ContinualPeftError, match=r"saved quantized \(4bit \(fp4\)\).*full"):
            Backbone.from_pretrained(str(folder), 32, DEVICE, "float32", asked)


@pytest.mark.parametrize(
    ("skip", "named"),
    [
        ([".*"], r"quantized no layer.*keeps them all"),
        (["encoder", "pooler"], r"quantized no layer.*keeps them all"),
        (["does_not_exist"], r"quant_skip entry 'does_not_exist' keeps no layer"),
    ],
    ids=["regex-all", "names-all", "unknown"],
)
def test_a_quant_skip_that_keeps_everything_or_nothing_is_refused(folders, skip, named):
    with pytest.raises(ContinualPeftError, match=named):
        quantized_backbone(folders.bert, 8, skip=tuple(skip))


def test_a_skip_that_keeps_some_layers_loads_them_in_full_precision(folders):
    backbone = quantized_backbone(folders.bert, 8, skip=("encoder.layer.0",))
    kept = [n for n, m in backbone.model.named_modules() if type(m) is nn.Linear]
    assert kept and all(".layer.0." in n or "pooler" in n for n in kept)
    assert "encoder.layer.0 kept in full precision" in backbone.quantization_name


def test_a_built_backbone_quantized_otherwise_than_the_config_is_refused(folders):
    """`ContinualLearner(backbone=<built>, config=<quantize 4bit>)` would train unquantized
    and record none: refused, naming both."""
    from continual_peft import BackboneConfig

    plain = Backbone.from_pretrained(str(folders.bert), 32, DEVICE, "float32")
    config = LearnerConfig(backbone=BackboneConfig(quantize="4bit"))
    with pytest.raises(ContinualPeftError, match=r"quantized 4bit .*quantized none"):
        ContinualLearner(plain, config=config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("double_quant", "no"),
        ("int8_threshold", "6"),
        ("int8_threshold", True),
        ("quant_skip", None),
        ("quant_skip", "query"),
        ("quantize", 4),
    ],
)
def test_a_library_config_of_the_wrong_type_is_named(key, value):
    from continual_peft import BackboneConfig

    quantize = "8bit" if key in ("int8_threshold", "quant_skip") else "4bit"
    settings = {"quantize": quantize, key: value}
    config = LearnerConfig(backbone=BackboneConfig(**settings))
    with pytest.raises(ContinualPeftError, match=rf"backbone\.{key} = .* is invalid") as info:
        config.validate()
    assert "finite" not in str(info.value)


def test_a_model_quantized_in_memory_is_the_model_loaded_quantized_by_name(folders):
    """Both are named by the folder's files, so a run made one way loads the other way."""
    from transformers import AutoModel

    quantization = Quantization(4)
    model = AutoModel.from_pretrained(
        str(folders.bert),
        quantization_config=quantization.hf_config(torch.float32),
        device_map={"": DEVICE},
        dtype=torch.float32,
        add_pooling_layer=False,
    )
    by_hand = Backbone(model, load_tokenizer(), max_length=32, device=DEVICE, dtype="float32")
    by_name = quantized_backbone(folders.bert, 4)
    for key in ("weights_sha256", "layers_sha256", "quantization"):
        assert by_hand.fingerprint()[key] == by_name.fingerprint()[key], key


def test_compare_keeps_the_quantization_and_dtype_for_every_entry():
    from continual_peft.experiments.entries import BUDGET_KEYS

    assert BUDGET_KEYS["backbone.quantize"] == "--quantize"
    assert BUDGET_KEYS["backbone.dtype"] == "--dtype"
