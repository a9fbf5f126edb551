"""InfLoRA: the designed, fixed A and the GPM basis update against a plain numpy recomputation,
the interference-free promise on earlier tasks' inputs, what trains, refusals, and its state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FAST_TRAIN, assert_close, compute_dtype, tolerance
from safetensors.torch import load_file, save_file

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig
from continual_peft.strategies import InfLoRA, build_strategy, check_config

RANK = 4


def _learner(make_backbone, strategy="inflora", **options) -> ContinualLearner:
    config = LearnerConfig.from_dict(
        {
            "strategy": strategy,
            "strategy_options": options,
            "lora": {"r": RANK, "alpha": 8.0, "dropout": 0.0},
        }
    )
    config.train = FAST_TRAIN
    return ContinualLearner(make_backbone(), config=config)


def _covariances(learner: ContinualLearner, texts: list[str]) -> dict[str, np.ndarray]:
    """Each LoRA site's mean x xᵀ (float64) over `texts`' tokens, each text run alone through
    the backbone with every slot summed (the bare backbone before any slot), read from forward
    hooks: independent of the strategy's own collection through the heads."""
    sites = learner.bank.kind_sites["lora"]
    sums = {name: np.zeros((site.d_in, site.d_in)) for name, site in sites.items()}
    counts = dict.fromkeys(sites, 0)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().double().cpu().numpy()
            x = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
            sums[name] += x.T @ x
            counts[name] += len(x)

        return record

    handles = [site.register_forward_hook(hook(name)) for name, site in sites.items()]
    backbone, slots = learner.backbone, list(range(learner.bank.num_slots))
    routed = learner.bank.use_slots(slots) if slots else learner.bank.base_only()
    try:
        with torch.no_grad(), routed:
            for text in texts:
                backbone.embed(backbone.collate(backbone.encode([text]).items))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sites}


def _numpy_down_projection(c: np.ndarray, m: np.ndarray | None, rank: int) -> np.ndarray:
    """A_t = top-r left singular vectors of (I − M Mᵀ) C, transposed, / √3."""
    projected = c if m is None else (np.eye(len(c)) - m @ m.T) @ c
    u = np.linalg.svd(projected)[0]
    return u[:, :rank].T / np.sqrt(3)


def _numpy_basis(c: np.ndarray, m: np.ndarray | None, eps: float) -> np.ndarray:
    """GPM (Saha et al. 2021): the first task keeps the smallest k with cumulative σ² share
    >= ε; later tasks add C̃'s top vectors while (‖C‖² − ‖C̃‖² + added σ²)/‖C‖² < ε."""
    d = len(c)
    total = (np.linalg.svd(c, compute_uv=False) ** 2).sum()
    if m is None:
        u, s, _ = np.linalg.svd(c)
        share = np.cumsum(s**2) / total
        k = next(i + 1 for i in range(d) if share[i] >= eps)
        return u[:, :k]
    u, s, _ = np.linalg.svd(c - m @ m.T @ c)
    reached = (total - (s**2).sum()) / total
    added = 0
    for sigma in s:
        if reached >= eps:
            break
        reached += sigma**2 / total
        added += 1
    return np.hstack([m, u[:, :added]])[:, :d]


def _atol() -> float:
    """Measured differences are ~3e-8 in float32 (float32 vs float64 covariance sums); a slot
    stored in bfloat16 rounds A to 3 significant digits."""
    return 1e-6 if compute_dtype() == torch.float32 else tolerance()["atol"]


def _bases(strategy: InfLoRA) -> dict[str, np.ndarray]:
    return {name: b.double().cpu().numpy() for name, b in strategy.bases.items()}


def _slot_a(learner: ContinualLearner, slot: int) -> dict[str, np.ndarray]:
    state = learner.bank.slot_state(slot)
    return {
        k.removesuffix(".lora_A"): v.double().cpu().numpy()
        for k, v in state.items()
        if k.endswith(".lora_A")
    }


def test_designed_a_and_basis_update_equal_a_numpy_recomputation(make_backbone, tasks):
    learner = _learner(make_backbone, samples=1000)  # more than the rows: every row
    names = [task.name for task in tasks]
    learner.stream_plan = {"name": "words", "tasks": names}  # T = 3: ε rises per task
    for index, task in enumerate(tasks):
        before = _bases(learner.strategy) or None
        c_before = _covariances(learner, task.train_inputs)  # earlier slots (B_new = 0)
        learner.learn(task)
        designed = _slot_a(learner, learner.learned[task.name].slot)
        c_after = _covariances(learner, task.train_inputs)  # every slot, as trained
        eps = 0.95 + (1.0 - 0.95) * index / len(tasks)
        dims = []
        for site, a in designed.items():
            m = None if before is None else before[site]
            expected = _numpy_down_projection(c_before[site], m, RANK)
            signs = np.sign(np.sum(a * expected, axis=1, keepdims=True))  # SVD's sign freedom
            np.testing.assert_allclose(a * signs, expected, atol=_atol())
            basis, recomputed = learner.strategy.bases[site], _numpy_basis(c_after[site], m, eps)
            assert basis.shape == recomputed.shape and basis.dtype == torch.float32
            projector = basis.double().cpu().numpy() @ basis.double().cpu().numpy().T
            np.testing.assert_allclose(projector, recomputed @ recomputed.T, atol=_atol())
            dims.append(recomputed.shape[1])
        facts = learner.records[index]["strategy"]
        assert facts["threshold"] == round(eps, 6) and facts["stream_length"] == 3
        assert facts["basis_dim"] == {
            "mean": round(float(np.mean(dims)), 3),
            "min": min(dims),
            "max": max(dims),
        }
        assert facts["d_in"] == 32.0
    # the subspace only grows, and after three tasks it is still a part of the input space
    assert min(dims) > 0 and max(dims) < 32


def test_a_new_slot_leaves_earlier_tasks_inputs_alone(make_backbone, tasks):
    first, second = tasks[0], tasks[1]
    learner = _learner(make_backbone)
    learner.learn(first)
    basis = _bases(learner.strategy)  # M after task 1, which A_2 is designed against
    c_first = _covariances(learner, first.train_inputs)  # task 1's inputs, as M was built
    probes = first.test_inputs[:12]
    names = [first.name] * len(probes)
    logits_before = learner.logits(probes, names)
    learner.learn(second)
    assert learner.records[1]["strategy"]["threshold"] == 0.95  # T unknown: ε = lamb
    assert learner.records[1]["strategy"]["stream_length"] is None
    generator = torch.Generator().manual_seed(0)
    for name, site in learner.bank.kind_sites["lora"].items():
        m = torch.from_numpy(basis[name]).float()  # (d_in, k)
        dtype = site.weight.dtype  # the compute dtype the site runs in
        inside = (torch.randn(1, 6, m.shape[1], generator=generator) @ m.T).to(dtype)
        outside = torch.randn(1, 6, m.shape[0], generator=generator).to(dtype)
        with torch.no_grad(), learner.bank.use_slot(1):
            bare = site.base_layer(inside), site.base_layer(outside)
            delta_in, delta_out = site(inside) - bare[0], site(outside) - bare[1]
        scale = inside.float().norm(dim=-1).max()
        assert delta_in.abs().max() < tolerance()["atol"] * scale  # zero on span(M)
        assert delta_out.abs().max() > 1e-2  # the slot does something elsewhere
        # the threshold's promise on task 1's own inputs: ‖(I − M Mᵀ) C‖² <= (1 − ε)‖C‖², so
        # ‖A_2 C‖² <= (1 − ε)/3 · ‖C‖², and A_2 x only sees the part of x outside span(M)
        c, mm = c_first[name], basis[name] @ basis[name].T
        a = learner.bank.slot_state(1)[f"{name}.lora_A"].double().numpy()
        outside_share = np.linalg.norm(c - mm @ c) ** 2 / np.linalg.norm(c) ** 2
        assert outside_share <= 1 - 0.95 + 1e-9
        assert np.linalg.norm(a @ c) ** 2 <= (1 - 0.95) / 3 * np.linalg.norm(c) ** 2 * 1.0001
        energy = np.trace(a @ c @ a.T) / np.trace(c)  # mean ‖A_2 x‖² / mean ‖x‖²
        leftover = np.trace(c - mm @ c) / np.trace(c)  # mean ‖(I − M Mᵀ) x‖² / mean ‖x‖²
        # measured: leftover 0.20, energy 0.029 (a random A/√3 of rank 4 would see 4/96)
        assert energy <= leftover / 3 + 1e-9 and leftover < 0.3, (energy, leftover)
    # task 1's logits barely move; a plain summed LoRA (O-LoRA without its penalty) moves them
    changed = (learner.logits(probes, names) - logits_before).abs().mean()
    plain = _learner(make_backbone, strategy="olora", lam_orth=0.0)
    plain.learn(first)
    plain_before = plain.logits(probes, names)
    plain.learn(second)
    plain_changed = (plain.logits(probes, names) - plain_before).abs().mean()
    assert changed < plain_changed / 3, (float(changed), float(plain_changed))  # 7.6e-4, 3.3e-3
    matrix = learner.report["accuracy_matrix"]["oracle"]
    assert matrix[1][0] >= matrix[0][0] - 0.05  # task 1 kept after task 2


def test_only_the_new_slots_b_trains_and_a_stays_as_designed(make_backbone, tasks):
    learner = _learner(make_backbone)
    learner.learn(tasks[0])
    session = learner.begin_task(tasks[1])
    sites = learner.bank.kind_sites["lora"].values()
    a_params = [site.stack.trainable["lora_A"] for site in sites]
    b_params = [site.stack.trainable["lora_B"] for site in sites]
    assert {id(p) for p in learner.bank.trainable_parameters()} == {id(p) for p in b_params}
    assert not any(p.requires_grad for p in a_params)
    assert all(any(p is q for q in session.params) for p in b_params)
    assert not any(p is q for p in a_params for q in session.params)
    designed = [p.detach().clone() for p in a_params]
    task = tasks[1]
    items = learner.heads.prompt_items(task.name, task.train_inputs[:8]).items
    with learner.use_task(task.name):
        loss = learner.heads.row_loss(items, [task.name] * 8, task.train_labels[:8])
    loss.backward()
    assert all(p.grad is None for p in a_params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b_params)
    for p in b_params:
        p.grad = None
    result = learner.train(session)
    assert all(torch.equal(p.detach(), d) for p, d in zip(a_params, designed, strict=True))
    assert all(p.detach().abs().sum() > 0 for p in b_params)  # B left zero: it trained
    learner.end_task(session, result)
    frozen = learner.bank.slot_state(1)
    for name, d in zip(learner.bank.kind_sites["lora"], designed, strict=True):
        assert_close(frozen[f"{name}.lora_A"], d)
    assert learner.bank.trainable_parameters() == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"module": "adapter"},
            "inflora' trains LoRA slots only.*'adapter'.*use module = \"lora\"",
        ),
        ({"task_modules": {"colors": "prompt"}}, "LoRA slots only.*'prompt'"),
        ({"router": "prototype"}, "'prototype': use router = \"oracle\""),
    ],
)
def test_inflora_refuses_other_kinds_and_routers(change, message):
    with pytest.raises(ContinualPeftError, match=message):
        check_config(LearnerConfig(strategy="inflora", **change))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lamb": 0.0}, "lamb = 0.0 is invalid; it must be a number in \\(0, 1\\]"),
        ({"lamb": 0.99, "lame": 0.9}, "lame = 0.9 is invalid; it must be a number in \\[lamb"),
        ({"samples": 0}, "samples = 0 is invalid"),
    ],
)
def test_inflora_refuses_bad_options(options, message):
    with pytest.raises(ContinualPeftError, match=message):
        build_strategy("inflora", options)


def test_state_round_trips_through_safetensors_and_a_saved_learner(make_backbone, tasks, tmp_path):
    learner = _learner(make_backbone)
    assert learner.strategy.state() == ({}, {})
    for task in tasks[:2]:
        learner.learn(task)
    tensors, meta = learner.strategy.state()
    assert set(tensors) == set(learner.bank.kind_sites["lora"])
    save_file(tensors, tmp_path / "strategy.safetensors")
    fresh = build_strategy("inflora")
    fresh.load_state(load_file(tmp_path / "strategy.safetensors"), json.loads(json.dumps(meta)))
    assert fresh.bases.keys() == learner.strategy.bases.keys()
    assert all(torch.equal(fresh.bases[n], b) for n, b in learner.strategy.bases.items())
    loaded = ContinualLearner.load(learner.save(tmp_path / "saved"), make_backbone(), tasks[:2])
    assert all(torch.equal(loaded.strategy.bases[n], b) for n, b in learner.strategy.bases.items())
    name = next(iter(tensors))
    with pytest.raises(ContinualPeftError, match=f"lacks the basis of site '{name}'"):
        fresh.load_state({k: v for k, v in tensors.items() if k != name}, meta)
