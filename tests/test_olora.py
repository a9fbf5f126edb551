"""O-LoRA, and the engine's strategy routing: a task's rows may go through several slots."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FAST_TRAIN, assert_close, tolerance

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig, ModuleBank
from continual_peft.modules import MODULE_KINDS
from continual_peft.strategies import build_strategy, check_config
from continual_peft.strategies.olora import orthogonality_penalty


def _learn(make_backbone, tasks, strategy="olora", **options) -> ContinualLearner:
    config = LearnerConfig(train=FAST_TRAIN, strategy=strategy, strategy_options=options)
    learner = ContinualLearner(make_backbone(), config=config)
    for task in tasks:
        learner.learn(task)
    return learner


def _a_matrices(bank: ModuleBank, slot: int) -> dict[str, torch.Tensor]:
    state = bank.slot_state(slot)
    return {k.removesuffix(".lora_A"): v.float() for k, v in state.items() if k.endswith(".lora_A")}


def test_penalty_is_the_sum_of_squared_a_products_and_trains_only_the_new_a(make_backbone):
    bank = ModuleBank(make_backbone(), "lora")
    for seed in (1, 2):
        bank.add_slot(seed=seed)
        bank.freeze_slot()
    bank.add_slot(seed=3)
    new = _a_matrices(bank, 2)
    expected = sum(
        float(((a @ new[site].T) ** 2).sum())
        for j in (0, 1)
        for site, a in _a_matrices(bank, j).items()
    )
    penalty = orthogonality_penalty(bank)
    rel = tolerance()["rtol"]  # the frozen A matrices are stored in the compute dtype
    assert float(penalty.detach()) == pytest.approx(expected, rel=rel) and expected > 0
    penalty.backward()
    sites = bank.sites.values()
    assert all(s.stack.trainable["lora_A"].grad.abs().sum() > 0 for s in sites)
    assert all(s.stack.trainable["lora_B"].grad is None for s in sites)
    strategy = build_strategy("olora", {"lam_orth": 0.25, "lam_l2": 0.1})
    norms = sum(float(p.detach().norm()) for p in bank.trainable_parameters())
    loss = strategy.loss(SimpleNamespace(bank=bank), None, torch.tensor(1.0))
    assert float(loss.detach()) == pytest.approx(1.0 + 0.25 * expected + 0.1 * norms, rel=rel)


def _principal_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cos² of the principal angles, from SVD bases (the strategy uses QR)."""
    va = torch.linalg.svd(a.double(), full_matrices=False).Vh  # (r, d) orthonormal rows
    vb = torch.linalg.svd(b.double(), full_matrices=False).Vh
    return float((torch.linalg.svdvals(va @ vb.T) ** 2).mean())


def test_penalty_measurably_lowers_the_subspace_overlap(make_backbone, tasks):
    overlaps = {}
    for lam in (0.0, 0.5):
        learner = _learn(make_backbone, tasks[:2], lam_orth=lam)
        facts = learner.records[1]["strategy"]
        first, second = _a_matrices(learner.bank, 0), _a_matrices(learner.bank, 1)
        recomputed = np.mean([_principal_overlap(first[s], second[s]) for s in first])
        assert facts["subspace_overlap"]["colors"] == pytest.approx(recomputed, abs=1e-5)
        assert facts["random_overlap"] == 8 / 32  # r / d_in of the tiny BERT
        overlaps[lam] = facts["subspace_overlap"]["colors"]
    # measured: 0.264 without the penalty (random subspaces: 0.25), 0.012 with λ = 0.5
    assert overlaps[0.0] > 0.15 and overlaps[0.5] < overlaps[0.0] / 4, overlaps


def test_every_task_goes_through_every_slot_summed(make_backbone, tasks):
    olora = _learn(make_backbone, tasks)
    assert olora.bank.num_slots == 3
    assert all(olora.strategy.routing(olora, t.name) == ([0, 1, 2], [1.0] * 3) for t in tasks)
    # the same logits from a fresh backbone whose weights have every slot's delta merged in
    merged = make_backbone()
    with torch.no_grad():
        for slot in range(olora.bank.num_slots):
            state = olora.bank.slot_state(slot)
            for site in olora.bank.sites:
                delta = state[f"{site}.lora_B"] @ state[f"{site}.lora_A"] * state[f"{site}.scale"]
                merged.model.get_submodule(site).weight += delta
    texts = ["red apple car", "dog sleeps", "sad at home now", "blue cup"]
    names = ["colors", "animals", "moods", "colors"]
    with torch.no_grad():
        features = merged.embed(merged.collate(merged.encode(texts).items))
        manual = olora.heads.logits(features, names)
    assert_close(olora.logits(texts, names), manual)
    # the oracle matrix measures that same summed model
    final = olora.report["accuracy_matrix"]["oracle"][-1]
    for task, value in zip(tasks, final, strict=True):
        truth = [task.labels[y] for y in task.test_labels]
        predicted = olora.predict(task.test_inputs, task=task.name)
        assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) == value


def test_default_routing_is_the_task_slot_alone(make_backbone, tasks):
    learner = _learn(make_backbone, tasks, strategy="per_task")
    texts = ["red apple car", "dog sleeps", "sad at home now", "blue cup"]
    names = ["colors", "animals", "moods", "colors"]
    slots = torch.tensor([learner.learned[n].slot for n in names])
    assert [learner.strategy.routing(learner, n) for n in names] == [([s], [1.0]) for s in slots]
    batch = learner.backbone.collate(learner.backbone.encode(texts).items)
    with torch.no_grad(), learner.bank.route(slots):  # each row through its task's slot only
        routed = learner.heads.logits(learner.backbone.embed(batch), names)
    assert torch.equal(learner.logits(texts, names), routed)
    for text, name in zip(texts, names, strict=True):
        batch = learner.backbone.collate(learner.backbone.encode([text]).items)
        with torch.no_grad(), learner.bank.use_slot(learner.learned[name].slot):
            alone = learner.heads.logits(learner.backbone.embed(batch), [name])
        assert (
            learner.predict([text], task=name)[0]
            == learner.learned[name].task.labels[int(alone.argmax())]
        )


@pytest.mark.parametrize("kind", MODULE_KINDS.names())
def test_use_slots_shares_one_mix_with_every_row(make_backbone, kind):
    backbone = make_backbone()
    bank = ModuleBank(backbone, kind)
    torch.manual_seed(0)
    for seed in (1, 2):
        bank.add_slot(seed=seed)
        with torch.no_grad():
            for p in bank.trainable_parameters():
                p.add_(0.1 * torch.randn_like(p))  # non-zero deltas
        bank.freeze_slot()
    batch = backbone.collate(
        backbone.encode(["red apple car", "a dog sleeps at home", "sad"]).items
    )
    with torch.no_grad():
        with bank.use_slots([0, 1], [0.3, 0.7]):
            shared = backbone.embed(batch)
        rows = torch.tensor([[0, 1]] * 3), torch.tensor([[0.3, 0.7]] * 3)
        with bank.route(*rows):
            per_row = backbone.embed(batch)
        with bank.use_slots([1]):
            one = backbone.embed(batch)
        with bank.use_slot(1):
            single = backbone.embed(batch)
    assert_close(shared, per_row)
    assert torch.equal(one, single)
    with pytest.raises(ContinualPeftError, match="slot 2 does not exist"):
        bank.use_slots([0, 2]).__enter__()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"module": "adapter"}, "olora' trains LoRA slots only.*'adapter'"),
        ({"task_modules": {"colors": "prompt"}}, "LoRA slots only.*'prompt'"),
        ({"router": "mahalanobis"}, "'mahalanobis': use router = \"oracle\""),
    ],
)
def test_olora_refuses_other_kinds_and_routers(change, message):
    with pytest.raises(ContinualPeftError, match=message):
        check_config(LearnerConfig(strategy="olora", **change))
