"""A run directory grows by each task's own bytes: per-task parts written once into the task's
folder, the state every task changes kept for the newest two checkpoints only, and what a run
wrote still loads and rolls back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import WORDS

from continual_peft import ContinualLearner, LearnerConfig, Stream, Task, TrainConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.experiments.runner import run_stream
from continual_peft.routers import build_router, load_router_files, router_parts
from continual_peft.routers.persist import join_rows, split_rows
from continual_peft.store.checkpoint import (
    CHECKPOINT_FILE,
    MONITOR_ROW,
    ROUTER_ROWS,
    read_checkpoint,
    read_checkpoint_file,
)
from continual_peft.store.io import atomic_save_safetensors

TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
TASKS = 7


def many_tasks(count: int) -> list[Task]:
    """`count` small keyword tasks, cycling over the word families under new names."""
    families = list(WORDS.values())
    tasks = []
    for i in range(count):
        labels, fillers = families[i % len(families)]
        rows = [f"{labels[j % 3]} {fillers[(i + j) % 6]} {fillers[(j + 2) % 6]}" for j in range(18)]
        examples = [(text, labels[j % 3]) for j, text in enumerate(rows)]
        tasks.append(
            Task.from_examples(f"t{i}", train=examples[:12], test=examples[12:], labels=labels)
        )
    return tasks


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tokenizer):
    """A routed run learned task by task, with what its folder held after each task."""
    from helpers import tiny_backbone

    out = tmp_path_factory.mktemp("grown") / "run"
    config = LearnerConfig(router="mahalanobis", train=TRAIN)
    learner = ContinualLearner(tiny_backbone(tokenizer), config=config, run_dir=out)
    seen = []
    for task in many_tasks(TASKS):
        learner.learn(task)
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        seen.append({"files": files, "bytes": folder_bytes(out)})
    learner.finish()
    return learner, out, seen


def test_each_task_s_part_is_written_once_into_its_folder(grown):
    learner, out, seen = grown
    names = list(learner.learned)
    for done, state in enumerate(seen, start=1):
        files = state["files"]
        for name in names[:done]:
            assert f"tasks/{name}/{MONITOR_ROW}" in files
            assert f"tasks/{name}/{ROUTER_ROWS}" in files
        # the shared state of the newest two checkpoints only, none in the tasks' folders
        routers = sorted(f for f in files if f.startswith("state/router-") and f.endswith("rs"))
        assert routers == [
            f"state/router-{n}.safetensors" for n in range(max(1, done - 1), done + 1)
        ]
        assert not [f for f in files if f.endswith("/router.safetensors")]
        copies = [f for f in files if f.endswith(f"/{CHECKPOINT_FILE}")]
        assert copies == sorted(
            f"tasks/{n}/{CHECKPOINT_FILE}" for n in names[max(0, done - 2) : done]
        )


def test_the_run_grows_by_each_task_s_own_bytes(grown):
    learner, out, seen = grown
    for done in range(3, TASKS):  # after the first two, state is replaced, not added
        folder = out / "tasks" / list(learner.learned)[done]
        own = sum(p.stat().st_size for p in folder.iterdir() if p.name != CHECKPOINT_FILE)
        growth = seen[done]["bytes"] - seen[done - 1]["bytes"]
        assert growth <= 1.5 * own, (done, growth, own)


def test_the_previous_checkpoint_stays_whole(grown):
    learner, out, _ = grown
    names = list(learner.learned)
    previous = read_checkpoint_file(out, out / "tasks" / names[-2] / CHECKPOINT_FILE)
    assert previous.task_names == names[:-1]
    assert len(previous.monitor["rows"]["oracle"]) == len(names) - 1


def test_a_loaded_run_routes_and_reports_as_the_live_one(grown, make_backbone):
    learner, out, _ = grown
    loaded = ContinualLearner.load(out, backbone=make_backbone())
    inputs = [t for task in many_tasks(TASKS) for t in task.test_inputs[:2]]
    assert loaded.predict(inputs) == learner.predict(inputs)
    assert loaded.report["accuracy_matrix"] == learner.report["accuracy_matrix"]
    assert read_checkpoint(out).records == learner.records


ROUTER_CASES = {
    "mahalanobis": {},
    "mahalanobis_rejecting": {"reject_rate": 0.2, "max_calibration": 10},
    "mahalanobis_own_familiarity": {"reject_rate": 0.2, "familiarity": "relative"},
    "prototype": {"reject_rate": 0.2},
    "gate": {},
    "topk": {"k": 2},
}


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_a_router_s_task_rows_never_change_and_join_back(case, tmp_path):
    """What a checkpoint writes once per task must stay as it was after later tasks, and the
    parts must give back the router's whole state and its decisions."""
    name = case.split("_")[0]
    router = build_router(name, **ROUTER_CASES[case], layers="last")
    generator = torch.Generator().manual_seed(0)
    written = []
    for task in range(4):
        router.add_task(torch.randn(30, 6, generator=generator) + 3 * task)
        shared, meta, rows = router_parts(router)
        assert len(rows) == task + 1
        written.append(rows[-1])
        for earlier, kept in zip(rows, written, strict=True):
            assert earlier.keys() == kept.keys()
            for key in kept:
                assert torch.equal(earlier[key], kept[key]), (task, key)
        tensors, _ = router.state()
        joined = join_rows(shared, rows)
        assert joined.keys() == tensors.keys()
        assert all(torch.equal(joined[k], tensors[k]) for k in tensors)
    paths = []
    for task, part in enumerate(written):
        paths.append(tmp_path / f"rows-{task}.safetensors")
        atomic_save_safetensors(part, paths[-1])
    shared, meta, _ = router_parts(router)
    atomic_save_safetensors(shared, tmp_path / "shared.safetensors")
    (tmp_path / "shared.json").write_text(json.dumps(meta))
    back = load_router_files(tmp_path / "shared.safetensors", tmp_path / "shared.json", paths)
    probe = torch.randn(12, 6, generator=generator) * 4
    assert torch.equal(back.scores(probe), router.scores(probe))
    assert all(
        torch.equal(a, b) for a, b in zip(back.route(probe), router.route(probe), strict=True)
    )


def test_rows_of_different_tensors_are_refused():
    with pytest.raises(ContinualPeftError, match="different tensors"):
        join_rows({}, [{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    shared, rows = split_rows({"a": torch.arange(3.0), "s": torch.ones(2)}, {"a": [1, 2]})
    assert shared.keys() == {"s"} and [r["a"].tolist() for r in rows] == [[0.0], [1.0, 2.0]]


def test_a_shared_slot_s_older_copies_are_deleted(tmp_path, make_backbone, tasks):
    """Under seq every task writes the shared slot; a copy no kept checkpoint names goes."""
    config = LearnerConfig(strategy="seq", train=TRAIN)
    run_stream(Stream("words", tasks), config, tmp_path / "run", make_backbone=make_backbone)
    modules = sorted(p.parent.name for p in (tmp_path / "run").glob("tasks/*/module.safetensors"))
    assert modules == ["animals", "moods"]  # the newest checkpoint's and the one before it


def test_damage_to_both_kept_checkpoints_restarts_from_the_first_task(
    grown, tmp_path, make_backbone
):
    _, out, _ = grown
    run = tmp_path / "run"
    shutil.copytree(out, run)
    names = sorted(p.name for p in (run / "tasks").iterdir())
    tasks = many_tasks(TASKS)
    for name in (tasks[-1].name, tasks[-2].name):
        (run / "tasks" / name / "head.safetensors").write_bytes(b"damaged")
    said = []
    from continual_peft.store.repair import resume_point

    assert resume_point(run, Stream("many", tasks), said.append) is None
    assert "from the start" in said[0] and len(names) == TASKS
    assert not (run / CHECKPOINT_FILE).exists()


def test_routing_in_chunks_equals_one_call():
    """Re-evaluating hundreds of tasks routes their rows in chunks (bounded temporaries)."""
    from continual_peft.engine.prediction import ROUTE_CHUNK, in_chunks

    router = build_router("mahalanobis", layers="last")
    generator = torch.Generator().manual_seed(0)
    for task in range(3):
        router.add_task(torch.randn(40, 5, generator=generator) + task)
    rows = torch.randn(2 * ROUTE_CHUNK + 7, 5, generator=generator)
    for got, want in zip(in_chunks(router.route, rows), router.route(rows), strict=True):
        assert torch.equal(got, want)


def test_plots_are_redrawn_every_task_early_then_every_tenth():
    from continual_peft.reports.run import plots_due

    assert [t for t in range(1, 61) if plots_due(t)] == [*range(1, 21), 30, 40, 50, 60]


def test_at_500_tasks_a_router_keeps_statistics_only_and_routes_each_row_alone():
    """500 tasks: the state holds no feature row (its size does not follow the rows fitted),
    and a row's route is the same alone as in a batch of rows of every task."""
    router = build_router("mahalanobis", layers="last")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(500, 8, generator=generator) * 3
    for task in range(500):
        rows = 5 + task % 7  # tasks of different sizes
        router.add_task(centres[task] + torch.randn(rows, 8, generator=generator))
    tensors, _ = router.state()
    assert {k: tuple(v.shape) for k, v in tensors.items() if v.numel()} == {
        "thresholds": (500,),
        "sums": (500, 8),
        "counts": (500,),
        "fourth_moments": (500,),
        "scatter": (8, 8),
    }
    batch = centres[::5] + 0.1 * torch.randn(100, 8, generator=generator)
    together = router.route(batch)
    for i in (0, 37, 99):
        alone = router.route(batch[i : i + 1])
        assert all(torch.equal(a[0], b[i]) for a, b in zip(alone, together, strict=True))
    hits = (together[0][:, 0] == torch.arange(0, 500, 5)).float().mean()
    assert hits > 0.9  # the statistics still tell 500 tasks apart
