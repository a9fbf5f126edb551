"""`ContinualLearner.save` / `load`: what a saved learner keeps, and what loading refuses.

That every case (strategy, kind, router, family) loads to identical predictions and keeps
learning exactly as the learner it was saved from is in test_cases.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_tokenizer, tiny_backbone, word_task

from continual_peft import ContinualLearner, ContinualPeftError, LearnerConfig, TrainConfig
from continual_peft.errors import CorruptFileError
from continual_peft.store.checkpoint import CHECKPOINT_FILE

TRAIN = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup=0.0)
NAMES = ["colors", "animals", "moods"]


@pytest.fixture(scope="module")
def stream() -> list:
    return [word_task(name, n_train=24, n_test=12) for name in NAMES]


def learn(make_backbone, tasks, strategy: str = "per_task") -> ContinualLearner:
    config = LearnerConfig(strategy=strategy, train=TRAIN)
    learner = ContinualLearner(make_backbone(), config=config)
    for task in tasks:
        learner.learn(task)
    return learner


@pytest.fixture(scope="module")
def saved(tmp_path_factory, stream) -> Path:
    """One task learned (per_task) and saved: tests that damage it work on a copy."""
    folder = tmp_path_factory.mktemp("saved") / "saved"
    learn(lambda: tiny_backbone(load_tokenizer()), stream[:1]).save(folder)
    return folder


def test_a_shared_slot_stays_trainable_after_loading(make_backbone, stream, tmp_path):
    learner = learn(make_backbone, stream[:2], strategy="seq")
    learner.save(tmp_path / "saved")
    loaded = ContinualLearner.load(tmp_path / "saved", make_backbone())
    assert loaded.bank.has_trainable and loaded.bank.num_slots == 1
    saved = json.loads((tmp_path / "saved" / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    assert saved["slots"] == [
        {"file": "tasks/animals/module.safetensors", "kind": "lora", "trainable": True}
    ]


def test_loaded_without_data_predicts_but_refuses_to_learn(make_backbone, stream, saved):
    loaded = ContinualLearner.load(saved, make_backbone())
    assert len(loaded.predict(["red car"], task="colors")) == 1
    with pytest.raises(ContinualPeftError, match=r"without the data of task\(s\) \['colors'\]"):
        loaded.learn(stream[1])


def test_load_refuses_other_data(make_backbone, saved):
    other = word_task("colors", n_train=24, n_test=12, seed=1)
    with pytest.raises(ContinualPeftError, match="'colors' given has other data"):
        ContinualLearner.load(saved, make_backbone(), tasks=[other])


def test_save_refuses_a_folder_holding_a_run(make_backbone, stream, tmp_path):
    learner = learn(make_backbone, stream[:1])
    learner.save(tmp_path / "saved")
    with pytest.raises(ContinualPeftError, match="already holds a run"):
        learner.save(tmp_path / "saved")
    assert not (tmp_path / "saved" / ".lock").exists()  # released after writing


def test_a_damaged_named_file_is_refused(make_backbone, saved, tmp_path):
    shutil.copytree(saved, tmp_path / "saved")
    head = tmp_path / "saved" / "tasks" / "colors" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="sha256 differs"):
        ContinualLearner.load(tmp_path / "saved", make_backbone())
