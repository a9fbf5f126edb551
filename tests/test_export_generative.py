"""Export on generative backbones (tiny Llama, GPT-2, T5): a task's LoRA as a peft adapter of task
type CAUSAL_LM / SEQ_2_SEQ_LM and merged into a standalone model, both giving our learner's logits
for that task when peft and transformers load them; GPT-2's Conv1D layers included."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEVICE, LM_WORDS, lm_word_tasks
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from typer.testing import CliRunner

from continual_peft import Backbone, CausalBackbone, ContinualLearner, ContinualPeftError
from continual_peft.backbones.tiny import save_tiny, tiny_model, word_tokenizer
from continual_peft.cli import app
from continual_peft.config import LearnerConfig
from continual_peft.integrations.lora_layers import merge_lora, read_layout
from continual_peft.integrations.peft_export import export_task

peft = pytest.importorskip("peft")

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
TASK_TYPE = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
FIRST_LAYER = r"(model\.layers|transformer\.h)\.0\..*"  # one layer's projections: a regex target
# (architecture, LoRA targets): all-linear (GPT-2: its Conv1D layers), aliases, a regex
CASES = [
    ("llama", ["all-linear"]),
    ("gpt2", ["all-linear"]),
    ("t5", ["query", "value"]),
    ("llama", [FIRST_LAYER]),
]
IDS = ["llama", "gpt2", "t5", "llama-regex"]
TEXTS = ["Input: fruit of red Output:", "blue of crow", "Input: animal of green Output: fox"]
TASK = "fruit"  # the second task: a generation task on slot 1


def config(targets: list[str], module: str = "lora") -> LearnerConfig:
    return LearnerConfig.from_dict(
        {
            "strategy": "per_task",
            "module": module,
            "train": {"epochs": 3, "batch_size": 6, "lr": 2e-2, "warmup": 0.0},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": targets},
            "generation": {"max_new_tokens": 3},
        }
    )


def learn(base, run_dir, targets: list[str], module: str = "lora") -> ContinualLearner:
    backbone = Backbone.from_pretrained(str(base), max_length=32, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=config(targets, module), run_dir=run_dir)
    for task in lm_word_tasks():
        learner.learn(task)
    learner.finish()
    return learner


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def trained(request, tmp_path_factory):
    """(architecture, learner, run dir, tiny model folder) for a two-task run."""
    architecture, targets = request.param
    root = tmp_path_factory.mktemp(architecture)
    base = save_tiny(root / "base", architecture, LM_WORDS)
    return architecture, learn(base, root / "run", targets), root / "run", base


def batch(learner: ContinualLearner, architecture: str) -> dict[str, torch.Tensor]:
    backbone = learner.backbone
    inputs = backbone.collate(backbone.encode(TEXTS).items)
    if architecture == "t5":
        ids = backbone.encode_targets(["apple plum", "fox", "yes no crow"])
        start = backbone.model.config.decoder_start_token_id
        inputs["decoder_input_ids"] = backbone.collate([[start, *row] for row in ids])["input_ids"]
    return inputs


def ours(learner: ContinualLearner, inputs: dict, task: str = TASK) -> torch.Tensor:
    """The learner's logits with every row through the task's slot(s)."""
    with torch.no_grad(), learner.use_task(task):
        return learner.backbone.model(**inputs).logits


def theirs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.to(inputs["input_ids"].device).eval()(**inputs).logits


def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


def test_peft_export_loads_in_peft_with_our_logits(trained, tmp_path):
    architecture, learner, run_dir, base = trained
    out = export_task(run_dir, TASK, "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(AUTO[architecture].from_pretrained(base), out)
    inputs = batch(learner, architecture)
    logits = ours(learner, inputs)
    same(theirs(model, inputs), logits)
    with torch.no_grad(), learner.bank.base_only():
        bare = learner.backbone.model(**inputs).logits
    assert not torch.allclose(logits, bare, atol=1e-3)  # the LoRA is not a no-op

    sites = learner.bank.sites
    mine = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert mine["task_type"] == TASK_TYPE[architecture] and mine["auto_mapping"] is None
    assert mine["fan_in_fan_out"] is (architecture == "gpt2")  # Conv1D layers
    assert mine["base_model_name_or_path"] == str(base.resolve())
    wrapped = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(sites)  # exactly our layers: never the LM head
    run = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    if run["config"]["lora"]["targets"] == [FIRST_LAYER]:  # suffixes would match layer 1 too
        assert mine["target_modules"] == sorted(sites)
    else:
        assert mine["target_modules"] == sorted({s.rsplit(".", 1)[-1] for s in sites})  # as peft
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{s}.lora_{p}.weight" for s in sites for p in "AB"}

    # peft re-saving what it loaded writes the same tensors and the same value for every field
    model.save_pretrained(tmp_path / "resaved")
    again = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text(encoding="utf-8"))
    for key, value in mine.items():
        equal = set(value) == set(again[key]) if key == "target_modules" else value == again[key]
        assert equal, (key, value, again[key])
    again_t = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert again_t.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], again_t[k]) for k in tensors)


def test_first_task_exports_its_own_slot(trained, tmp_path):
    architecture, learner, run_dir, base = trained
    out = export_task(run_dir, "colors", "peft", tmp_path / "colors")
    model = peft.PeftModel.from_pretrained(AUTO[architecture].from_pretrained(base), out)
    inputs = batch(learner, architecture)
    same(theirs(model, inputs), ours(learner, inputs, "colors"))
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels == learner.learned["colors"].task.labels  # label-scored: in score order


def test_merged_export_is_a_plain_model_with_our_logits(trained, tmp_path):
    architecture, learner, run_dir, _ = trained
    out = export_task(run_dir, TASK, "merged", tmp_path / "merged")
    inputs = batch(learner, architecture)
    same(theirs(AUTO[architecture].from_pretrained(out), inputs), ours(learner, inputs))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXTS)["input_ids"] == learner.backbone.encode(TEXTS).items

    # no head file (the LM head answers); what to prompt and how answers are read, said instead
    assert not (out / "head.safetensors").exists() and not (out / "labels.json").exists()
    info = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
    assert "no head file" in info["head"] and info["task"] == TASK
    assert info["answers"]["task_kind"] == "generation"
    assert info["answers"]["prompt_template"] == "Input: {text} Output:"
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "no head file" in readme and f"{AUTO[architecture].__name__}.from_pretrained" in readme


def test_gpt2_merged_weights_equal_peft_merge_and_unload(tmp_path):
    """Conv1D stores (d_in, d_out): the merged weight is W + scale · (B A)^T, as peft merges it."""
    base = save_tiny(tmp_path / "base", "gpt2", LM_WORDS)
    learn(base, tmp_path / "run", ["all-linear"])
    merged = AutoModelForCausalLM.from_pretrained(
        export_task(tmp_path / "run", TASK, "merged", tmp_path / "merged")
    )
    adapter = export_task(tmp_path / "run", TASK, "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    reference = model.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-6)
    conv = merged.transformer.h[0].attn.c_attn.weight  # (d_in, d_out)
    assert not torch.equal(
        conv,
        AutoModelForCausalLM.from_pretrained(base).state_dict()[
            "transformer.h.0.attn.c_attn.weight"
        ],
    )


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_cli_export(trained, tmp_path, fmt):
    _, _, run_dir, _ = trained
    out = tmp_path / fmt
    args = ["export", "--run", str(run_dir), "--task", TASK, "--format", fmt, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = "adapter_config.json" if fmt == "peft" else "config.json"
    assert (out / config).is_file() and (out / "continual_peft.json").is_file()
    assert not (out / "head.safetensors").exists()


# ---------------------------------------------------------------- refusals


def test_a_prompt_task_on_a_generative_run_is_refused(tmp_path):
    base = save_tiny(tmp_path / "base", "llama", LM_WORDS)
    learn(base, tmp_path / "run", ["all-linear"], module="prompt")
    for fmt in ("peft", "merged"):
        with pytest.raises(ContinualPeftError, match=r"\['prompt'\] module.*can express only"):
            export_task(tmp_path / "run", TASK, fmt, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_run_on_an_in_memory_language_model_is_refused_by_name(tmp_path):
    """Only a model's config tells Conv1D from nn.Linear layers: without it, no guess."""
    tokenizer = word_tokenizer(LM_WORDS)
    model = tiny_model("gpt2", len(tokenizer))
    backbone = CausalBackbone(model, tokenizer, max_length=32, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=config(["all-linear"]), run_dir=tmp_path / "run")
    learner.learn(lm_word_tasks()[1])
    learner.finish()
    with pytest.raises(ContinualPeftError, match="cannot read the config.*GPT2LMHeadModel"):
        export_task(tmp_path / "run", TASK, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_conv1d_merge_of_the_wrong_shape_is_refused(tmp_path):
    model = tiny_model("gpt2", vocab_size=32)  # hidden 64: c_attn's weight is (64, 192)
    layer = "transformer.h.0.attn.c_attn"
    right = {"lora_A": torch.ones(4, 64), "lora_B": torch.ones(192, 4), "scale": torch.tensor(0.5)}
    before = model.get_submodule(layer).weight.clone()
    merge_lora(model, {layer: right})  # fits: each entry of (B A)^T is 4, times 0.5
    torch.testing.assert_close(model.get_submodule(layer).weight, before + 2.0)
    wrong = {**right, "lora_B": torch.zeros(64, 4)}  # d_out 64, not 192
    with pytest.raises(
        ContinualPeftError,
        match=r"d_in 64 to d_out 64 .*Conv1D layer's weight "
        r"is \(64, 192\), stored \(d_in, d_out\)",
    ):
        merge_lora(model, {layer: wrong})
    with pytest.raises(ContinualPeftError, match=r"no nn.Linear or Conv1D layer 'lm_heads'"):
        merge_lora(model, {"lm_heads": right})
    layout = read_layout(str(save_tiny(tmp_path / "gpt2", "gpt2", LM_WORDS)), "GPT2LMHeadModel")
    with pytest.raises(ContinualPeftError, match=r"'transformer.h.0.attn' \(GPT2Attention\)"):
        layout.check([layer, "transformer.h.0.attn"], "fruit")
