"""`ContinualLearner.save` / `load`: identical predictions, and a loaded learner keeps learning
exactly as the learner it was saved from would have (shared-slot strategies included)."""

from __future__ import annotations

import json

import pytest
from conftest import word_task

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig, TrainConfig
from continual_peft.engine.loading import load_learner
from continual_peft.errors import CorruptFileError
from continual_peft.modules.prompt_pool import PromptPoolConfig
from continual_peft.store.checkpoint import CHECKPOINT_FILE

TRAIN = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0)
NAMES = ["colors", "animals", "moods"]


@pytest.fixture(scope="module")
def stream() -> list:
    return [word_task(name, n_train=24, n_test=12) for name in NAMES]


def config(strategy: str = "per_task", **extra) -> LearnerConfig:
    if strategy == "l2p":
        extra |= {
            "module": "prompt_pool",
            "modules": {"prompt_pool": PromptPoolConfig(pool_size=4, prompt_length=2, top_n=2)},
        }
    return LearnerConfig(strategy=strategy, train=TRAIN, **extra)


def learn(make_backbone, tasks, **kwargs) -> ContinualLearner:
    learner = ContinualLearner(make_backbone(), config=config(**kwargs))
    for task in tasks:
        learner.learn(task)
    return learner


def texts(tasks) -> list[str]:
    return [text for task in tasks for text in task.test_inputs[:4]]


@pytest.mark.parametrize("strategy", ["per_task", "seq", "replay", "ewc", "joint", "olora", "l2p"])
def test_save_load_then_learn_equals_learning_straight(strategy, make_backbone, stream, tmp_path):
    straight = learn(make_backbone, stream, strategy=strategy)
    first = learn(make_backbone, stream[:2], strategy=strategy)
    first.save(tmp_path / "saved")
    loaded = ContinualLearner.load(tmp_path / "saved", make_backbone(), tasks=stream[:2])
    loaded.learn(stream[2])
    assert loaded.report["accuracy_matrix"] == straight.report["accuracy_matrix"]
    assert loaded.report["initial_accuracy"] == straight.report["initial_accuracy"]
    for task in NAMES:
        assert loaded.predict(texts(stream), task=task) == straight.predict(texts(stream), task)
    strip = ("train_seconds", "eval_seconds")
    records = [[{k: v for k, v in r.items() if k not in strip} for r in x.records]
               for x in (loaded, straight)]  # fmt: skip
    assert records[0] == records[1]


def test_round_trip_gives_identical_predictions(make_backbone, stream, tmp_path):
    learner = learn(make_backbone, stream, router="mahalanobis")
    learner.save(tmp_path / "saved")
    loaded = ContinualLearner.load(tmp_path / "saved", make_backbone())
    inputs = texts(stream)
    assert loaded.predict_details(inputs) == learner.predict_details(inputs)  # routed
    for task in NAMES:
        assert loaded.predict(inputs, task=task) == learner.predict(inputs, task=task)  # oracle
    assert loaded.report["accuracy_matrix"] == learner.report["accuracy_matrix"]
    assert loaded.report["metrics"] == learner.report["metrics"]
    saved = json.loads((tmp_path / "saved" / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    assert saved["tasks_done"] == 3 and saved["last_task"] == "moods"
    assert "tasks/moods/router.safetensors" in saved["files"]
    # a run directory loads through the same loader
    run = ContinualLearner(make_backbone(), config=config(), run_dir=tmp_path / "run")
    run.learn(stream[0])
    run.finish()
    from_run = load_learner(tmp_path / "run", make_backbone())
    assert from_run.predict(inputs, task="colors") == run.predict(inputs, task="colors")


def test_a_shared_slot_stays_trainable_after_loading(make_backbone, stream, tmp_path):
    learner = learn(make_backbone, stream[:2], strategy="seq")
    learner.save(tmp_path / "saved")
    loaded = ContinualLearner.load(tmp_path / "saved", make_backbone())
    assert loaded.bank.has_trainable and loaded.bank.num_slots == 1
    saved = json.loads((tmp_path / "saved" / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    assert saved["slots"] == [
        {"file": "tasks/animals/module.safetensors", "kind": "lora", "trainable": True}
    ]


def test_loaded_without_data_predicts_but_refuses_to_learn(make_backbone, stream, tmp_path):
    learn(make_backbone, stream[:1]).save(tmp_path / "saved")
    loaded = ContinualLearner.load(tmp_path / "saved", make_backbone())
    assert len(loaded.predict(["red car"], task="colors")) == 1
    with pytest.raises(ContinualPeftError, match=r"without the data of task\(s\) \['colors'\]"):
        loaded.learn(stream[1])


def test_load_refuses_other_data(make_backbone, stream, tmp_path):
    learn(make_backbone, stream[:1]).save(tmp_path / "saved")
    other = word_task("colors", n_train=24, n_test=12, seed=1)
    with pytest.raises(ContinualPeftError, match="'colors' given has other data"):
        ContinualLearner.load(tmp_path / "saved", make_backbone(), tasks=[other])


def test_save_refuses_a_folder_holding_a_run(make_backbone, stream, tmp_path):
    learner = learn(make_backbone, stream[:1])
    learner.save(tmp_path / "saved")
    with pytest.raises(ContinualPeftError, match="already holds a run"):
        learner.save(tmp_path / "saved")
    assert not (tmp_path / "saved" / ".lock").exists()  # released after writing


def test_a_damaged_named_file_is_refused(make_backbone, stream, tmp_path):
    learn(make_backbone, stream[:1]).save(tmp_path / "saved")
    head = tmp_path / "saved" / "tasks" / "colors" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="sha256 differs"):
        ContinualLearner.load(tmp_path / "saved", make_backbone())
