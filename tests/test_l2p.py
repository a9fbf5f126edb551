"""The `prompt_pool` kind and the `l2p` strategy: top-N selection by key, prepended prompts equal a
hand-made run, the key-pull loss and its gradient, and the whole strategy through the engine.
Its reload, save/load/learn and rollback, with the other shared invariants: test_cases.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import FAST_TRAIN, assert_close, word_task

from continual_peft import ContinualLearner, ContinualPeftError, ModuleBank
from continual_peft.config import LearnerConfig
from continual_peft.engine.prediction import frozen_features
from continual_peft.modules.prompt_pool import PromptPoolConfig
from continual_peft.strategies import check_config
from continual_peft.strategies.l2p import L2P

M, L, N = 6, 2, 3
TEXTS = ("red apple car", "a dog sleeps at home today", "sad", "the blue bird", "cat eats now")
KEY_TEXTS = ("dog", "red car", "sad today", "bird", "apple", "at home")


def _batch(backbone, texts=TEXTS):
    return backbone.collate(backbone.encode(list(texts)).items)


def _features(backbone, bank, texts) -> torch.Tensor:
    return frozen_features(backbone, bank, backbone.encode(list(texts)).items, 64)


def _pool_bank(backbone, slots: int = 2) -> ModuleBank:
    """Frozen pools whose keys are frozen features of KEY_TEXTS (+ noise): rows pick differently."""
    bank = ModuleBank(backbone, "prompt_pool", PromptPoolConfig(M, L, N))
    keys = _features(backbone, bank, KEY_TEXTS)  # (M, d)
    generator = torch.Generator().manual_seed(0)
    for _ in range(slots):
        prompts = 0.05 * torch.randn(M, L, 32, generator=generator)
        noisy = keys + 0.3 * keys.std() * torch.randn(keys.shape, generator=generator)
        bank.load_slot({"prompt_pool.prompts": prompts, "prompt_pool.prompt_keys": noisy})
    return bank


def _expected_choice(features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Plain recomputation: cosine of every feature with every key, N largest first."""
    f = features.float() / features.float().norm(dim=1, keepdim=True)
    k = keys.float() / keys.float().norm(dim=1, keepdim=True)
    return torch.argsort(f @ k.T, dim=1, descending=True)[:, :N]


def test_selection_is_the_top_n_cosine_keys_of_the_frozen_feature(make_backbone):
    backbone = make_backbone()
    bank = _pool_bank(backbone)
    site = bank.sites["prompt_pool"]
    features = _features(backbone, bank, TEXTS)
    backbone.train()  # dropout on: the query must still be the frozen (eval) feature
    with torch.no_grad(), bank.use_slot(1):
        backbone(**_batch(backbone))
    assert backbone.model.training and backbone.model.encoder.layer[0].training  # modes restored
    backbone.eval()
    assert_close(site.last.query, features)
    expected = _expected_choice(features, site.stack.prompt_keys[1])
    assert torch.equal(site.last.indices, expected)
    assert torch.equal(site.choose(features, 1), expected)
    assert len({tuple(row) for row in expected.tolist()}) > 1  # the rows did pick differently
    with bank.base_only():
        backbone(**_batch(backbone))
    assert site.last is None  # routing off: no pool, no selection


def _by_hand(backbone, bank, text: str, slot: int) -> torch.Tensor:
    """One text's last hidden states with its selected prompts prepended by hand, (len, d)."""
    ids = torch.tensor([backbone.encode([text]).items[0]], device=backbone.device)
    embeds = backbone.model.get_input_embeddings()(ids)  # (1, len, d)
    feature = _features(backbone, bank, [text])
    pick = _expected_choice(feature, bank.sites["prompt_pool"].stack.prompt_keys[slot])[0]
    virtual = bank.sites["prompt_pool"].stack.prompts[slot][pick].reshape(1, N * L, 32)
    n = N * L + ids.shape[1]
    with torch.no_grad():
        out = backbone.model(
            inputs_embeds=torch.cat([virtual, embeds], dim=1),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            position_ids=torch.arange(n)[None],
        ).last_hidden_state
    return out[0, N * L :]


def test_mixed_routed_batch_equals_prompts_prepended_by_hand(make_backbone):
    backbone = make_backbone()
    bank = _pool_bank(backbone)
    batch = _batch(backbone)
    slots = [1, 0, -1, 1, 0]
    with torch.no_grad(), bank.route(torch.tensor(slots)):
        out = backbone(**batch)
    assert bank.sites["prompt_pool"].last.present.tolist() == [s >= 0 for s in slots]
    for row, slot in enumerate(slots):
        length = int(batch["attention_mask"][row].sum())
        if slot < 0:
            with torch.no_grad():
                alone = backbone.model(**_batch(backbone, [TEXTS[row]])).last_hidden_state[0]
        else:
            alone = _by_hand(backbone, bank, TEXTS[row], slot)
        assert_close(out[row, :length], alone)
    with torch.no_grad():
        bare = backbone.model(**_batch(backbone, [TEXTS[0]])).last_hidden_state[0]
    assert not torch.allclose(out[0, : len(bare)], bare, atol=1e-3)  # the prompts did act
    with torch.no_grad(), bank.use_slots([0, 1], [0.3, 0.7]):  # shared routing: top weight
        shared = backbone(**batch)
    with torch.no_grad(), bank.use_slot(1):
        torch.testing.assert_close(shared, backbone(**batch), atol=1e-6, rtol=0)


def test_key_pull_loss_is_its_formula_and_trains_the_keys(make_backbone):
    backbone = make_backbone()
    bank = ModuleBank(backbone, "prompt_pool", PromptPoolConfig(M, L, N))
    slot = bank.add_slot(seed=0)
    site = bank.sites["prompt_pool"]
    features = _features(backbone, bank, TEXTS)
    with bank.use_slot(slot):
        backbone.embed(_batch(backbone))
    keys = site.stack.trainable["prompt_keys"]
    pick = _expected_choice(features, keys.detach())
    cos = torch.nn.functional.cosine_similarity(features[:, None], keys[pick], dim=-1)  # (B, N)
    expected = 0.5 * (1 - cos).sum(dim=1).mean()
    learner = SimpleNamespace(bank=bank)
    loss = L2P(pull_weight=0.5).loss(learner, None, torch.tensor(0.0))
    assert_close(loss, expected)
    loss.backward()
    grad_norms = keys.grad.norm(dim=1)  # (M,)
    picked = torch.zeros(M, dtype=torch.bool)
    picked[pick.flatten()] = True
    assert bool((grad_norms[picked] > 0).all()) and bool((grad_norms[~picked] == 0).all())
    assert L2P(pull_weight=0.0).loss(learner, None, torch.tensor(1.0)) == 1.0


def test_l2p_learns_the_stream(make_backbone):
    config = LearnerConfig(
        strategy="l2p",
        module="prompt_pool",
        train=FAST_TRAIN,
        modules={"prompt_pool": PromptPoolConfig(pool_size=10, prompt_length=3, top_n=3)},
        strategy_options={"pull_weight": 0.1},
    )
    learner = ContinualLearner(make_backbone(), config=config)
    stream = [word_task(name) for name in ("colors", "animals", "moods")]
    for task in stream:
        learner.learn(task)
    final = learner.monitor.matrix("oracle")[-1]
    assert final.mean() > 0.6 and final.min() > 0.5, final  # chance is 1/3
    assert {r["slot"] for r in learner.records} == {0} and learner.bank.num_slots == 1
    counts = [r["strategy"]["prompt_counts"] for r in learner.records]  # per task, M bins
    assert [sum(c) for c in counts] == [len(t.test_inputs) * 3 for t in stream]


def test_l2p_refuses_another_module_kind(make_backbone):
    with pytest.raises(ContinualPeftError, match=r"module kind\(s\) \['lora'\]; set module"):
        ContinualLearner(make_backbone(), module="lora", strategy="l2p")
    with pytest.raises(ContinualPeftError, match="pull_weight must be >= 0"):
        options = {"pull_weight": -1}
        check_config(LearnerConfig(strategy="l2p", module="prompt_pool", strategy_options=options))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PromptPoolConfig(pool_size=3, top_n=4), "top_n .4. cannot exceed pool_size .3."),
        (PromptPoolConfig(prompt_length=0), "prompt_length must be at least 1"),
        (PromptPoolConfig(init="uniform"), "unknown prompt_pool init 'uniform'"),
        (PromptPoolConfig(prompt_length=10, top_n=4), "exceed the backbone's 64 positions"),
    ],
)
def test_bad_pool_settings_are_refused(make_backbone, config, message):
    with pytest.raises(ContinualPeftError, match=message):
        ModuleBank(make_backbone(), "prompt_pool", config)


def test_a_pool_slot_of_another_shape_is_refused(make_backbone):
    bank = ModuleBank(make_backbone(), "prompt_pool", PromptPoolConfig(M, L, N))
    state = {"prompt_pool.prompts": torch.zeros(M, L + 1, 32)}
    state["prompt_pool.prompt_keys"] = torch.zeros(M, 32)
    with pytest.raises(ContinualPeftError, match="'prompts' has shape .6, 3, 32."):
        bank.load_slot(state)
