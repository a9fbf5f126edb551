"""BitFit (Ben Zaken et al. 2022): a slot's bias deltas equal the backbone with biases b + Σ w·δ,
row by row in a mixed batch; training a slot equals training the backbone's biases; which layers
get a site per family; bias-free models and bad settings are refused by name."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import DEVICE, assert_close, tiny_bert, tiny_lm, tiny_vit

from continual_peft import Backbone, ContinualPeftError, ModuleBank, load_strategy_spec
from continual_peft.backbones.image import ImageBackbone
from continual_peft.modules.bitfit import BitFitConfig
from continual_peft.modules.lowrank import LowRankSite, conv1d_type

ROWS = [[0, -1], [1, -1], [-1, -1], [0, 1]]  # slot 0, slot 1, no slot, a mix of both
WEIGHTS = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.3, -0.7]]


def _built(family: str, tokenizer) -> tuple[Backbone, dict[str, torch.Tensor]]:
    """A float32 tiny backbone of `family` and a (4, ...) batch of inputs for its model."""
    generator = torch.Generator().manual_seed(0)
    if family == "bert":
        backbone = Backbone(tiny_bert(tokenizer), tokenizer, 32, device=DEVICE, dtype="float32")
    elif family == "vit":
        backbone = ImageBackbone(tiny_vit(), device=DEVICE, dtype="float32")
        return backbone, {"pixel_values": torch.randn(4, 1, 8, 8, generator=generator)}
    else:
        backbone = tiny_lm(family)
    ids = torch.randint(4, backbone.tokenizer.vocab_size, (4, 6), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        inputs["decoder_input_ids"] = ids
    return backbone, inputs


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**{k: v.to(DEVICE) for k, v in inputs.items()})
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _with_biases(model: torch.nn.Module, bank: ModuleBank, mix: dict[int, float]):
    """A copy of the unwrapped `model` whose tuned layers' biases are b + Σ_s mix[s]·δ_s (a
    layer without a bias gets one: b = 0)."""
    changed = copy.deepcopy(model)
    states = {slot: bank.slot_state(slot) for slot in mix}
    for name, site in bank.sites.items():
        layer = changed.get_submodule(name)
        zero = torch.zeros(site.size, device=DEVICE)
        delta = sum((w * states[s][f"{name}.bias_delta"].float() for s, w in mix.items()), zero)
        bias = delta if layer.bias is None else layer.bias.detach() + delta
        layer.bias = torch.nn.Parameter(bias.to(layer.weight), requires_grad=False)
    return changed


def _random_slots(bank: ModuleBank) -> None:
    """Slot 0 frozen and slot 1 still trainable, both with random deltas."""
    torch.manual_seed(1)
    for seed in (1, 2):
        if seed == 2:
            bank.freeze_slot()
        bank.add_slot(seed=seed)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("bert", {}),
        ("vit", {}),
        ("gpt2", {}),
        ("qwen2", {}),
        ("qwen2", {"bias_free": "add"}),
        ("llama", {"bias_free": "add"}),
        ("t5", {"bias_free": "add"}),
    ],
)
def test_a_mixed_batch_equals_the_model_with_each_rows_biases(tokenizer, family, options):
    backbone, inputs = _built(family, tokenizer)
    model = copy.deepcopy(backbone.model)  # the unwrapped original
    bank = ModuleBank(backbone, "bitfit", BitFitConfig(**options))
    _random_slots(bank)

    with torch.no_grad(), bank.route(torch.tensor(ROWS), torch.tensor(WEIGHTS)):
        mixed = _output(backbone.model, inputs)
    for row, (slots, weights) in enumerate(zip(ROWS, WEIGHTS, strict=True)):
        mix = {s: w for s, w in zip(slots, weights, strict=True) if s >= 0}
        expected = _output(_with_biases(model, bank, mix), inputs)
        assert_close(mixed[row], expected[row], torch.float32)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the deltas do act

    with torch.no_grad(), bank.use_slots([0, 1], [0.3, -0.7]):  # one mix shared by every row
        shared = _output(backbone.model, inputs)
    assert_close(shared, _output(_with_biases(model, bank, {0: 0.3, 1: -0.7}), inputs))
    with torch.no_grad(), bank.use_slot(0):
        single = _output(backbone.model, inputs)
    assert_close(single, _output(_with_biases(model, bank, {0: 1.0}), inputs), torch.float32)


def test_training_a_slot_equals_training_the_backbones_biases(tokenizer):
    """The paper's method: SGD on the bias terms alone. A slot's delta after N steps is the
    trained bias minus the original one (∂loss/∂δ = ∂loss/∂b, both start at the same model)."""
    model = tiny_bert(tokenizer)  # eval mode: no dropout
    plain = Backbone(copy.deepcopy(model), tokenizer, 32, device=DEVICE, dtype="float32")
    biases = {n: p for n, p in plain.model.named_parameters() if n.endswith(".bias")}
    original = {n: p.detach().clone() for n, p in biases.items()}
    for p in biases.values():
        p.requires_grad_(True)
    backbone = Backbone(model, tokenizer, 32, device=DEVICE, dtype="float32")
    bank = ModuleBank(backbone, "bitfit")
    slot = bank.add_slot(seed=0)
    assert {f"{name}.bias" for name in bank.sites} == set(biases)  # every bias, nothing else

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 3).to(DEVICE).requires_grad_(False)
    texts = ["red apple car", "a dog sleeps at home today", "sad", "the blue cup"]
    batch = backbone.collate(backbone.encode(texts).items)
    labels = torch.tensor([0, 1, 2, 1], device=DEVICE)

    def train(parameters: list[torch.nn.Parameter], embed: Callable[[], torch.Tensor]) -> None:
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(embed()), labels).backward()
            optimizer.step()

    with bank.use_slot(slot):
        train(bank.trainable_parameters(), lambda: backbone.embed(batch))
    train(list(biases.values()), lambda: plain.embed(batch))

    state = bank.slot_state(slot)
    for name in bank.sites:
        trained = biases[f"{name}.bias"].detach() - original[f"{name}.bias"]
        torch.testing.assert_close(state[f"{name}.bias_delta"], trained, atol=1e-5, rtol=0)
    assert max(float(t.abs().max()) for t in state.values()) > 1e-2  # it did train


@pytest.mark.parametrize(
    ("family", "options", "layers"),
    [
        ("bert", {}, "every bias"),
        ("vit", {}, "every bias"),  # but the Conv2d patch embedding's
        ("gpt2", {}, "every bias"),
        ("qwen2", {}, "every bias"),  # q/k/v only
        ("bert", {"layer_norm": False}, "linear biases"),
        ("gpt2", {"layer_norm": False}, "linear biases"),
        ("qwen2", {"bias_free": "add"}, "every linear"),
        ("llama", {"bias_free": "add"}, "every linear"),
        ("t5", {"bias_free": "add"}, "every linear"),
    ],
)
def test_sites_are_the_layers_with_a_bias_and_never_the_head(tokenizer, family, options, layers):
    backbone, _ = _built(family, tokenizer)
    model = backbone.model
    modules = dict(model.named_modules())
    linear = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear | conv1d_type())}
    with_bias = {
        n.removesuffix(".bias") for n, _ in model.named_parameters() if n.endswith(".bias")
    }
    with_bias -= {n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)}
    expected = {
        "every bias": with_bias,
        "linear biases": with_bias & linear,
        "every linear": linear - {"lm_head"},
    }[layers]
    bank = ModuleBank(backbone, "bitfit", BitFitConfig(**options))
    assert set(bank.sites) == expected and expected
    if family == "qwen2" and not options:
        assert {name.rsplit(".", 1)[-1] for name in bank.sites} == {"q_proj", "k_proj", "v_proj"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_fresh_slot_leaves_the_output_bit_identical(tokenizer, family):
    options = {"bias_free": "add"} if family == "llama" else {}
    backbone, inputs = _built(family, tokenizer)
    bank = ModuleBank(backbone, "bitfit", BitFitConfig(**options))
    bare = _output(backbone.model, inputs)
    slot = bank.add_slot(seed=0)
    with bank.use_slot(slot):
        assert torch.equal(_output(backbone.model, inputs), bare)
    with bank.route(torch.tensor([[slot], [-1], [slot], [slot]]), torch.tensor([0.5, 1, 1, 2.0])):
        assert torch.equal(_output(backbone.model, inputs), bare)


@pytest.mark.parametrize(
    ("family", "model_name"), [("llama", "LlamaForCausalLM"), ("t5", "T5ForConditionalGeneration")]
)
def test_a_model_without_biases_is_refused_naming_it_and_the_option(family, model_name):
    with pytest.raises(
        ContinualPeftError, match=f'{model_name} has none to tune.*bias_free = "add".*ia3 or lora'
    ):
        ModuleBank(tiny_lm(family), "bitfit")


def test_layer_norm_off_on_a_model_with_only_norm_biases_names_the_setting(tokenizer):
    backbone, _ = _built("bert", tokenizer)
    for module in backbone.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.bias = None
    with pytest.raises(ContinualPeftError, match="BertModel has none.*layer_norm = true"):
        ModuleBank(backbone, "bitfit", BitFitConfig(layer_norm=False))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bias_free": "zero"}, "bitfit bias_free = 'zero' is invalid; use \"skip\""),
        ({"layer_norm": "yes"}, "bitfit layer_norm = 'yes' is invalid; use true"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(options, message):
    with pytest.raises(ContinualPeftError, match=message):
        BitFitConfig(**options)


def test_a_spec_files_bad_setting_is_refused(tmp_path):
    spec = tmp_path / "bitfit.toml"
    spec.write_text('module = "bitfit"\n[bitfit]\nbias_free = "always"\n', encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="bias_free = 'always' is invalid"):
        load_strategy_spec(spec)


def test_bitfit_and_lora_on_one_layer_in_either_order(tokenizer):
    """Two kinds on one layer: the same site names and, per row, the same outputs, whichever
    kind was injected first; prefix tuning finds attention whose projections carry BitFit."""
    banks, outputs = [], []
    for first, second in (("bitfit", "lora"), ("lora", "bitfit")):
        backbone, inputs = _built("bert", tokenizer)
        bank = ModuleBank(backbone, first)
        bank.add_slot(seed=0, kind=second)  # the second kind's sites wrap the first's
        bank.freeze_slot()
        banks.append(bank)
    sites = {kind: banks[0].kind_sites[kind] for kind in ("lora", "bitfit")}
    torch.manual_seed(0)
    lora = {f"{n}.scale": torch.tensor(2.0) for n in sites["lora"]}
    for name, site in sites["lora"].items():
        lora[f"{name}.lora_A"] = torch.randn(8, site.d_in)
        lora[f"{name}.lora_B"] = torch.randn(site.d_out, 8)
    bitfit = {f"{n}.bias_delta": 0.5 * torch.randn(s.size) for n, s in sites["bitfit"].items()}
    for bank in banks:
        assert {k: sorted(v) for k, v in bank.kind_sites.items()} == {
            k: sorted(v) for k, v in sites.items()
        }
        slots = [bank.load_slot(lora, "lora"), bank.load_slot(bitfit, "bitfit")]
        with torch.no_grad(), bank.route(torch.tensor([slots[0], slots[1], -1, slots[1]])):
            outputs.append(_output(bank.backbone.model, inputs))
    assert_close(outputs[0], outputs[1], torch.float32)
    query = banks[1].backbone.model.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(query.base_layer, LowRankSite)  # lora first, then bitfit over it
    banks[0].add_slot(seed=1, kind="prefix")  # its projections are BitFit and LoRA sites
