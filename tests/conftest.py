"""Fixtures: the session's tokenizer, tiny backbones, the word tasks, and one finished tiny run
with its exports (built once, shared by the command-line, predict, eval, export and report tests);
and the suite's settings: the device and dtype switches helpers.py describes, one torch thread,
and no PNG plots unless a test is marked `real_plots`.

The builders behind the fixtures live in helpers.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    DEVICE,
    TEST_DTYPE,
    FinishedRun,
    finish_tiny_run,
    load_tokenizer,
    tiny_backbone,
    use_test_dtype,
    word_task,
)

from continual_peft import Backbone, Task
from continual_peft.backbones import placement
from continual_peft.reports import grid as grid_reports
from continual_peft.reports import leaderboard
from continual_peft.reports import run as run_reports

if TEST_DTYPE and TEST_DTYPE not in set(placement.DTYPES) - {"auto"}:
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DTYPE={TEST_DTYPE!r} is not a dtype; use bfloat16, float16 or "
        "float32, or leave it unset for the library's own auto",
        returncode=4,
    )
if DEVICE != "cpu" and not DEVICE.startswith("cuda"):
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DEVICE={DEVICE!r} is not a device the suite runs on; use cpu "
        "(the default), cuda or cuda:N",
        returncode=4,
    )
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.exit(
        f"CONTINUAL_PEFT_TEST_DEVICE={DEVICE!r}, but torch sees no CUDA device here; use cpu "
        "(the default) or run on a machine with a GPU",
        returncode=4,
    )

use_test_dtype()  # the suite's "auto" (helpers.py)

# Tiny models run fastest on one thread, and CI has only two cores to share.
torch.set_num_threads(1)

# A PNG costs about a second of matplotlib: more than a tiny task's training. Tests skip them
# unless marked `real_plots` (those that look at them): a run's heatmap and loss curves are not
# drawn, and a comparison's or a grid's figures are built but not rendered (each file holds the
# PNG signature only).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_PLOTS = [
    (run_reports, "plot_accuracy_matrix", lambda report, path: None),
    (run_reports, "plot_loss_curves", lambda report, path: False),
    (leaderboard, "figure_png", lambda figure, **options: PNG_SIGNATURE),
    (grid_reports, "figure_png", lambda figure, **options: PNG_SIGNATURE),
]
REAL_PLOTS = [(module, name, getattr(module, name)) for module, name, _ in QUICK_PLOTS]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "real_plots(*modules): the test draws its PNG plots; only those of the named modules of "
        "continual_peft.reports (run, leaderboard, grid) if any are named",
    )


@pytest.fixture(scope="session", autouse=True)
def no_plots():
    with pytest.MonkeyPatch.context() as patch:
        for module, name, stand_in in QUICK_PLOTS:
            patch.setattr(module, name, stand_in)
        yield


@pytest.fixture(autouse=True)
def real_plots_where_marked(request, monkeypatch):
    marker = request.node.get_closest_marker("real_plots")
    for module, name, real in REAL_PLOTS if marker else []:
        if not marker.args or module.__name__.rsplit(".", 1)[-1] in marker.args:
            monkeypatch.setattr(module, name, real)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def make_backbone(tokenizer):
    """A factory: each call builds an identical fresh tiny backbone (each learner wraps its own)."""

    def make(max_length: int = 32) -> Backbone:
        return tiny_backbone(tokenizer, max_length)

    return make


@pytest.fixture
def tasks() -> list[Task]:
    return [word_task(n) for n in ("colors", "animals", "moods")]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tokenizer) -> FinishedRun:
    """The session's finished tiny run and its exports (helpers.FinishedRun): never modified."""
    return finish_tiny_run(tmp_path_factory.mktemp("finished"), tokenizer)


@pytest.fixture
def run_copy(finished_run: FinishedRun, tmp_path: Path) -> Path:
    """A copy of the finished run's directory, free to damage."""
    return Path(shutil.copytree(finished_run.run, tmp_path / "run"))
