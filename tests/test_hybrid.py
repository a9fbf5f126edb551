"""Hybrid slots: several module kinds in one task's slot ("lora+prompt", "adapter+prefix").

A hybrid slot's parts are rows of their kinds' stacks, so the hybrid must equal its parts used
together as plain slots, mix per row with plain slots in one forward, train every part at once,
save and load under part-named keys, and be refused by name where a part cannot go.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, load_tokenizer, tiny_backbone, word_task

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig, ModuleBank
from continual_peft.config import TrainConfig
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules import MODULE_KINDS, kind_parts

HYBRIDS = ["lora+prompt", "adapter+prefix", "prompt+lora+adapter"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _batch(backbone, texts=("red apple car", "a dog sleeps at home today", "sad", "blue")):
    return backbone.collate(backbone.encode(list(texts)).items)


def _randomise(bank: ModuleBank, seed: int) -> None:
    """Give the trainable slot random non-zero values everywhere (up-projections too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _hybrid_and_parts(tokenizer, kind: str) -> tuple[ModuleBank, int, list[int]]:
    """A bank holding a random hybrid slot of `kind`, then each of its parts again as a plain
    slot with the same values; returns the bank, the hybrid slot and the plain slots."""
    backbone = tiny_backbone(tokenizer)
    bank = ModuleBank(backbone, kind)
    hybrid = bank.add_slot(seed=3)
    _randomise(bank, seed=3)
    bank.freeze_slot()
    state = bank.slot_state(hybrid)
    plain = []
    for part in kind_parts(kind):
        prefix = f"{part}/"
        part_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        plain.append(bank.load_slot(part_state, kind=part))
    backbone.eval()
    return bank, hybrid, plain


@pytest.mark.parametrize("kind", HYBRIDS)
def test_a_hybrid_slot_is_its_parts_used_together(tokenizer, kind):
    bank, hybrid, plain = _hybrid_and_parts(tokenizer, kind)
    batch = _batch(bank.backbone)
    with torch.no_grad():
        with bank.use_slot(hybrid):
            together = bank.backbone.embed(batch)
        with bank.use_slots(plain):
            parts = bank.backbone.embed(batch)
        with bank.base_only():
            base = bank.backbone.embed(batch)
    assert_close(together, parts)
    for part_slot in plain:  # every part moves the output: none is silently left out
        with torch.no_grad(), bank.use_slot(part_slot):
            assert not torch.allclose(bank.backbone.embed(batch), base, atol=1e-4)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_hybrid_and_plain_slots_mix_per_row_in_one_forward(tokenizer, kind):
    bank, hybrid, plain = _hybrid_and_parts(tokenizer, kind)
    batch = _batch(bank.backbone)
    rows = torch.tensor([hybrid, plain[0], -1, hybrid], device="cpu")
    with torch.no_grad(), bank.route(rows):
        mixed = bank.backbone.embed(batch)
    for row, slot in enumerate(rows.tolist()):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        context = bank.base_only() if slot < 0 else bank.use_slot(slot)
        with torch.no_grad(), context:
            expected = bank.backbone.embed(alone)
        assert_close(mixed[row : row + 1], expected)


def test_a_hybrid_slot_trains_every_part_and_saves_under_part_names(tokenizer):
    bank = ModuleBank(tiny_backbone(tokenizer), "lora")
    slot = bank.add_slot(seed=0, kind="lora+prompt")
    trainable = bank.trainable_parameters()
    lora_params = [p for s in bank.kind_sites["lora"].values() for p in s.trainable_parameters()]
    prompt_params = [
        p for s in bank.kind_sites["prompt"].values() for p in s.trainable_parameters()
    ]
    assert lora_params and prompt_params
    assert {id(p) for p in trainable} == {id(p) for p in lora_params + prompt_params}
    batch = _batch(bank.backbone)
    with bank.use_slot(slot):
        bank.backbone.embed(batch).pow(2).sum().backward()
    # B starts at zero, so A gets no gradient on the first step; B and the prompt do
    assert all(p.grad is not None for p in prompt_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)
    bank.freeze_slot()
    state = bank.slot_state(slot)
    assert {key.split("/", 1)[0] for key in state} == {"lora", "prompt"}
    # loaded back into a fresh bank, the slot gives the same output
    other = ModuleBank(tiny_backbone(tokenizer), "lora")
    loaded = other.load_slot(state, kind="lora+prompt")
    assert other.slot_state(loaded).keys() == state.keys()
    for module in (bank, other):
        module.backbone.eval()
    with torch.no_grad(), bank.use_slot(slot), other.use_slot(loaded):
        assert_close(other.backbone.embed(batch), bank.backbone.embed(batch))


def test_two_kinds_on_one_layer_keep_their_tensors_apart(tokenizer):
    """LoRA on every linear layer and an adapter on the FFN output both wrap `output.dense`:
    the hybrid's state keeps both sites' `scale` under their own part."""
    from continual_peft.modules.lora import LoRAConfig

    bank = ModuleBank(
        tiny_backbone(tokenizer),
        "lora+adapter",
        configs={"lora": LoRAConfig(targets=["all-linear"])},
    )
    slot = bank.add_slot(seed=0)
    bank.freeze_slot()
    state = bank.slot_state(slot)
    layer = "encoder.layer.0.output.dense"
    assert f"lora/{layer}.scale" in state and f"adapter/{layer}.scale" in state
    assert float(state[f"lora/{layer}.scale"]) != float(state[f"adapter/{layer}.scale"])


def test_a_budget_releases_and_reopens_hybrid_rows_without_moving_others(tokenizer):
    """Releasing a hybrid slot and reopening it as another kind keeps every other slot's
    values, in every part's stacks (the rows move, the values do not)."""
    bank = ModuleBank(tiny_backbone(tokenizer), "lora")
    kinds = ["lora+prompt", "lora", "prompt+lora", "prompt"]
    for seed, kind in enumerate(kinds):
        bank.add_slot(seed=seed, kind=kind)
        _randomise(bank, seed)
        bank.freeze_slot()
    before = {slot: bank.slot_state(slot) for slot in range(len(kinds))}
    bank.backbone.eval()
    batch = _batch(bank.backbone)
    with torch.no_grad(), bank.use_slot(2):
        output = bank.backbone.embed(batch)
    bank.release(0)
    reopened = bank.add_slot(seed=9, kind="lora")
    assert reopened == 0 and bank.slot_kinds == ["lora", "lora", "prompt+lora", "prompt"]
    bank.freeze_slot()
    for slot in (1, 2, 3):
        after = bank.slot_state(slot)
        assert after.keys() == before[slot].keys()
        for key in after:
            assert torch.equal(after[key], before[slot][key]), (slot, key)
    with torch.no_grad(), bank.use_slot(2):
        assert_close(bank.backbone.embed(batch), output)
    bank.truncate(2)
    assert bank.slot_kinds == ["lora", "lora"]
    # both slots left are plain LoRA: no prompt row stays behind, and two LoRA rows
    assert [s.stack.num_frozen for s in bank.kind_sites["prompt"].values()] == [0]
    assert {s.stack.num_frozen for s in bank.kind_sites["lora"].values()} == {2}


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("lora+bogus", r"unknown module kind 'bogus' in 'lora\+bogus'"),
        ("lora+", "an empty part in 'lora\\+'"),
        ("lora+lora", r"names \['lora'\] twice"),
        ("lora+prompt_pool", "'prompt_pool' cannot be one part of hybrid slot"),
        ("lora + prompt", "unknown module kind 'lora '"),
    ],
)
def test_a_bad_hybrid_is_refused_by_name_before_anything_loads(module, message):
    with pytest.raises(ContinualPeftError, match=message):
        LearnerConfig.from_dict({"module": module}, "spec.toml")
    with pytest.raises(ContinualPeftError, match=rf"spec.toml: tasks.colors.module: .*{message}"):
        LearnerConfig.from_dict({"tasks": {"colors": {"module": module}}}, "spec.toml")


def test_every_registered_kind_but_a_whole_method_can_be_a_part():
    kinds = [k for k in MODULE_KINDS.names() if k != "prompt_pool"]
    assert kind_parts("+".join(kinds)) == tuple(kinds)


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def hybrid_run(tokenizer, tmp_path_factory):
    """A per_task run whose first task has a lora+prompt slot and whose second a plain LoRA,
    with a router: (learner, run directory, tasks)."""
    run_dir = tmp_path_factory.mktemp("hybrid") / "run"
    config = LearnerConfig(
        module="lora+prompt",
        router="prototype",
        task_modules={"animals": "lora"},
        train=TrainConfig(epochs=1, batch_size=8, lr=3e-2, warmup=0.0, eval_batch_size=8),
    )
    tasks = [word_task(name, n_train=16, n_test=8) for name in ("colors", "animals")]
    learner = ContinualLearner(tiny_backbone(tokenizer, 16), config=config, run_dir=run_dir)
    for task in tasks:
        learner.learn(task)
    learner.finish()
    return learner, run_dir, tasks


def test_a_run_records_each_tasks_hybrid_kind(hybrid_run):
    learner, run_dir, _ = hybrid_run
    assert learner.bank.slot_kinds == ["lora+prompt", "lora"]
    assert [record["module"] for record in learner.records] == ["lora+prompt", "lora"]
    # the hybrid task trained both parts: more parameters than the plain LoRA task
    params = [record["trainable_parameters"] for record in learner.records]
    assert params[0] > params[1]


def test_a_hybrid_run_reloads_and_predicts_what_it_predicted(hybrid_run, tokenizer):
    learner, run_dir, tasks = hybrid_run
    texts = [x for task in tasks for x in task.test_inputs[:4]]
    names = [task.name for task in tasks for _ in range(4)]
    expected = learner.logits(texts, names)
    loaded = ContinualLearner.load(run_dir, tiny_backbone(tokenizer, 16))
    assert loaded.bank.slot_kinds == ["lora+prompt", "lora"]
    for got, want in zip(loaded.logits(texts, names), expected, strict=True):
        assert_close(got, want)


def test_exporting_a_hybrid_task_names_the_parts_peft_cannot_hold(hybrid_run, tmp_path):
    _, run_dir, _ = hybrid_run
    for format in ("peft", "merged"):
        with pytest.raises(ContinualPeftError, match=r"'colors' has a hybrid slot 'lora\+prompt'"):
            export_task(run_dir, "colors", format, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    # its plain LoRA task still exports
    export_task(run_dir, "animals", "peft", tmp_path / "animals")
    assert (tmp_path / "animals" / "adapter_model.safetensors").is_file()
