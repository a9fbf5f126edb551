"""SD-LoRA: the update rule W0 + Σ_j α_j ΔW_j/||ΔW_j||_F, recomputed from the slots' tensors;
which tensors train; freezing as a unit direction; the rank-reduced variant; refusals; state."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST_TRAIN, assert_close, tolerance

from continual_peft import (
    Backbone,
    BackboneConfig,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
)
from continual_peft.strategies import build_strategy, check_config

TEXTS = ["red apple car", "dog sleeps", "sad at home now", "blue cup"]


def _learner(make_backbone, **options) -> ContinualLearner:
    config = LearnerConfig(train=FAST_TRAIN, strategy="sdlora", strategy_options=options)
    return ContinualLearner(make_backbone(), config=config)


def _hidden(backbone: Backbone, learner: ContinualLearner | None = None, task: str = ""):
    """(B, L, d) last hidden states of TEXTS in eval mode: through `task`'s routing when a
    learner is given, else the backbone as it is."""
    batch = backbone.collate(backbone.encode(TEXTS).items)
    backbone.eval()
    with torch.no_grad():
        if learner is None:
            return backbone(**batch)
        with learner.use_task(task):
            return backbone(**batch)


def _recomputed(make_backbone, learner: ContinualLearner) -> Backbone:
    """A fresh backbone whose wrapped weights are W0 + Σ_j α_j ΔW_j/||ΔW_j||_F, ΔW_j =
    scale·B_j A_j, from every slot's tensors (the trainable slot's master weights too)."""
    merged = make_backbone()
    alphas = learner.strategy.magnitudes.detach()
    with torch.no_grad():
        for slot in range(learner.bank.num_slots):
            state = learner.bank.slot_state(slot)
            for site in learner.bank.sites:
                b, a = state[f"{site}.lora_B"].float(), state[f"{site}.lora_A"].float()
                delta = state[f"{site}.scale"].float() * b @ a  # (d_out, d_in)
                norm = torch.linalg.matrix_norm(delta)
                if norm > 0:
                    weight = merged.model.get_submodule(site).weight
                    weight += (alphas[slot] * delta / norm).to(weight)
    return merged


def _perturb_new_slot(learner: ContinualLearner) -> None:
    """Random non-zero B for the trainable slot (it opens at zero) and distinct α's."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site in learner.bank.sites.values():
            b = site.stack.trainable["lora_B"]
            b.copy_(0.1 * torch.randn(b.shape, generator=generator))
        alphas = learner.strategy.magnitudes
        alphas.copy_(torch.linspace(0.5, 1.5, len(alphas)))


def test_the_forward_is_the_sum_of_magnitudes_times_unit_directions(make_backbone, tasks):
    learner = _learner(make_backbone)
    learner.learn(tasks[0])
    session = learner.begin_task(tasks[1])
    _perturb_new_slot(learner)  # while the second slot trains: the gains normalise it
    expected = _hidden(_recomputed(make_backbone, learner))
    for task in tasks[:2]:  # every task goes through every slot
        assert_close(_hidden(learner.backbone, learner, task.name), expected)
    result = learner.train(session)
    assert_close(
        _hidden(learner.backbone, learner, "animals"),
        _hidden(_recomputed(make_backbone, learner)),
    )
    learner.end_task(session, result)  # frozen: α's as routing weights, no gains
    learner.learn(tasks[2])
    assert learner.strategy.routing(learner, "colors") == (
        [0, 1, 2],
        learner.strategy.magnitudes.detach().tolist(),
    )
    expected = _hidden(_recomputed(make_backbone, learner))
    assert_close(_hidden(learner.backbone, learner, "colors"), expected)
    assert not torch.allclose(expected, _hidden(make_backbone()), atol=1e-4)  # not a no-op


def test_the_new_slot_and_every_magnitude_train_never_a_frozen_slot(make_backbone, tasks):
    learner = _learner(make_backbone)
    learner.learn(tasks[0])
    frozen = {k: v.clone() for k, v in learner.bank.slot_state(0).items()}
    session = learner.begin_task(tasks[1])
    alphas = learner.strategy.magnitudes
    assert alphas.dtype == torch.float32 and alphas.device == learner.backbone.device
    assert any(p is alphas for p in session.params) and alphas.shape == (2,)
    _perturb_new_slot(learner)
    start = alphas.detach().clone()
    task, items = tasks[1], session.train_items
    learner.backbone.train()
    with learner.use_task(task.name):
        loss = learner.heads.row_loss(items[:8], [task.name] * 8, task.train_labels[:8])
    loss.backward()
    for site in learner.bank.sites.values():
        assert all(site.stack.trainable[n].grad.abs().sum() > 0 for n in ("lora_A", "lora_B"))
        assert not site.stack.lora_A.requires_grad and not site.stack.lora_B.requires_grad
    assert bool((alphas.grad != 0).all())  # the earlier task's magnitude too
    trained = {id(p) for p in session.params}
    assert not trained & {id(b) for s in learner.bank.sites.values() for b in s.stack.buffers()}
    learner.end_task(session, learner.train(session))
    assert all(torch.equal(learner.bank.slot_state(0)[k], v) for k, v in frozen.items())
    assert bool((learner.strategy.magnitudes.detach() != start).all())  # both trained


def test_freezing_keeps_the_output_and_stores_unit_directions(make_backbone, tasks):
    learner = _learner(make_backbone)
    bare = _hidden(learner.backbone)
    for index, task in enumerate(tasks):
        session = learner.begin_task(task)
        # a fresh slot (B = 0) changes nothing
        before = _hidden(learner.backbone, learner, tasks[max(index - 1, 0)].name)
        assert_close(_hidden(learner.backbone, learner, task.name), before if index else bare)
        result = learner.train(session)
        trained = _hidden(learner.backbone, learner, task.name)
        learner.end_task(session, result)
        assert_close(_hidden(learner.backbone, learner, task.name), trained)
        assert all(site.gain is None for site in learner.bank.sites.values())
    for slot in range(learner.bank.num_slots):
        state = learner.bank.slot_state(slot)
        for site in learner.bank.sites:
            b, a = state[f"{site}.lora_B"].float(), state[f"{site}.lora_A"].float()
            norm = torch.linalg.matrix_norm(state[f"{site}.scale"].float() * b @ a)
            assert float(norm) == pytest.approx(1.0, rel=10 * tolerance()["rtol"])
    magnitudes = learner.strategy.magnitudes.detach().tolist()
    facts = learner.records[-1]["strategy"]["magnitudes"]
    assert facts == {t.name: round(m, 6) for t, m in zip(tasks, magnitudes, strict=True)}


def test_rank_reduction_zeroes_the_rows_and_columns_past_each_tasks_rank(make_backbone, tasks):
    learner = _learner(make_backbone, ranks=[8, 3])  # the LoRA's r is 8
    for task in tasks:
        learner.learn(task)
    assert [r["strategy"]["rank"] for r in learner.records] == [8, 3, 3]  # the last repeats
    for slot, rank in enumerate([8, 3, 3]):
        state = learner.bank.slot_state(slot)
        for site in learner.bank.sites:
            a, b = state[f"{site}.lora_A"], state[f"{site}.lora_B"]  # (r, d_in), (d_out, r)
            assert (
                a.shape[0] == 8 and bool((a[rank:] == 0).all()) and bool((b[:, rank:] == 0).all())
            )
            assert bool((a[:rank].abs().sum(1) > 0).all()) and bool((b[:, :rank] != 0).any())
            assert int(torch.linalg.matrix_rank(b.float() @ a.float())) == rank


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"module": "adapter"}, "sdlora' trains LoRA slots only.*'adapter'.*use module = \"lora\""),
        ({"task_modules": {"colors": "prompt"}}, "LoRA slots only.*'prompt'"),
        ({"router": "mahalanobis"}, "'mahalanobis': use router = \"oracle\""),
        ({"strategy_options": {"ranks": [8, 16]}}, "r = 8: lower the ranks to at most 8"),
        ({"strategy_options": {"ranks": []}}, "ranks = \\[\\] is invalid; it must be a non-empty"),
        ({"strategy_options": {"ranks": [4, 0]}}, "integers >= 1"),
        (
            {"strategy_options": {"magnitude_init": 0}},
            r"magnitude_init = 0 is invalid.*\(0, 1000\]",
        ),
        ({"backbone": BackboneConfig(dtype="float16")}, 'overflows float16.*"bfloat16"'),
    ],
)
def test_sdlora_refuses_what_it_cannot_work_with_naming_the_fix(change, message):
    with pytest.raises(ContinualPeftError, match=message):
        check_config(LearnerConfig(strategy="sdlora", **change))


def test_the_state_round_trips_and_a_loaded_run_continues_identically(
    make_backbone, tasks, tmp_path
):
    learner = _learner(make_backbone)
    for task in tasks[:2]:
        learner.learn(task)
    tensors, meta = learner.strategy.state()
    assert set(tensors) == {"magnitudes"} and meta["tasks"] == 2
    fresh = build_strategy("sdlora")
    fresh.load_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert torch.equal(fresh.magnitudes.detach(), learner.strategy.magnitudes.detach())
    assert fresh.routing(learner, "colors") == learner.strategy.routing(learner, "colors")
    loaded = ContinualLearner.load(learner.save(tmp_path / "saved"), make_backbone(), tasks[:2])
    assert torch.equal(loaded.strategy.magnitudes.detach(), learner.strategy.magnitudes.detach())
    for learned in (learner, loaded):
        learned.learn(tasks[2])
    assert torch.equal(loaded.strategy.magnitudes.detach(), learner.strategy.magnitudes.detach())
    names = ["colors", "animals", "moods", "colors"]
    assert torch.equal(loaded.logits(TEXTS, names), learner.logits(TEXTS, names))


def test_a_failed_task_leaves_the_model_as_it_was(make_backbone, tasks):
    learner = _learner(make_backbone)
    learner.learn(tasks[0])
    names = ["colors"] * len(TEXTS)
    before = learner.logits(TEXTS, names)
    learner.strategy.loss = lambda who, task, loss: loss * float("nan")  # diverges at once
    with pytest.raises(ContinualPeftError, match="learn the task again"):
        learner.learn(tasks[1])
    assert learner.bank.num_slots == 1 and learner.strategy.magnitudes.shape == (1,)
    assert torch.equal(learner.logits(TEXTS, names), before)  # the failed task's gains are inert
