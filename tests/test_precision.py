"""The precision policy: frozen weights and frozen slots in the compute dtype, the trainable slot
and head in float32 (master weights), losses and metrics in float32; `dtype` in the config."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, FAST_TRAIN, library_resolve_dtype, tiny_bert, tolerance, word_task

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, ModuleBank
from continual_peft.backbones.placement import Placement
from continual_peft.config import BackboneConfig, LearnerConfig
from continual_peft.engine.loading import load_learner


def _backbone(tokenizer, dtype: str) -> Backbone:
    return Backbone(tiny_bert(tokenizer), tokenizer, max_length=16, device=DEVICE, dtype=dtype)


def test_auto_is_float32_on_the_cpu_and_names_are_checked():
    assert library_resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert library_resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ContinualPeftError, match=r"unknown dtype 'half'; valid choices: auto"):
        Placement.of("cpu", "half")
    with pytest.raises(ContinualPeftError, match="backbone.dtype = 'fp8' is invalid"):
        LearnerConfig(backbone=BackboneConfig(dtype="fp8")).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_asking_for_cuda_without_one_names_the_problem():
    with pytest.raises(ContinualPeftError, match="torch sees no CUDA device here"):
        Placement.of("cuda")


def test_bfloat16_backbone_keeps_float32_master_weights(tokenizer):
    backbone = _backbone(tokenizer, "bfloat16")
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    bank = ModuleBank(backbone, "lora")
    bank.add_slot(seed=0)
    trainable = bank.trainable_parameters()
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    bank.freeze_slot()
    site = next(iter(bank.sites.values()))
    assert site.stack.lora_A.dtype == torch.bfloat16  # frozen: stored in the compute dtype


def test_bfloat16_run_learns_and_saves_what_it_evaluated(tokenizer, tmp_path):
    config = LearnerConfig(strategy="seq", train=FAST_TRAIN)
    learner = ContinualLearner(_backbone(tokenizer, "bfloat16"), config=config, run_dir=tmp_path)
    tasks = [word_task("colors"), word_task("animals")]
    for task in tasks:
        learner.learn(task)
    assert all(h.weight.dtype == torch.float32 for h in learner.heads.heads.values())
    assert learner.report["metrics"]["oracle"]["acc"] > 0.6  # learns in bfloat16 too
    # the shared slot stays trainable: resumed at full precision, not rounded through bfloat16
    before = [p.detach().clone() for p in learner.bank.trainable_parameters()]
    learner.finish()
    again = load_learner(tmp_path, backbone=_backbone(tokenizer, "bfloat16"), tasks=tasks)
    after = again.bank.trainable_parameters()
    assert [p.dtype for p in after] == [torch.float32] * len(before)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)
    texts = [*tasks[0].test_inputs[:8]]
    assert again.predict(texts, task="colors") == learner.predict(texts, task="colors")


def test_fingerprint_names_the_same_weights_in_any_dtype_and_records_the_dtype(tokenizer):
    fp32, bf16 = _backbone(tokenizer, "float32").fingerprint(), _backbone(tokenizer, "bfloat16")
    bf16 = bf16.fingerprint()
    assert fp32["weights_sha256"] == bf16["weights_sha256"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")


def test_bfloat16_output_is_close_to_float32(tokenizer):
    """The routed forward in bfloat16 stays within bfloat16's tolerance of float32's."""
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        backbone = _backbone(tokenizer, dtype)
        bank = ModuleBank(backbone, "lora")
        for seed in range(3):
            bank.add_slot(seed=seed)
            with torch.no_grad():
                for site in bank.sites.values():
                    generator = torch.Generator().manual_seed(seed)
                    b = site.stack.trainable["lora_B"]
                    b.copy_(0.5 * torch.randn(b.shape, generator=generator))
            bank.freeze_slot()
        batch = backbone.collate(backbone.encode(["red car", "a dog sleeps now", "x"]).items)
        with torch.no_grad(), bank.route(torch.tensor([2, 0, 1])):
            outputs[dtype] = backbone.embed(batch).float().cpu()
    torch.testing.assert_close(outputs["bfloat16"], outputs["float32"], **tolerance(torch.bfloat16))


@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "cuda:notanumber", "cpu x"])
def test_a_device_that_is_not_cpu_or_cuda_is_refused_with_the_choices(device):
    with pytest.raises(ContinualPeftError, match=r"use cpu, cuda, cuda:N"):
        Placement.of(device)


def test_cli_refuses_a_bad_device_or_dtype_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from continual_peft.cli import app

    for option, value, message in [
        ("--device", "tpu", "unknown device 'tpu'"),
        ("--dtype", "fp8", "backbone.dtype = 'fp8' is invalid"),
    ]:
        out = tmp_path / value
        result = CliRunner().invoke(app, ["run", option, value, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.output and not out.exists()


def test_a_run_records_the_dtype_it_computed_in_and_keeps_it(tokenizer, tmp_path):
    """config.json says bfloat16 (not "auto"); reloading keeps it unless asked otherwise, and a
    resume in another dtype is refused."""
    import json

    task = word_task("colors", n_train=12, n_test=6)
    learner = ContinualLearner(_backbone(tokenizer, "bfloat16"), train=FAST_TRAIN, run_dir=tmp_path)
    learner.learn(task)
    learner.finish()
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["config"]
    assert saved["backbone"]["dtype"] == "bfloat16" and saved["backbone"]["max_length"] == 16
    assert load_learner(tmp_path, backbone=_backbone(tokenizer, "bfloat16")).backbone.dtype == (
        torch.bfloat16
    )
    from continual_peft.engine.saved_run import check_same_config
    from continual_peft.store.migration import upgrade_config

    config = LearnerConfig.from_dict(saved)
    config.backbone.dtype = "float32"
    with pytest.raises(ContinualPeftError, match="backbone.dtype: 'bfloat16' in the run"):
        check_same_config(tmp_path, LearnerConfig.from_dict(saved), config)
    # a format-1 config.json said "auto" for the dtype its fingerprint records
    legacy = {"config": {**saved, "backbone": {**saved["backbone"], "dtype": "auto"}}}
    upgraded = upgrade_config({**legacy, "backbone": {"dtype": "bfloat16"}})["config"]
    check_same_config(tmp_path, LearnerConfig.from_dict(upgraded), LearnerConfig.from_dict(saved))


def test_compare_refuses_a_bad_device_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from continual_peft.cli import app

    out = tmp_path / "c"
    result = CliRunner().invoke(
        app, ["compare", "--strategies", "per_task,seq", "--device", "tpu", "--out", str(out)]
    )
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output, result.output
    assert not out.exists()
