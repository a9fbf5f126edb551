"""(IA)^3 (`modules.ia3`): our vectors give peft's IA3 outputs on every family; a fresh slot changes
nothing; a mixed batch equals the multiplier 1 + Σ w δ recomputed by hand with hooks; a task
exports as peft's IA3 adapter and as a merged model, both giving the run's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    DEVICE,
    LM_WORDS,
    assert_close,
    lm_word_tasks,
    save_tiny_bert,
    tiny_backbone,
    tiny_bert,
    tiny_lm,
    tiny_vit,
    word_task,
)
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from typer.testing import CliRunner

from continual_peft import Backbone, ContinualLearner, ContinualPeftError, ModuleBank
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.tiny import save_tiny
from continual_peft.cli import app
from continual_peft.config import LearnerConfig
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules.ia3 import IA3Config

peft = pytest.importorskip("peft")

TEXTS = {
    "bert": ["a red apple", "the dog sleeps at home", "happy again at work now", "a blue cup"],
    "lm": ["Input: fruit of red Output:", "blue of crow", "apple plum fox", "red"],
}
AUTO = {"bert": AutoModel, "t5": AutoModelForSeq2SeqLM}  # the others: AutoModelForCausalLM
ENCODERS = ("bert", "vit")  # their output: the last hidden state; the others' logits
# peft has no IA3 default for the ViT family: ours, given to it explicitly
PEFT_OPTIONS = {
    "vit": {"target_modules": ["k_proj", "v_proj", "mlp.fc2"], "feedforward_modules": ["mlp.fc2"]}
}


def _backbone(family: str, tokenizer) -> Backbone:
    if family == "vit":
        return ImageBackbone(tiny_vit(), name="tiny-vit", device=DEVICE)
    return tiny_backbone(tokenizer) if family == "bert" else tiny_lm(family)


def _inputs(backbone: Backbone, family: str) -> dict[str, torch.Tensor]:
    if family == "vit":  # four 8x8 one-channel images
        return {"pixel_values": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    texts = TEXTS["bert" if family == "bert" else "lm"]
    inputs = backbone.collate(backbone.encode(texts).items)
    if family == "t5":  # the decoder's inputs too: its attention and cross-attention act
        ids = backbone.encode_targets(["apple plum", "fox", "yes no crow", "of"])
        start = backbone.model.config.decoder_start_token_id
        inputs["decoder_input_ids"] = backbone.collate([[start, *row] for row in ids])["input_ids"]
    return inputs


def _output(model: torch.nn.Module, inputs: dict, family: str) -> torch.Tensor:
    """An encoder's last hidden state, a language model's logits."""
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if family in ENCODERS else out.logits


def _peft_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "ia3_l")}


# ---------------------------------------------------------------- against peft


@pytest.mark.parametrize("family", ["bert", "vit", "llama", "qwen2", "gpt2", "t5"])
def test_ia3_with_peft_vectors_gives_peft_outputs(tokenizer, family):
    """peft's default targets for the model type, peft's vectors copied in as δ = l − 1."""
    backbone = _backbone(family, tokenizer)
    config = peft.IA3Config(**PEFT_OPTIONS.get(family, {}))
    theirs_model = peft.get_peft_model(copy.deepcopy(backbone.model), config).eval()
    layers = _peft_layers(theirs_model)
    bank = ModuleBank(backbone, "ia3")
    assert set(bank.sites) == set(layers) and layers
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, site in bank.sites.items():
        layer = layers[name]
        assert site.feedforward == layer.is_feedforward, name
        vector = layer.ia3_l["default"]  # (1, d_in) feed-forward, else (d_out, 1)
        with torch.no_grad():
            vector.copy_(1 + 0.3 * torch.randn(vector.shape, generator=generator))
        state[f"{name}.{site.name}"] = vector.detach().flatten() - 1
    slot = bank.load_slot(state)

    inputs = _inputs(backbone, family)
    with bank.use_slot(slot):
        ours = _output(backbone.model, inputs, family)
    assert_close(ours, _output(theirs_model, inputs, family))
    with bank.base_only():
        assert not torch.allclose(ours, _output(backbone.model, inputs, family), atol=1e-3)


def test_bert_output_dense_is_both_projections_scaled_on_their_input(tokenizer):
    """peft's BERT default "output.dense" matches by suffix both the attention output and the
    FFN output, and each is feed-forward (a target ENDING WITH the entry): four sites a layer."""
    bank = ModuleBank(tiny_backbone(tokenizer), "ia3")
    layer = "encoder.layer.0."
    sites = {n.removeprefix(layer): s for n, s in bank.sites.items() if n.startswith(layer)}
    assert sorted(sites) == [
        "attention.output.dense",
        "attention.self.key",
        "attention.self.value",
        "output.dense",
    ]
    assert {n for n, s in sites.items() if s.feedforward} == {
        "attention.output.dense",
        "output.dense",
    }
    assert sites["output.dense"].stack.ia3_in.shape == (0, 64)  # the FFN's input: d_in = 64
    assert sites["attention.self.key"].stack.ia3_out.shape == (0, 32)


def test_gpt2_scales_the_fused_c_attn_whole(tokenizer):
    bank = ModuleBank(tiny_lm("gpt2"), "ia3")
    ends = {n.split(".", 3)[-1]: s for n, s in bank.sites.items() if ".h.0." in n}
    assert sorted(ends) == ["attn.c_attn", "mlp.c_proj"]
    assert ends["attn.c_attn"].stack.ia3_out.shape == (0, 3 * 64)  # query, key and value
    assert ends["mlp.c_proj"].stack.ia3_in.shape == (0, 4 * 64)  # the MLP's activation


# ---------------------------------------------------------------- slots and mixing


def _random_slots(bank: ModuleBank, count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """`count` slots of random δ loaded into `bank`; their δ by site name."""
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(count):
        delta = {n: 0.3 * torch.randn(s.width, generator=generator) for n, s in bank.sites.items()}
        bank.load_slot({f"{n}.{bank.sites[n].name}": d for n, d in delta.items()})
        deltas.append(delta)
    return deltas


def _by_hand(model, sites: dict, multipliers: dict[str, torch.Tensor], inputs, family):
    """`model`'s output with each target layer's input or output times its multiplier m
    ((B, d) per row, or (d,)), by forward hooks on an unwrapped copy."""
    handles = []
    for name, m in multipliers.items():
        layer, per_row = model.get_submodule(name), m[:, None] if m.dim() == 2 else m
        if sites[name].feedforward:
            handles.append(layer.register_forward_pre_hook(lambda _, a, m=per_row: (a[0] * m,)))
        else:
            handles.append(layer.register_forward_hook(lambda _, a, out, m=per_row: out * m))
    try:
        return _output(model, inputs, family)
    finally:
        for handle in handles:
            handle.remove()


def _row_multipliers(indices, weights, deltas, name: str) -> torch.Tensor:
    """(B, d) each row's m = 1 + Σ w δ over its entries that name a slot (index >= 0)."""
    rows = []
    for row_slots, row_weights in zip(indices.tolist(), weights.tolist(), strict=True):
        m = torch.ones_like(deltas[0][name])
        for slot, weight in zip(row_slots, row_weights, strict=True):
            if slot >= 0:
                m = m + weight * deltas[slot][name]
        rows.append(m)
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_mixed_batch_equals_the_multiplier_recomputed_by_hand(tokenizer, family):
    """Rows on slot 0, slot 1, no slot, and 0.3·slot 0 + 0.7·slot 1 in ONE forward: each row is
    scaled by m = 1 + Σ w δ; a single-slot row equals that slot alone, the empty row the base."""
    backbone = _backbone(family, tokenizer)
    plain = copy.deepcopy(backbone.model)
    bank = ModuleBank(backbone, "ia3")
    deltas = _random_slots(bank, 2)
    inputs = _inputs(backbone, family)
    indices = torch.tensor([[0, -1], [1, -1], [-1, -1], [0, 1]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.3, 0.7]])
    with bank.route(indices, weights):
        mixed = _output(backbone.model, inputs, family)

    multipliers = {name: _row_multipliers(indices, weights, deltas, name) for name in bank.sites}
    assert_close(mixed, _by_hand(plain, bank.sites, multipliers, inputs, family))
    for row, slot in ((0, 0), (1, 1)):
        with bank.use_slot(slot):
            assert_close(mixed[row], _output(backbone.model, inputs, family)[row])
    with bank.base_only():
        assert torch.equal(mixed[2], _output(backbone.model, inputs, family)[2])

    with bank.use_slots([0, 1], [0.3, 0.7]):  # every row on the same mix
        shared = _output(backbone.model, inputs, family)
    mix = {name: 1 + 0.3 * deltas[0][name] + 0.7 * deltas[1][name] for name in bank.sites}
    assert_close(shared, _by_hand(plain, bank.sites, mix, inputs, family))
    assert_close(shared[3], mixed[3])


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_a_fresh_slot_leaves_the_output_bit_identical(tokenizer, family):
    backbone = _backbone(family, tokenizer)
    bank = ModuleBank(backbone, "ia3")
    inputs = _inputs(backbone, family)
    with bank.base_only():
        bare = _output(backbone.model, inputs, family)
    slot = bank.add_slot(seed=0)
    trainable = bank.trainable_parameters()
    assert len(trainable) == len(bank.sites) and all(p.dtype == torch.float32 for p in trainable)
    with bank.use_slot(slot):
        assert torch.equal(_output(backbone.model, inputs, family), bare)


def test_bfloat16_slots_keep_a_small_delta(tokenizer):
    """δ = 1e-3 in a bfloat16 stack stays 1e-3 (to bfloat16's 8 bits), where a stored l = 1 + δ
    would be exactly 1: a small trained δ is not lost when its slot is frozen."""
    backbone = Backbone(tiny_bert(tokenizer), tokenizer, 32, device=DEVICE, dtype="bfloat16")
    bank = ModuleBank(backbone, "ia3")
    site = next(iter(bank.sites.values()))
    bank.load_slot({f"{n}.{s.name}": torch.full((s.width,), 1e-3) for n, s in bank.sites.items()})
    stored = getattr(site.stack, site.name)[0]
    assert stored.dtype == torch.bfloat16
    assert_close(stored.float(), torch.full_like(stored.float(), 1e-3), dtype=torch.bfloat16)
    assert (torch.tensor(1.0, dtype=torch.bfloat16) + 1e-3).item() == 1.0  # what it avoids


@pytest.mark.parametrize("first", ["lora", "ia3"])
def test_ia3_and_lora_on_one_layer_in_either_order(tokenizer, first):
    """Both wrap BERT's `value`: whichever is injected first, the other wraps its site, and
    each kind's slot alone gives what it gives on a bank of its own."""
    inputs = _inputs(tiny_backbone(tokenizer), "bert")
    states, expected = {}, {}
    for kind in ("lora", "ia3"):
        bank = ModuleBank(tiny_backbone(tokenizer), kind)
        slot = bank.add_slot(seed=0)
        with torch.no_grad():
            for parameter in bank.trainable_parameters():
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        bank.freeze_slot()
        states[kind] = bank.slot_state(slot)
        with bank.use_slot(slot):
            expected[kind] = _output(bank.backbone.model, inputs, "bert")
    both = ModuleBank(tiny_backbone(tokenizer), first)
    second = "ia3" if first == "lora" else "lora"
    slots = {kind: both.load_slot(states[kind], kind) for kind in (first, second)}
    value = "encoder.layer.0.attention.self.value"
    assert both.kind_sites[second][value].base_layer is both.kind_sites[first][value]
    for kind, slot in slots.items():
        with both.use_slot(slot):
            assert_close(_output(both.backbone.model, inputs, "bert"), expected[kind])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": []}, r"targets = \[\] selects no layer"),
        ({"targets": ["auto", "key"]}, 'mixes "auto" with names'),
        ({"feedforward": "wo"}, "ia3 feedforward = 'wo' is invalid; it must be a list"),
        ({"targets": [""]}, "ia3 targets = \\[''\\] is invalid"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ContinualPeftError, match=message):
        IA3Config(**options)


def test_explicit_targets_and_feedforward(tokenizer):
    config = IA3Config(targets=["value", "intermediate.dense"], feedforward=["intermediate.dense"])
    bank = ModuleBank(tiny_backbone(tokenizer), "ia3", config)
    assert sorted({n.split(".", 3)[-1] for n in bank.sites}) == [
        "attention.self.value",
        "intermediate.dense",
    ]
    assert {n for n, s in bank.sites.items() if s.feedforward} == {
        f"encoder.layer.{i}.intermediate.dense" for i in range(2)
    }
    none = ModuleBank(tiny_backbone(tokenizer), "ia3", IA3Config(feedforward=[]))
    assert not any(s.feedforward for s in none.sites.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": ["nope"]}, "no nn.Linear layer matches targets \\['nope'\\].*query"),
        (
            {"targets": ["key"], "feedforward": ["down_proj"]},
            "feedforward entry 'down_proj' matches none of the layers.*self.key",
        ),
    ],
)
def test_targets_that_match_nothing_name_the_layers(tokenizer, options, message):
    with pytest.raises(ContinualPeftError, match=message):
        ModuleBank(tiny_backbone(tokenizer), "ia3", IA3Config(**options))


def test_auto_on_an_unknown_model_type_names_the_known_ones_and_the_layers(tokenizer):
    backbone = tiny_backbone(tokenizer)
    backbone.model.config.model_type = "mystery"
    expected = "model types bart, .*bert, .*is 'mystery'.*layers: .*query"
    with pytest.raises(ContinualPeftError, match=expected):
        ModuleBank(backbone, "ia3")


# ---------------------------------------------------------------- export


def _config(**overrides) -> LearnerConfig:
    return LearnerConfig.from_dict(
        {
            "strategy": "per_task",
            "module": "ia3",
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-2, "warmup": 0.0},
            "generation": {"max_new_tokens": 2},
            **overrides,
        }
    )


@pytest.fixture(scope="module", params=["bert", "llama", "gpt2", "t5"])
def trained(request, tmp_path_factory, tokenizer):
    """(family, learner, run dir, base folder, exported task) of an ia3 run on a saved tiny
    model; the BERT run's last task is a prompt, which no peft format holds."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    if family == "bert":
        base = save_tiny_bert(root / "base", tokenizer)
        tasks = [word_task(n, n_train=16, n_test=4) for n in ("colors", "animals", "moods")]
        config = _config(tasks={"moods": {"module": "prompt"}})
    else:
        base = save_tiny(root / "base", family, LM_WORDS)
        tasks, config = lm_word_tasks(), _config()
    backbone = Backbone.from_pretrained(str(base), max_length=32, device=DEVICE, dtype="float32")
    learner = ContinualLearner(backbone, config=config, run_dir=root / "run")
    for task in tasks:
        learner.learn(task)
    learner.finish()
    return family, learner, root / "run", base, tasks[1].name


def _ours(learner: ContinualLearner, family: str, task: str) -> tuple[torch.Tensor, dict]:
    inputs = _inputs(learner.backbone, family)
    with learner.use_task(task):
        return _output(learner.backbone.model, inputs, family), inputs


def test_peft_export_loads_in_peft_with_our_outputs(trained, tmp_path):
    family, learner, run_dir, base, task = trained
    out = export_task(run_dir, task, "peft", tmp_path / "peft")
    auto = AUTO.get(family, AutoModelForCausalLM)
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(base), out).eval()
    ours, inputs = _ours(learner, family, task)
    assert_close(_output(model, inputs, family), ours)
    with learner.bank.base_only():
        assert not torch.allclose(ours, _output(learner.backbone.model, inputs, family), atol=1e-4)

    sites = learner.bank.kind_sites["ia3"]
    layers = _peft_layers(model)
    assert set(layers) == set(sites)  # exactly our layers, each scaled on the same side
    assert all(layers[n].is_feedforward == s.feedforward for n, s in sites.items())
    mine = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert mine["peft_type"] == "IA3"
    assert mine["task_type"] == {"bert": None, "t5": "SEQ_2_SEQ_LM"}.get(family, "CAUSAL_LM")
    assert mine["fan_in_fan_out"] is (family == "gpt2")  # Conv1D layers
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.ia3_l" for n in sites}

    # peft re-saving what it loaded writes the same tensors and the same value for every field
    model.save_pretrained(tmp_path / "resaved")
    again = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text(encoding="utf-8"))
    for key, value in mine.items():
        lists = key in ("target_modules", "feedforward_modules")
        assert (set(value) == set(again[key])) if lists else value == again[key], key
    again_t = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert again_t.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], again_t[k]) for k in tensors)
    assert (out / "head.safetensors").exists() is (family == "bert")


def test_merged_export_gives_our_outputs(trained, tmp_path):
    family, learner, run_dir, _, task = trained
    out = export_task(run_dir, task, "merged", tmp_path / "merged")
    model = AUTO.get(family, AutoModelForCausalLM).from_pretrained(out).eval()
    ours, inputs = _ours(learner, family, task)
    assert_close(_output(model, inputs, family), ours)


def test_cli_export_and_a_prompt_task_refused_naming_the_exportable_kinds(trained, tmp_path):
    family, _, run_dir, _, task = trained
    if family != "bert":
        pytest.skip("the command line and the refusal once, on the BERT run")
    out = tmp_path / "cli"
    args = ["export", "--run", str(run_dir), "--task", task, "--format", "peft", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))["module"] == "ia3"
    with pytest.raises(ContinualPeftError, match=r"\['prompt'\].*\('lora', 'ia3'\)"):
        export_task(run_dir, "moods", "peft", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
