"""Rejection keeps its promise: split-conformal thresholds on held-out rows, recomputed as later
tasks move shared statistics (issue 27). Synthetic features, so the promise can be checked on
thousands of new rows per task."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import OAS

from continual_peft.errors import ContinualPeftError
from continual_peft.routers import build_router, load_router, save_router
from continual_peft.routers.neighbours import normalise_blocks

# every scoring router (familiarity "knn" by default), and every familiarity of their own
ROUTERS = [
    ("prototype", {}),
    ("mahalanobis", {}),
    ("gate", {"steps": 20}),
    ("topk", {"base": "mahalanobis", "k": 2}),
    ("prototype", {"familiarity": "cosine"}),
    ("mahalanobis", {"familiarity": "mahalanobis"}),
    ("mahalanobis", {"familiarity": "relative"}),
]
IDS = ["prototype", "mahalanobis", "gate", "topk", "cosine", "shared-gaussian", "relative"]


def drifting_stream(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """5 tasks, d = 64: (2500 training rows, 2000 new rows) each. Later tasks spread along
    other axes than earlier ones, so a shared covariance moves as they arrive."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(5):
        mean = 4 * torch.randn(64, generator=generator)
        scale = torch.exp(torch.randn(64, generator=generator) * (0.3 + 0.4 * t))
        tasks.append(
            tuple(mean + torch.randn(n, 64, generator=generator) * scale for n in (2500, 4000))
        )
    return tasks


def wide_stream(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 tasks, d = 512, 300 training rows each (n close to d, where fitted rows look far
    more familiar than new ones), and 2000 new rows each."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(3):
        mean = 0.25 * torch.randn(512, generator=generator)
        scale = torch.exp(0.5 * torch.randn(512, generator=generator))
        tasks.append(
            tuple(mean + torch.randn(n, 512, generator=generator) * scale for n in (300, 2000))
        )
    return tasks


def tolerance(alpha: float, calibration: int, new: int) -> float:
    """4.5 standard deviations of a measured rate around α: the threshold's own spread over
    the held-out draw (Beta, about α(1−α)/n) and the binomial spread of `new` rows, plus the
    finite-sample slack 1/(n + 1). 4.5, not 3: the test below makes about 210 such checks
    (14 router settings × 15 (step, task) pairs), and at 3 sd one of them would leave by chance
    about one run in four (at 4.5, under one in 1,000)."""
    spread = math.sqrt(alpha * (1 - alpha) * (1 / calibration + 1 / new))
    return 4.5 * spread + 1 / (calibration + 1)


def rejected_share(router, rows: torch.Tensor) -> float:
    indices, weights = router.route(rows)
    assert ((indices[:, 0] == -1) == (weights.sum(1) == 0)).all()
    return float((indices[:, 0] == -1).double().mean())


@pytest.mark.parametrize(("name", "options"), ROUTERS, ids=IDS)
@pytest.mark.parametrize(
    ("stream", "share"), [(drifting_stream, 0.2), (wide_stream, 0.5)], ids=["drift", "wide"]
)
def test_false_reject_rate_holds_on_new_rows_after_every_task(name, options, stream, share):
    alpha = 0.05
    tasks = stream()
    router = build_router(
        name, reject_rate=alpha, layers="last", calibration_share=share, **options
    )
    calibration = int(share * len(tasks[0][0]))
    tol = tolerance(alpha, calibration, len(tasks[0][1]))
    for step, (train, _) in enumerate(tasks):
        router.add_task(train)
        for j in range(step + 1):
            rate = rejected_share(router, tasks[j][1])
            assert abs(rate - alpha) <= tol, (step, j, rate)


def test_thresholds_before_this_change_drifted():
    """Today's mahalanobis rates on the drifting stream, recomputed the old way (thresholds set
    on the fitted rows when a task arrives, never again), leave the tolerance: the test above
    measures something the old router failed."""
    tasks, alpha = drifting_stream(), 0.05
    router = build_router("mahalanobis", layers="last", familiarity="mahalanobis")
    thresholds, worst = [], 0.0
    for step, (train, _) in enumerate(tasks):
        router.add_task(train)
        thresholds.append(torch.quantile(router._familiarity(train.double())[:, step], alpha))
        for j in range(step + 1):
            below = router._familiarity(tasks[j][1].double()) < torch.stack(thresholds)
            worst = max(worst, abs(float(below.all(1).double().mean()) - alpha))
    assert worst > tolerance(alpha, 500, 2000)


def test_the_guarantee_holds_on_average_over_held_out_draws():
    """Split conformal: with n calibration rows and k = ⌊α (n + 1)⌋, a new row is rejected
    with probability k / (n + 1). Averaged over 40 independent streams of one task."""
    alpha, n_train, rates = 0.1, 495, []  # 99 calibration rows: k = 10, probability 0.1
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        mean = torch.randn(8, generator=generator)
        train, new = (mean + torch.randn(n, 8, generator=generator) for n in (n_train, 2000))
        router = build_router("mahalanobis", reject_rate=alpha, layers="last")
        router.add_task(train)
        assert router.calibration_sizes == [99]
        rates.append(rejected_share(router, new))
    expected = math.floor(alpha * 100) / 100
    spread = math.sqrt(alpha * (1 - alpha) * (1 / 99 + 1 / 2000) / len(rates))
    assert abs(np.mean(rates) - expected) <= 3 * spread


@pytest.mark.parametrize(("name", "options"), ROUTERS, ids=IDS)
def test_threshold_is_the_conformal_quantile_of_held_out_rows(name, options):
    train = [x for x, _ in drifting_stream()[:3]]
    router = build_router(name, reject_rate=0.05, layers="last", **options)
    for x in train:
        router.add_task(x)
    base = router.base if name == "topk" else router
    assert base.calibration_sizes == [500, 500, 500]
    start = 0
    for t, size in enumerate(base.calibration_sizes):
        rows = base.calibration[start : start + size].double()
        start += size
        own = base._familiarity(rows)[:, t].sort().values
        k = math.floor(0.05 * (size + 1))
        assert base.thresholds[t] == own[k - 1]


def test_statistics_never_see_the_calibration_rows():
    train = [x for x, _ in drifting_stream()[:2]]
    router = build_router("mahalanobis", reject_rate=0.02, layers="last")
    for x in train:
        router.add_task(x)
    kept = router.calibration.double()
    for t, x in enumerate(train):
        held = kept[500 * t : 500 * (t + 1)]
        # every kept row is one of the task's rows (to float32 precision) ...
        matches = torch.cdist(held, x.double()).amin(1)
        assert (matches < 1e-4).all()
        # ... and the task's mean is the mean of the other rows only
        fitted = x.double()[torch.cdist(x.double(), held).amin(1) > 1e-4]
        assert len(fitted) == len(x) - 500
        torch.testing.assert_close(router.stats.means[t], fitted.mean(0))
    facts = router.rejection()
    assert facts["calibration_examples"] == [500, 500] and router.neighbours.sizes == [1000, 1000]
    assert facts["kept_bytes"] == 1000 * 64 * 4 + 2000 * 64 * 2  # float32 held out, float16 kept
    # the neighbours kept are fitted rows (normalised), never calibration rows
    neighbours = router.neighbours.rows.double()
    every = normalise_blocks(torch.cat([x.double() for x in train]), None)
    assert (torch.cdist(neighbours, every).amin(1) < 1e-3).all()
    assert torch.cdist(neighbours, normalise_blocks(kept, None)).amin() > 1e-3


@pytest.mark.parametrize("name", ["prototype", "mahalanobis", "gate"])
def test_nothing_is_held_out_without_rejection(name):
    x = drifting_stream()[0][0]
    router = build_router(name, layers="last", **({"steps": 5} if name == "gate" else {}))
    router.add_task(x)
    assert router.calibration_sizes == [0] and router.calibration.numel() == 0
    if name != "prototype":
        assert router.stats.counts.tolist() == [len(x)]


@pytest.mark.parametrize(("name", "options"), ROUTERS, ids=IDS)
def test_a_rows_decision_does_not_depend_on_its_batch(name, options):
    tasks = drifting_stream()[:3]
    router = build_router(name, reject_rate=0.05, layers="last", **options)
    for x, _ in tasks:
        router.add_task(x)
    far = 50 * torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    rows = torch.cat([tasks[0][1][:30], far, tasks[2][1][:30]])
    together = router.route(rows)
    alone = [router.route(rows[i : i + 1]) for i in range(len(rows))]
    for got, want in zip(
        together, (torch.cat(parts) for parts in zip(*alone, strict=True)), strict=True
    ):
        assert torch.equal(got, want)
    if options.get("familiarity") != "relative":  # which, subtracting the distance to
        assert (together[0][30:50, 0] == -1).all()  # everything, accepts some far rows


def test_relative_familiarity_matches_a_plain_recomputation():
    """Ren et al. 2021: −(D²ₜ(x) − D²₀(x)), D₀ the distance to one Gaussian over all rows
    (here under scikit-learn's OAS covariance of the rows about their overall mean)."""
    tasks = [x[:300].double() for x, _ in drifting_stream()[:3]]
    router = build_router("mahalanobis", familiarity="relative", layers="last")
    for x in tasks:
        router.add_task(x)
    rows = drifting_stream(1)[1][1][:50].double()
    everything = torch.cat(tasks)
    background = OAS(assume_centered=True).fit((everything - everything.mean(0)).numpy())
    inverse = torch.from_numpy(np.linalg.inv(background.covariance_))
    centred = rows - everything.mean(0)
    d0 = ((centred @ inverse) * centred).sum(1)
    dt = router.stats.distances(rows).pow(2)
    torch.testing.assert_close(router._familiarity(rows), -(dt - d0[:, None]), rtol=1e-6, atol=1e-6)
    plain = build_router("mahalanobis", layers="last")
    for x in tasks:
        plain.add_task(x)
    assert torch.equal(router.route(rows)[0], plain.route(rows)[0])  # routing is unchanged


def test_duplicated_records_do_not_raise_the_rate():
    """Every training row given three times (duplicated records): copies go to one side of the
    held-out split together, so the held-out rows stay as unfamiliar as new ones."""
    alpha, rates = 0.1, []
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        train, new = (torch.randn(n, 16, generator=generator) for n in (600, 4000))
        router = build_router("mahalanobis", reject_rate=alpha, layers="last")
        router.add_task(train.repeat(3, 1))
        assert router.calibration_sizes == [120]  # distinct rows, none fitted
        assert router.state()[0]["counts"].tolist() == [3 * (600 - 120)]  # all copies left
        rates.append(rejected_share(router, new))
    spread = math.sqrt(alpha * (1 - alpha) * (1 / 120 + 1 / 4000) / len(rates))
    assert abs(np.mean(rates) - alpha) <= 3 * spread + 1 / 121, rates


def test_too_few_calibration_rows_warn_and_reject_nothing():
    router = build_router("mahalanobis", reject_rate=0.02, layers="last")
    with pytest.warns(UserWarning, match=r"task 0 has 40 calibration row\(s\).*needs 49"):
        router.add_task(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)))
    assert router.rejection()["calibrated"] == [False]
    assert rejected_share(router, 100 * torch.randn(50, 8)) == 0.0


def test_saved_router_keeps_its_calibration(tmp_path):
    tasks = drifting_stream()[:2]
    router = build_router("mahalanobis", reject_rate=0.05, layers="last")
    router.add_task(tasks[0][0])
    save_router(router, tmp_path / "r")
    loaded = load_router(tmp_path / "r")
    for r in (router, loaded):  # a later task recalibrates both from the kept rows alike
        r.add_task(tasks[1][0])
    assert torch.equal(loaded.thresholds, router.thresholds)
    rows = torch.cat([x for _, x in tasks])
    assert torch.equal(loaded.route(rows)[0], router.route(rows)[0])


@pytest.mark.parametrize("options", [{}, {"reject_rate": 0.05}, {"familiarity": "relative"}])
def test_a_loaded_router_saves_the_state_it_was_saved_with(tmp_path, options):
    """Save, load, save: the same tensors, shapes included (empty ones too), so two runs that
    differ only in whether a router went through a file (a resumed or distributed run) agree."""
    router = build_router("mahalanobis", layers="last", **options)
    router.add_task(drifting_stream()[0][0])
    save_router(router, tmp_path / "r")
    tensors, meta = load_router(tmp_path / "r").state()
    expected, expected_meta = router.state()
    assert tensors.keys() == expected.keys() and meta == expected_meta
    for key, value in expected.items():
        assert tensors[key].shape == value.shape and tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key


def test_router_saved_before_calibration_keeps_its_thresholds(tmp_path):
    """A router from before calibration rows were kept: its tasks keep the thresholds saved
    with them; a new task is calibrated on held-out rows."""
    tasks = drifting_stream()[:2]
    router = build_router("mahalanobis", reject_rate=0.05, layers="last")
    router.add_task(tasks[0][0])
    tensors, meta = router.state()
    old = {k: v for k, v in tensors.items() if k != "calibration"}
    old_meta = {k: v for k, v in meta.items() if k != "calibration_sizes"}
    old_meta["options"] = {
        k: v
        for k, v in meta["options"].items()
        if k not in ("calibration_share", "max_calibration", "familiarity")
    }
    loaded = type(router).from_state(old, old_meta)
    assert loaded.calibration_sizes == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.add_task(tasks[1][0])
    assert loaded.thresholds[0] == router.thresholds[0] and loaded.calibration_sizes == [0, 500]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calibration_share": 0.0}, r"calibration_share must be in \(0, 1\)"),
        ({"calibration_share": 1.0}, r"calibration_share must be in \(0, 1\)"),
        ({"calibration_share": "half"}, "calibration_share must be a number"),
        ({"max_calibration": 0}, "max_calibration must be >= 1"),
        ({"max_calibration": 2.5}, "max_calibration must be an integer"),
        ({"familiarity": "vibes"}, "valid choices for mahalanobis: knn, mahalanobis, relative"),
        ({"reject_rate": 1e-9}, "needs at least 999999999 calibration rows.*max_calibration"),
        ({"reject_rate": 0.1, "max_calibration": 5}, "raise max_calibration to 9"),
        ({"knn_k": 0}, "knn_k must be an integer >= 1"),
    ],
)
def test_bad_calibration_options(options, message):
    with pytest.raises(ContinualPeftError, match=message):
        build_router("mahalanobis", **options)


def _tamper_tensor(key, change):
    def edit(tensors, meta):
        tensors[key] = change(tensors[key])

    return edit


def _tamper_meta(edit_meta):
    def edit(tensors, meta):
        edit_meta(meta)

    return edit


TAMPERED = {
    "NaN threshold": _tamper_tensor("thresholds", lambda t: torch.full_like(t, torch.nan)),
    "block width not dividing": _tamper_meta(lambda m: m.update(block_width=7)),
    "integer thresholds": _tamper_tensor("thresholds", lambda t: t.long()),
    "NaN scatter": _tamper_tensor("scatter", lambda t: torch.full_like(t, torch.nan)),
    "NaN neighbours": _tamper_tensor("neighbours", lambda t: torch.full_like(t, torch.nan)),
    "text task count": _tamper_meta(lambda m: m.update(num_tasks="x")),
    "text block width": _tamper_meta(lambda m: m.update(block_width="x")),
    "negative block width": _tamper_meta(lambda m: m.update(block_width=-8)),
    "no options": _tamper_meta(lambda m: m.pop("options")),
    "rate out of range": _tamper_meta(lambda m: m["options"].update(reject_rate=5)),
}


@pytest.mark.parametrize("edit", list(TAMPERED.values()), ids=list(TAMPERED))
def test_a_changed_router_file_is_refused_naming_it(tmp_path, edit):
    """A router's files changed by hand (or by another version): a clear error naming the
    folder and the fix, never a traceback from deep inside, nor silently other decisions."""
    import json

    from safetensors.torch import load_file, save_file

    router = build_router("mahalanobis", reject_rate=0.1, layers="last")
    router.add_task(torch.randn(400, 8, generator=torch.Generator().manual_seed(0)))
    save_router(router, tmp_path / "r")
    tensors = load_file(tmp_path / "r" / "router.safetensors")
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    edit(tensors, meta)
    save_file(tensors, tmp_path / "r" / "router.safetensors")
    (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ContinualPeftError, match=r"r is corrupt.*saved router does not load"):
        load_router(tmp_path / "r")


def test_features_of_width_zero_are_refused_and_a_failed_move_changes_nothing():
    router = build_router("mahalanobis", reject_rate=0.1, layers="last")
    with pytest.raises(ContinualPeftError, match=r"shape \(N, d\), d >= 1"):
        router.add_task(torch.empty(300, 0))
    assert router.num_tasks == 0
    router.add_task(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises((RuntimeError, ContinualPeftError)):
        router.to("no-such-device")
    assert router.device == torch.device("cpu")
    assert router.route(torch.randn(4, 8))[0].shape == (4, 1)


def test_a_router_that_cannot_calibrate_says_rejection_is_off(tmp_path):
    """One task too small to calibrate accepts every row, so nothing is rejected: the loaded
    router warns, and the report's rejection table says so in place of the promise."""
    from continual_peft.reports.data import rejection_table

    router = build_router("mahalanobis", reject_rate=0.1, layers="last")
    router.add_task(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning, match="task 1 has 2 calibration row"):
        router.add_task(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)))
    save_router(router, tmp_path / "r")
    with pytest.warns(UserWarning, match=r"task\(s\) \[1\] .* rejects nothing"):
        load_router(tmp_path / "r")
    report = {
        "rejection": {**router.rejection(), "by_task": {"rejected": [0.0, 0.0]}},
        "task_names": ["big", "tiny"],
        "routing_accuracy": [[1.0, None], [1.0, 1.0]],
        "accuracy_matrix": {"routed": [[0.9, None], [0.9, 0.5]]},
    }
    caption, _, rows = rejection_table(report)
    assert caption.startswith("REJECTION IS OFF") and "tiny" in caption and "big" not in caption
    assert [row[-1] for row in rows] == ["60", "2", ""]
