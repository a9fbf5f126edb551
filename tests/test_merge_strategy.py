"""The `merge` and `route_or_merge` strategies: the merged slot equals peft's own merging of the
same LoRA weights, answers every task, is rebuilt after each task and saved; route-or-merge
sends exactly the rejected or unsure rows to it."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST_TRAIN, tiny_bert, word_task

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig
from continual_peft.engine.loading import load_learner
from continual_peft.strategies import check_config
from continual_peft.strategies.merge import merged_lora

WEIGHT = 0.7


def peft_pair(tokenizer):
    """A tiny BERT under peft with two random LoRA adapters "x" and "y" (r 4, alpha 8), and the
    same weights as our slot states keyed by peft's module names."""
    from peft import LoraConfig, get_peft_model

    def lora() -> LoraConfig:
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        )

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(tokenizer), lora(), adapter_name="x")
    model.add_adapter("y", lora())
    sites = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A}
    states = [
        {
            key: value
            for name, site in sites.items()
            for key, value in {
                f"{name}.lora_A": site.lora_A[adapter].weight.detach().clone(),
                f"{name}.lora_B": site.lora_B[adapter].weight.detach().clone(),
                f"{name}.scale": torch.tensor(site.scaling[adapter], device="cpu"),
            }.items()
        }
        for adapter in ("x", "y")
    ]
    return model, sites, states


def delta(state: dict[str, torch.Tensor], site: str) -> torch.Tensor:
    return state[f"{site}.scale"] * state[f"{site}.lora_B"] @ state[f"{site}.lora_A"]


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize(
    ("combination", "method", "density"),
    [
        ("linear", "task_arithmetic", 1.0),
        ("ties", "ties", 0.5),
        ("dare_linear", "dare_linear", 1.0),  # peft draws DARE's drops from its global RNG:
        ("dare_ties", "dare_ties", 1.0),  # equal draws are checked in test_merging.py
    ],
)
def test_factor_space_equals_pefts_add_weighted_adapter(tokenizer, combination, method, density):
    model, sites, states = peft_pair(tokenizer)
    model.add_weighted_adapter(
        ["x", "y"], [WEIGHT, WEIGHT], "merged", combination_type=combination, density=density
    )
    ours, kept = merged_lora(
        states,
        method=method,
        weight=WEIGHT,
        density=density,
        space="factors",
        sign="total",
        slots=1,
        seed=0,
        device=torch.device("cpu"),
    )
    assert kept is None and len(ours) == 1
    for name, site in sites.items():
        torch.testing.assert_close(ours[0][f"{name}.lora_A"], site.lora_A["merged"].weight)
        torch.testing.assert_close(ours[0][f"{name}.lora_B"], site.lora_B["merged"].weight)
        torch.testing.assert_close(delta(ours[0], name), site.get_delta_weight("merged"))


@pytest.mark.parametrize(
    ("combination", "method"), [("svd", "task_arithmetic"), ("ties_svd", "ties")]
)
def test_delta_space_equals_pefts_svd_merge_at_the_same_rank(tokenizer, combination, method):
    """Delta space keeps slots·r = 8 ranks; peft's SVD merge at svd_rank 8 gives the same ΔW
    (the best rank-8 approximation of the same merged update)."""
    model, sites, states = peft_pair(tokenizer)
    model.add_weighted_adapter(
        ["x", "y"],
        [WEIGHT, WEIGHT],
        "merged",
        combination_type=combination,
        density=0.5,
        svd_rank=8,
    )
    ours, kept = merged_lora(
        states,
        method=method,
        weight=WEIGHT,
        density=0.5,
        space="delta",
        sign="total",
        slots=2,
        seed=0,
        device=torch.device("cpu"),
    )
    assert len(ours) == 2 and 0 < kept <= 1
    for name, site in sites.items():
        mine = delta(ours[0], name) + delta(ours[1], name)
        torch.testing.assert_close(mine, site.get_delta_weight("merged"), rtol=0, atol=2e-5)
    if method == "task_arithmetic":  # two rank-4 updates: rank 8 holds their sum exactly
        assert kept == pytest.approx(1.0)
        for name in sites:
            exact = WEIGHT * (delta(states[0], name) + delta(states[1], name))
            mine = delta(ours[0], name) + delta(ours[1], name)
            torch.testing.assert_close(mine, exact, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def three_tasks():
    return [word_task(name, n_train=24, n_test=12) for name in ("colors", "animals", "moods")]


def config(strategy="merge", router="oracle", **options) -> LearnerConfig:
    router_options = options.pop("router_options", {})
    return LearnerConfig(
        train=FAST_TRAIN,
        strategy=strategy,
        strategy_options=options,
        router=router,
        router_options=router_options,
    )


def test_merged_slot_answers_every_task_and_is_rebuilt_after_each(
    make_backbone, three_tasks, tmp_path
):
    learner = ContinualLearner(
        make_backbone(), config=config(method="dare_ties", density=0.5), run_dir=tmp_path / "run"
    )
    for number, task in enumerate(three_tasks):
        learner.learn(task)
        strategy, bank = learner.strategy, learner.bank
        assert strategy.merged == [1]  # opened after the first task, after its slot
        own = [state.slot for state in learner.learned.values()]
        assert own == [0, 2, 3][: number + 1]
        assert all(strategy.routing(learner, name) == ([1], [1.0]) for name in learner.learned)
        expected, _ = merged_lora(
            [bank.slot_state(slot) for slot in own],
            method="dare_ties",
            weight=1.0,
            density=0.5,
            space="delta",
            sign="total",
            slots=1,
            seed=learner.task_seed(task, "merge"),
            device=torch.device("cpu"),
        )
        stored = bank.slot_state(1)
        for key, value in expected[0].items():
            torch.testing.assert_close(stored[key].float(), value.to(stored[key]).float())
        record = learner.records[-1]["strategy"]
        assert record["merged_tasks"] == number + 1 and 0 < record["kept_energy"] <= 1
    learner.finish()
    files = sorted(p.name for p in (tmp_path / "run" / "tasks" / "moods").iterdir())
    assert "merged.safetensors" in files
    loaded = load_learner(tmp_path / "run", backbone=make_backbone())
    assert loaded.strategy.merged == [1]
    inputs = three_tasks[0].test_inputs
    assert loaded.predict(inputs, "colors") == learner.predict(inputs, "colors")


def test_a_task_that_fails_after_merging_leaves_no_trace(make_backbone, three_tasks, monkeypatch):
    """The second task is merged, then its evaluation fails: the merged slot is back to the
    first task's merge, and learning the task again gives what a straight run gives."""
    straight = ContinualLearner(make_backbone(), config=config(method="task_arithmetic"))
    failing = ContinualLearner(make_backbone(), config=config(method="task_arithmetic"))
    failing.learn(three_tasks[0])
    first = {key: value.clone() for key, value in failing.bank.slot_state(1).items()}
    evaluate = failing.predictor.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(failing.predictor, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        failing.learn(three_tasks[1])
    assert failing.bank.num_slots == 2 and failing.strategy.merged == [1]
    for key, value in failing.bank.slot_state(1).items():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0)
    monkeypatch.setattr(failing.predictor, "evaluate", evaluate)
    failing.learn(three_tasks[1])
    for task in three_tasks[:2]:
        straight.learn(task)
    for key, value in straight.bank.slot_state(1).items():
        torch.testing.assert_close(failing.bank.slot_state(1)[key], value)


@pytest.mark.parametrize(
    ("strategy", "changes", "message"),
    [
        ("merge", {"module": "adapter"}, 'module = "lora"'),
        ("merge", {"router": "mahalanobis"}, "route_or_merge"),
        ("route_or_merge", {"router": "oracle"}, 'router = "mahalanobis"'),
        ("merge", {"strategy_options": {"method": "mean"}}, "ties"),
        ("merge", {"strategy_options": {"density": 0}}, r"\(0, 1\]"),
        ("merge", {"strategy_options": {"weight": "half"}}, '"mean"'),
        ("merge", {"strategy_options": {"space": "factors", "slots": 2}}, "exactly 1"),
        ("merge", {"strategy_options": {"weight": 1e30}}, "1000"),
        ("merge", {"strategy_options": {"slots": 2**62}}, r"\[1, 64\]"),
        ("sdlora", {"strategy_options": {"magnitude_init": 1e30}}, "magnitude_init"),
        ("route_or_merge", {"router": "prototype", "strategy_options": {"margin": -1}}, ">= 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_fix(strategy, changes, message):
    values = {"strategy": strategy, "router": "oracle"} | changes
    bad = LearnerConfig(**values)
    with pytest.raises(ContinualPeftError, match=message):
        check_config(bad)


def test_route_or_merge_sends_rejected_and_unsure_rows_to_the_merged_slot(
    make_backbone, three_tasks
):
    plain = ContinualLearner(
        make_backbone(), config=config("route_or_merge", "mahalanobis", margin=0.0)
    )
    everything = ContinualLearner(
        make_backbone(), config=config("route_or_merge", "mahalanobis", margin=1e12)
    )
    merged = ContinualLearner(make_backbone(), config=config("merge"))
    for task in three_tasks:
        for learner in (plain, everything, merged):
            learner.learn(task)
    report = plain.report["accuracy_matrix"]
    # nothing rejected, no margin: the fallback column is the router's
    assert report["route_or_merge"] == report["routed"]
    # every row unsure: each answers through the merged slot and its best task's head; the
    # router knows these word tasks perfectly, so that is merge's oracle row
    routing = everything.monitor.routing_matrix()[-1]
    assert routing.min() == 1.0
    last = everything.report["accuracy_matrix"]["route_or_merge"][-1]
    assert last == merged.report["accuracy_matrix"]["oracle"][-1]
    # with the task given, route_or_merge uses each task's own slot, as per_task
    assert everything.strategy.routing(everything, "colors") == ([0], [1.0])
    details = everything.predict_details(three_tasks[1].test_inputs)
    assert all(row["fallback"] for row in details)
    assert [row["task"] for row in details] == ["animals"] * len(details)  # the head that answered
    answers = merged.predict(three_tasks[1].test_inputs, "animals")
    assert [row["label"] for row in details] == answers
