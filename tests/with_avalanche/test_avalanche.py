"""The Avalanche extra: Avalanche benchmarks as our streams, our modules in Avalanche's loop, and
Avalanche's own metric code agreeing with our monitor on the same run.

Runs in the avalanche environment (scripts/test.sh, its Avalanche step). Elsewhere the module
is skipped, unless CONTINUAL_PEFT_REQUIRE_AVALANCHE=1 makes a missing Avalanche an error.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from sklearn.datasets import load_digits

if os.environ.get("CONTINUAL_PEFT_REQUIRE_AVALANCHE") != "1":
    pytest.importorskip("avalanche")
warnings.filterwarnings("ignore", message="no QP solver")

from avalanche.benchmarks import tensors_benchmark  # noqa: E402
from avalanche.evaluation.metrics import (  # noqa: E402
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
)
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from continual_peft import ContinualLearner, LearnerConfig, TrainConfig  # noqa: E402
from continual_peft.backbones.image import ImageBackbone  # noqa: E402
from continual_peft.integrations.avalanche import (  # noqa: E402
    avalanche_strategy,
    stream_from_benchmark,
    tasks_from_benchmark,
)
from continual_peft.metrics import avalanche_forgetting, backward_transfer, forgetting  # noqa: E402

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
TRAIN = TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup=0.0, eval_batch_size=64)


def tiny_vit_backbone() -> ImageBackbone:
    return ImageBackbone(tiny_vit(hidden_size=32), None, name="tiny-vit")


def digit_benchmark(task_labels: bool, single_test: bool = False, per_class: int = 30):
    """Digits as an Avalanche benchmark: 5 experiences of 2 digits, `per_class` train images
    and `per_class // 2` test images per digit."""
    data = load_digits()
    x = torch.tensor((data.images / 16.0 - 0.5) / 0.5, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    rng = np.random.default_rng(0)
    train, test = [], []
    for pair in PAIRS:
        picked = [rng.permutation(np.flatnonzero(data.target == d)) for d in pair]
        tr = np.concatenate([p[:per_class] for p in picked])
        te = np.concatenate([p[per_class : per_class + per_class // 2] for p in picked])
        train.append([x[tr], y[tr]])
        test.append([x[te], y[te]])
    if single_test:
        test = [[torch.cat([t[0] for t in test]), torch.cat([t[1] for t in test])]]
    labels = list(range(5)) if task_labels else [0] * 5
    return tensors_benchmark(
        train_tensors=train,
        test_tensors=test,
        task_labels=labels,
        complete_test_set_only=single_test,
    )


def evaluator() -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        return EvaluationPlugin(
            accuracy_metrics(experience=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            loggers=[],
        )


def run_in_avalanche(strategy_name: str, router: str, task_labels: bool):
    """Train our learner through Avalanche's loop; evaluate the seen test experiences after
    each training experience, as Avalanche's forgetting metrics require."""
    benchmark = digit_benchmark(task_labels)
    config = LearnerConfig(strategy=strategy_name, router=router, train=TRAIN)
    learner = ContinualLearner(tiny_vit_backbone(), config=config)
    plugin_evaluator = evaluator()
    strategy = avalanche_strategy(learner, benchmark, evaluator=plugin_evaluator)
    for i, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        strategy.eval(benchmark.test_stream[: i + 1])
    learner.finish()
    return learner, plugin_evaluator.get_all_metrics(), benchmark


def avalanche_matrix(history: dict, n: int, task_labels: bool) -> np.ndarray:
    """R[i][j] from Avalanche's per-experience accuracy history (one eval per training exp)."""
    R = np.full((n, n), np.nan)
    for j in range(n):
        task = f"/Task{j if task_labels else 0:03d}"
        values = history[f"Top1_Acc_Exp/eval_phase/test_stream{task}/Exp{j:03d}"][1]
        R[j:, j] = values  # experience j is first evaluated after training it
    return R


def test_benchmark_experiences_become_tasks():
    benchmark = digit_benchmark(task_labels=True)
    tasks = tasks_from_benchmark(benchmark, prefix="digits")
    assert [t.name for t in tasks] == [f"digits-{i}" for i in range(5)]
    assert [t.labels for t in tasks] == [[str(a), str(b)] for a, b in PAIRS]
    for i, task in enumerate(tasks):
        assert len(task.train_inputs) == 60 and len(task.test_inputs) == 30
        assert task.description == f"Avalanche task label {i}"
        x, y, _ = benchmark.train_stream[i].dataset[7]
        assert torch.equal(task.train_inputs[7], x) and task.labels[task.train_labels[7]] == str(y)
    stream = stream_from_benchmark(digit_benchmark(task_labels=False, single_test=True))
    assert [t.labels for t in stream.tasks] == [[str(a), str(b)] for a, b in PAIRS]
    assert [len(t.test_inputs) for t in stream.tasks] == [30] * 5  # cut by each task's classes
    assert {t.description for t in stream.tasks} == {"Avalanche task label 0"}


@pytest.mark.parametrize(
    ("strategy_name", "router", "task_labels", "mode"),
    [
        ("seq", "oracle", True, "oracle"),  # task-incremental; one shared slot forgets
        ("per_task", "mahalanobis", False, "routed"),  # class-incremental; the router routes
    ],
)
def test_avalanche_metrics_equal_our_monitor(strategy_name, router, task_labels, mode):
    learner, history, _ = run_in_avalanche(strategy_name, router, task_labels)
    report = learner.report
    ours = np.array(report["accuracy_matrix"][mode], dtype=float)
    theirs = avalanche_matrix(history, 5, task_labels)
    lower = np.tril_indices(5)
    np.testing.assert_allclose(theirs[lower], ours[lower], atol=1e-12)
    oracle = np.array(report["accuracy_matrix"]["oracle"], dtype=float)
    assert oracle[np.diag_indices(5)].mean() > 0.75  # the modules learned in Avalanche's loop

    # Avalanche's first-minus-last forgetting, per experience and for the stream, and its BWT
    expected = avalanche_forgetting(ours)
    for j in range(4):
        task = f"/Task{j if task_labels else 0:03d}"
        key = f"ExperienceForgetting/eval_phase/test_stream{task}/Exp{j:03d}"
        assert history[key][1][-1] == pytest.approx(expected[j], abs=1e-12)
    stream_forgetting = history["StreamForgetting/eval_phase/test_stream"][1][-1]
    assert stream_forgetting == pytest.approx(np.mean(expected[:4]), abs=1e-12)
    bwt = history["StreamBWT/eval_phase/test_stream"][1][-1]
    assert bwt == pytest.approx(backward_transfer(ours), abs=1e-12)
    assert report["metrics"][mode]["avalanche_forgetting"] == pytest.approx(expected, abs=1e-12)
    # ours beside theirs: Chaudhry's max-minus-last is never below first-minus-last
    assert report["metrics"][mode]["forgetting"] == pytest.approx(forgetting(ours))
    assert forgetting(ours) >= stream_forgetting - 1e-12
    if strategy_name == "seq":
        assert stream_forgetting > 0.05  # a shared slot really forgets: the check is not 0 == 0


def test_plugin_needs_task_labels_or_a_router():
    benchmark = digit_benchmark(task_labels=False)
    learner = ContinualLearner(tiny_vit_backbone(), config=LearnerConfig(train=TRAIN))
    with pytest.raises(Exception, match="give the learner a router"):
        avalanche_strategy(learner, benchmark)


def test_the_readme_import_path_is_the_integration():
    """`from continual_peft.avalanche import ...` (the documented path) is the integration's."""
    from continual_peft import avalanche

    assert avalanche.avalanche_strategy is avalanche_strategy
    assert avalanche.stream_from_benchmark is stream_from_benchmark


def test_a_language_model_learner_is_refused_with_the_way_out():
    from continual_peft import CausalBackbone
    from continual_peft.backbones.tiny import tiny_model, word_tokenizer

    tokenizer = word_tokenizer(["red", "blue"])
    backbone = CausalBackbone(tiny_model("llama", len(tokenizer)), tokenizer, dtype="float32")
    learner = ContinualLearner(backbone, config=LearnerConfig(train=TRAIN))
    with pytest.raises(Exception, match="causal language model.*ContinualLearner.learn"):
        avalanche_strategy(learner, digit_benchmark(task_labels=True))
