"""Routers on synthetic frozen features: accuracy, statistics-only state, shrinkage, rejection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import OAS, LedoitWolf

from continual_peft.errors import ContinualPeftError
from continual_peft.routers import (
    ROUTERS,
    GaussianStats,
    build_router,
    load_router,
    save_router,
)

SCORING = [name for name in ROUTERS.names() if name != "oracle"]
NUM_TASKS, DIM = 4, 16


def clusters(n: int, seed: int = 0, test_seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Well-separated Gaussian clusters: per-task training features, and (4·100, d) test rows."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(NUM_TASKS, DIM, generator=generator)
    train = [c + 0.3 * torch.randn(n, DIM, generator=generator) for c in centres]
    generator.manual_seed(test_seed)
    test = torch.cat([c + 0.3 * torch.randn(100, DIM, generator=generator) for c in centres])
    return train, test


TEST_LABELS = torch.arange(NUM_TASKS).repeat_interleave(100)


def outliers(n: int = 200) -> torch.Tensor:
    """Rows far from every cluster, in directions of their own."""
    generator = torch.Generator().manual_seed(7)
    return 30.0 * torch.randn(n, DIM, generator=generator)


def fitted(name: str, train: list[torch.Tensor], **options: object):
    router = build_router(name, **options)
    for features in train:
        router.add_task(features)
    return router


def accuracy(router, features: torch.Tensor, labels: torch.Tensor) -> float:
    indices, _ = router.route(features)
    return (indices[:, 0] == labels).float().mean().item()


@pytest.mark.parametrize("name", SCORING)
def test_routes_separated_clusters(name):
    train, test = clusters(200)
    router = fitted(name, train)
    assert router.num_tasks == NUM_TASKS
    assert router.scores(test).shape == (len(test), NUM_TASKS)
    assert accuracy(router, test, TEST_LABELS) > 0.95


def test_gate_learns_continually_from_statistics():
    train, test = clusters(200)
    router = build_router("gate")
    for t, features in enumerate(train):
        with torch.inference_mode():  # the engine computes features and adds tasks there
            router.add_task(features)
        seen = TEST_LABELS.le(t)  # tasks learned so far
        assert accuracy(router, test[seen], TEST_LABELS[seen]) > 0.95


def test_mlp_gate_routes_separated_clusters():
    train, test = clusters(200)
    assert accuracy(fitted("gate", train, hidden=8, steps=150), test, TEST_LABELS) > 0.95


@pytest.mark.parametrize("name", [*SCORING, "oracle"])
def test_save_load_gives_identical_decisions(name, tmp_path):
    train, test = clusters(200)
    options = {} if name == "oracle" else {"reject_rate": 0.05}
    router = fitted(name, train, **options)
    save_router(router, tmp_path / "router")
    loaded = load_router(tmp_path / "router")
    assert type(loaded) is type(router) and loaded.options == router.options
    assert loaded.num_tasks == NUM_TASKS
    if name == "oracle":
        return
    rows = torch.cat([test, outliers()])
    for k in (1, 3):
        for got, want in zip(loaded.route(rows, k), router.route(rows, k), strict=True):
            assert torch.equal(got, want)
    assert torch.equal(loaded.scores(rows), router.scores(rows))


@pytest.mark.parametrize("name", SCORING)
def test_state_holds_statistics_and_only_the_held_out_rows(name):
    n = 203  # differs from T and d, so a stored raw feature matrix would show
    statistics = {(NUM_TASKS, DIM), (DIM, DIM), (NUM_TASKS,), (DIM,)}
    for rate, kept in ((0.0, 0), (0.05, int(0.2 * n))):  # calibration rows only to reject
        router = fitted(name, clusters(n)[0], reject_rate=rate)
        tensors, meta = router.state()
        calibration, neighbours = tensors.pop("calibration"), tensors.pop("neighbours")
        assert tuple(calibration.shape) == (NUM_TASKS * kept, DIM)
        fitted_rows = NUM_TASKS * (n - kept) if rate else 0  # "knn" keeps fitted rows to reject
        assert neighbours.shape[0] == fitted_rows
        assert tensors and {tuple(t.shape) for t in tensors.values()} <= statistics
        assert meta["options"] == router.options


@pytest.mark.parametrize(("shrinkage", "estimator"), [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_shrunk_covariance_matches_sklearn(shrinkage, estimator):
    generator = torch.Generator().manual_seed(3)
    # Few rows per dimension and unequal scales, so the shrinkage is far from 0 and from 1.
    scales = torch.linspace(0.2, 3.0, DIM, dtype=torch.float64)
    tasks = [
        torch.randn(DIM, dtype=torch.float64, generator=generator) * 4
        + scales * torch.randn(n, DIM, dtype=torch.float64, generator=generator)
        for n in (12, 20, 9)
    ]
    stats = GaussianStats(shrinkage)
    for x in tasks:
        stats.add(x)
    centred = np.concatenate([(x - x.mean(0)).numpy() for x in tasks])
    reference = estimator().fit(centred)
    assert 0.01 < reference.shrinkage_ < 0.99
    np.testing.assert_allclose(stats.covariance().numpy(), reference.covariance_, atol=1e-5)
    router = fitted("mahalanobis", tasks, shrinkage=shrinkage)
    np.testing.assert_allclose(router.stats.covariance().numpy(), reference.covariance_, atol=1e-5)


def test_mahalanobis_beats_prototype_on_anisotropic_clusters():
    # Tasks differ by 1 along a direction of spread 0.1, while one other direction spreads by 10:
    # normalised features are dominated by that spread, so cosine cannot tell the tasks apart.
    generator = torch.Generator().manual_seed(0)
    spread = torch.full((DIM,), 0.1)
    spread[1] = 10.0
    means = 2.0 * torch.eye(DIM)[2] + torch.arange(3.0)[:, None] * torch.eye(DIM)[0]  # (3, d)
    train = [m + spread * torch.randn(300, DIM, generator=generator) for m in means]
    test = torch.cat([m + spread * torch.randn(200, DIM, generator=generator) for m in means])
    labels = torch.arange(3).repeat_interleave(200)
    assert accuracy(fitted("mahalanobis", train), test, labels) > 0.95
    assert accuracy(fitted("prototype", train), test, labels) < 0.8


def test_topk_weights_mix_the_best_tasks():
    train, test = clusters(200)
    router = fitted("topk", train, base="mahalanobis", k=3, temperature=5.0)
    indices, weights = router.route(test)
    assert indices.shape == weights.shape == (len(test), 3)
    assert weights.dtype == torch.float32 and indices.dtype == torch.long
    torch.testing.assert_close(weights.sum(1), torch.ones(len(test)))
    assert (weights[:, :-1] >= weights[:, 1:]).all() and (weights[:, 1] > 0).any()
    assert len({tuple(row) for row in indices.tolist()}) > 1
    assert all(len(set(row)) == 3 for row in indices.tolist())


def test_topk_is_hard_routing_at_k1_and_zero_temperature():
    train, test = clusters(200)
    hard = fitted("mahalanobis", train)
    for options in ({"k": 1}, {"k": 2, "temperature": 1e-6}):
        router = fitted("topk", train, base="mahalanobis", **options)
        indices, weights = router.route(test)
        hard_indices, hard_weights = hard.route(test, k=options["k"])
        assert torch.equal(indices, hard_indices)
        assert torch.equal(weights, hard_weights)


def test_k_beyond_the_number_of_tasks_pads_with_no_module():
    train, test = clusters(200)
    for name in ("mahalanobis", "topk"):
        indices, weights = fitted(name, train[:2]).route(test, k=3)
        assert (indices[:, 2] == -1).all() and (weights[:, 2] == 0).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(len(test)))


@pytest.mark.parametrize("name", SCORING)
def test_rejection_is_calibrated_and_flags_outliers(name):
    train, _ = clusters(400)
    router = fitted(name, train, reject_rate=0.05)
    assert router.state()[0]["thresholds"].shape == (NUM_TASKS,)
    indices, weights = router.route(torch.cat(train), k=2)
    rejected = (indices == -1).all(dim=1)
    assert 0.02 <= rejected.float().mean().item() <= 0.09
    assert (weights[rejected] == 0).all() and (indices[~rejected] >= 0).all()
    far, far_weights = router.route(outliers(), k=2)
    assert (far == -1).all(dim=1).float().mean().item() > 0.9
    assert (far_weights[(far == -1).all(dim=1)] == 0).all()


@pytest.mark.parametrize("name", SCORING)
def test_no_rejection_by_default(name):
    train, _ = clusters(200)
    indices, weights = fitted(name, train).route(outliers())
    assert (indices >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)))


def test_unknown_router_lists_valid_names():
    with pytest.raises(ContinualPeftError, match="valid names: gate, mahalanobis, oracle"):
        ROUTERS.get("psychic")
    with pytest.raises(ContinualPeftError, match="valid names: .*prototype, topk"):
        build_router("psychic")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("prototype", {"bogus": 1}, "invalid options.*valid options: reject_rate"),
        ("prototype", {"reject_rate": 1.5}, r"reject_rate must be in \[0, 1\)"),
        ("mahalanobis", {"shrinkage": "magic"}, "valid choices: ledoit_wolf, oas"),
        ("topk", {"base": "oracle"}, "valid bases: gate, mahalanobis, prototype"),
        ("topk", {"temperature": 0.0}, "temperature must be > 0"),
        ("topk", {"base": "prototype", "shrinkage": "oas"}, "router 'prototype': invalid options"),
        ("gate", {"steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ContinualPeftError, match=message):
        build_router(name, **options)


@pytest.mark.parametrize("name", [*SCORING, "oracle"])
def test_wrong_features_raise_clear_errors(name):
    router = build_router(name)
    router.add_task(torch.randn(20, DIM))
    with pytest.raises(ContinualPeftError, match=f"dimension 8, but .* dimension {DIM}"):
        router.add_task(torch.randn(20, 8))
    with pytest.raises(ContinualPeftError, match=r"shape \(N, d\)"):
        router.add_task(torch.randn(DIM))
    with pytest.raises(ContinualPeftError, match="floating point"):
        router.add_task(torch.ones(20, DIM, dtype=torch.long))
    if name != "oracle":
        with pytest.raises(ContinualPeftError, match="dimension 8"):
            router.route(torch.randn(5, 8))
        with pytest.raises(ContinualPeftError, match="NaN"):
            router.scores(torch.full((2, DIM), float("nan")))


def test_routing_before_any_task_raises():
    with pytest.raises(ContinualPeftError, match="no tasks yet"):
        build_router("mahalanobis").route(torch.randn(3, DIM))


def test_oracle_needs_the_task():
    router = build_router("oracle")
    router.add_task(torch.randn(5, DIM))
    with pytest.raises(ContinualPeftError, match="oracle routing needs the task"):
        router.scores(torch.randn(2, DIM))
    with pytest.raises(ContinualPeftError, match="oracle routing needs the task"):
        router.route(torch.randn(2, DIM))
