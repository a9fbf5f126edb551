"""Every strategy, module kind, router and backbone family in ONE table, run through ONE tester.

A case (`CASES`) learns a small stream three times over (`Runs`), the first two under
`torch.device("meta")` as the default device, so a tensor made without an explicit device fails
loudly (the backbone itself is built on the CPU):

- `run`: straight through, into a run directory (and saved with `save` after the next-to-last
  task);
- `resumed`: that saved folder, loaded, then the last task learned;
- `retried` (on the CPU default): the second task fails on its second step (a diverged loss), is
  learned again, and the stream goes on.

The tester checks what every case must satisfy: every task learned with the slots its strategy
gives it and matrices of the stream's shape; nothing off the backbone's device; a failed task
rolled back completely (`retried` equals `run`); a loaded learner that keeps learning equals one
that learned straight (`resumed` equals `run`); a reloaded run predicts what the run predicted; a
mixed batch equals each row alone, and the oracle (and routed) matrix's last row recomputes from
`predict`; a LoRA or (IA)^3 task exports as peft adapter giving the hidden states the run
evaluated with.
Behaviour particular to one strategy, kind or router stays in its own file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DEVICE,
    LM_WORDS,
    assert_close,
    save_tiny_bert,
    tiny_backbone,
    tiny_lm,
    tiny_vit,
    word_task,
)

from continual_peft import (
    STRATEGIES,
    Backbone,
    ContinualLearner,
    ContinualPeftError,
    LearnerConfig,
    Task,
    TrainConfig,
)
from continual_peft.backbones.image import ImageBackbone
from continual_peft.backbones.tiny import save_tiny
from continual_peft.engine.loading import load_learner
from continual_peft.integrations.peft_export import export_task
from continual_peft.modules import MODULE_KINDS, kind_parts
from continual_peft.routers import ROUTERS
from continual_peft.strategies import NO_SLOT, load_strategy_spec

SPECS = Path(__file__).resolve().parents[1] / "strategies"
SHARED_SLOT = {"seq", "replay", "ewc", "joint", "l2p"}  # one slot serves every task
MERGED_SLOT = {"merge", "route_or_merge"}  # a slot per task, plus one merged from them
HEADS_ONLY = {"linear_probe"}  # no task opens a slot: each trains its head on the bare backbone
GENERATIVE = {"llama", "gpt2", "t5"}


@dataclass(frozen=True)
class Case:
    """One combination. `family` names the tiny backbone: bert (a text encoder), vit (images),
    llama and gpt2 (causal language models), t5 (sequence to sequence)."""

    strategy: str
    module: str = "lora"
    router: str = "oracle"
    family: str = "bert"
    spec: str | None = None  # the shipped strategy spec it starts from (strategies/<spec>.toml)
    task_modules: tuple[tuple[str, str], ...] = ()  # (task, kind): kinds mixed in one run
    router_options: tuple[tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        kinds = "+".join(kind for _, kind in self.task_modules)
        module = f"{self.module}+{kinds}" if kinds else self.module
        return f"{self.family}-{self.strategy}-{module}-{self.router}"


CASES = [
    # every strategy, from its shipped spec
    Case("per_task", spec="per_task_lora"),
    Case("seq", spec="seq_lora"),
    Case("replay", spec="replay_lora"),
    Case("ewc", spec="ewc_lora"),
    Case("joint", spec="joint_lora"),
    Case("olora", spec="olora_lora"),
    Case("inflora", spec="inflora_lora"),
    Case("merge", spec="merge_lora"),
    Case("route_or_merge", router="mahalanobis", spec="route_or_merge_lora"),
    Case("sdlora", spec="sdlora_lora"),
    Case("l2p", module="prompt_pool", spec="l2p"),
    Case("linear_probe", spec="linear_probe"),
    Case("linear_probe", router="mahalanobis"),
    # every module kind, alone and mixed in one run
    Case("per_task", module="adapter", spec="per_task_adapter"),
    Case("per_task", module="prefix", spec="per_task_prefix"),
    Case("per_task", module="prompt", spec="per_task_prompt"),
    Case("per_task", module="ia3", spec="per_task_ia3"),
    Case("per_task", module="bitfit", spec="per_task_bitfit"),
    Case(
        "per_task",
        spec="per_task_mixed",
        task_modules=(("animals", "adapter"), ("moods", "prompt")),
    ),
    # hybrid slots: several kinds in one task's slot, mixed per row with plain slots
    Case("per_task", module="prefix+adapter", spec="per_task_hybrid"),
    Case(  # the survey's kinds and a hybrid, one per task, mixed per row in one forward
        "per_task",
        module="ia3",
        router="mahalanobis",
        task_modules=(("animals", "bitfit"), ("moods", "lora+prompt")),
    ),
    Case("per_task", module="lora+prompt", router="mahalanobis", family="llama"),
    # every router
    Case("per_task", router="mahalanobis", spec="per_task_routed"),
    Case("per_task", router="prototype"),
    Case("per_task", router="gate", router_options=(("steps", 30),)),  # 300 by default
    Case("per_task", router="topk"),
    Case("replay", router="prototype"),
    # the other backbone families
    Case("per_task", router="mahalanobis", family="vit"),
    Case("replay", router="mahalanobis", family="llama"),
    Case("ewc", family="llama"),
    Case("olora", family="llama"),
    Case("inflora", family="llama"),
    Case("merge", family="llama"),
    Case("sdlora", family="llama"),
    Case("joint", family="llama"),
    Case("per_task", module="prompt", router="mahalanobis", family="llama"),
    Case("replay", module="prefix", router="mahalanobis", family="gpt2"),
    Case("per_task", module="bitfit", router="mahalanobis", family="gpt2"),
    Case("replay", router="mahalanobis", family="t5"),
    Case("per_task", module="adapter", router="prototype", family="t5"),
    Case("per_task", module="ia3", router="mahalanobis", family="llama"),
]


# ---------------------------------------------------------------- the families


def text_tasks() -> list[Task]:
    return [word_task(name, n_train=16, n_test=8) for name in ("colors", "animals", "moods")]


def generative_tasks() -> list[Task]:
    """A generation task, then a label-scoring one."""
    fruit = [("fruit of red", "apple"), ("fruit of blue", "plum")]
    yes = [("red", "yes"), ("blue", "no")]
    template = "Input: {text} Output:"
    return [
        Task.from_examples("fruit", fruit * 4, fruit, kind="generation", template=template),
        Task.from_examples("colors", yes * 4, yes, template=template),
    ]


def digit_tasks() -> list[Task]:
    """Three tasks of two of scikit-learn's 8x8 digits (offline), as (1, 8, 8) tensors in
    [-1, 1]: 8 training and 4 test images per digit."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(((data.images / 16.0 - 0.5) / 0.5).astype(np.float32))[:, None]
    tasks = []
    for pair in ((0, 1), (2, 3), (4, 5)):
        picked = [np.flatnonzero(data.target == digit)[:12] for digit in pair]
        train = [i for rows in picked for i in rows[:8]]
        test = [i for rows in picked for i in rows[8:]]
        labels = [str(digit) for digit in pair]
        tasks.append(
            Task(
                f"digits-{pair[0]}-{pair[1]}",
                labels,
                [images[i] for i in train],
                [labels.index(str(data.target[i])) for i in train],
                [images[i] for i in test],
                [labels.index(str(data.target[i])) for i in test],
            )
        )
    return tasks


@dataclass
class Family:
    build: Callable[[], Backbone]  # a fresh backbone, built on the CPU, named by its folder
    tasks: list[Task]
    train: TrainConfig
    meta: bool = True  # runs under torch.device("meta"): a tensor made without a device fails


def family(name: str, folder: Path, tokenizer) -> Family:
    """The family's tiny model saved to `folder` (export reads it back from there), and a builder
    of the same model in memory under that name (quicker than reading the folder each time)."""
    if name == "bert":
        save_tiny_bert(folder, tokenizer)
        train = TrainConfig(epochs=1, batch_size=8, lr=3e-2, warmup=0.0, eval_batch_size=8)
        build = _on_cpu(lambda: tiny_backbone(tokenizer, 16, name=str(folder)))
        return Family(build, text_tasks(), train)
    if name == "vit":
        tiny_vit().save_pretrained(folder)  # no preprocessor_config.json: the tensor path
        train = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, eval_batch_size=8)
        build = _on_cpu(lambda: ImageBackbone(tiny_vit(), name=str(folder), device=DEVICE))
        return Family(build, digit_tasks(), train)
    save_tiny(folder, name, LM_WORDS)
    train = TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup=0.0, eval_batch_size=4)
    build = _on_cpu(lambda: tiny_lm(name, 16, name=str(folder)))
    return Family(build, generative_tasks(), train)


def _on_cpu(build: Callable[[], Backbone]) -> Callable[[], Backbone]:
    def on_cpu() -> Backbone:
        with torch.device("cpu"):  # the backbone is built for real; everything after is not
            return build()

    return on_cpu


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer) -> Callable[[str], Family]:
    """Each family made once for the whole table."""
    made: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in made:
            made[name] = family(name, tmp_path_factory.mktemp(name), tokenizer)
        return made[name]

    return get


def case_config(case: Case, train: TrainConfig) -> LearnerConfig:
    config = load_strategy_spec(SPECS / f"{case.spec}.toml") if case.spec else LearnerConfig()
    config.strategy, config.module, config.router = case.strategy, case.module, case.router
    config.task_modules = dict(case.task_modules)
    config.router_options = dict(case.router_options)
    config.train = train
    if case.family in GENERATIVE:
        config.generation.max_new_tokens = 2
    return config


# ---------------------------------------------------------------- the three runs


@dataclass
class Runs:
    case: Case
    family: Family
    run: ContinualLearner  # straight through, finished, into `run_dir`
    run_dir: Path
    saved: Path  # `run` saved after its next-to-last task
    retried: ContinualLearner  # the second task failed once, then learned again
    rolled_back: tuple[dict, dict]  # what `retried` held before and right after the failure
    resumed: ContinualLearner  # `saved`, loaded, then the last task learned

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.family.tasks]

    def probes(self) -> tuple[list, list[str]]:
        """A few test inputs of every task, and their tasks."""
        inputs = [x for task in self.family.tasks for x in task.test_inputs[:3]]
        names = [task.name for task in self.family.tasks for _ in task.test_inputs[:3]]
        return inputs, names


def _holds(learner: ContinualLearner) -> dict:
    return {
        "learned": list(learner.learned),
        "heads": list(learner.heads.heads),
        "slots": learner.bank.num_slots,
        "records": len(learner.records),
    }


def _fail_once(learner: ContinualLearner, task: Task) -> tuple[dict, dict]:
    """Learn `task` with its loss diverging on the second step: refused, naming the retry.
    Returns what the learner held before and after."""
    before, original, calls = _holds(learner), learner.strategy.loss, [0]

    def diverge(who, current, loss):
        calls[0] += 1
        return loss * float("nan") if calls[0] == 2 else original(who, current, loss)

    learner.strategy.loss = diverge
    try:
        with pytest.raises(ContinualPeftError, match="learn the task again"):
            learner.learn(task)
    finally:
        del learner.strategy.loss
    assert calls[0] == 2, "the task failed before its second step"
    return before, _holds(learner)


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def runs(request, tmp_path_factory, families) -> Runs:
    case = request.param
    root = tmp_path_factory.mktemp(case.id)
    fam = families(case.family)
    config = case_config(case, fam.train)
    tasks = fam.tasks
    default = "meta" if fam.meta else "cpu"
    with torch.device(default):
        run = ContinualLearner(fam.build(), config=config, run_dir=root / "run")
        for number, task in enumerate(tasks, start=1):
            run.learn(task)
            if number == len(tasks) - 1:
                run.save(root / "saved")
        run.finish()
        resumed = ContinualLearner.load(root / "saved", fam.build(), tasks=tasks[:-1])
        resumed.learn(tasks[-1])

    # the code path of `run` again (a meta default device makes every torch call slower)
    retried = ContinualLearner(fam.build(), config=case_config(case, fam.train))
    retried.learn(tasks[0])
    rolled_back = _fail_once(retried, tasks[1])
    for task in tasks[1:]:
        retried.learn(task)
    return Runs(case, fam, run, root / "run", root / "saved", retried, rolled_back, resumed)


# ---------------------------------------------------------------- the shared invariants


def test_every_spec_and_registered_name_has_a_case():
    assert {f"{case.spec}.toml" for case in CASES} >= {p.name for p in SPECS.glob("*.toml")}
    assert {case.strategy for case in CASES} == set(STRATEGIES.names())
    kinds = {case.module for case in CASES} | {k for case in CASES for _, k in case.task_modules}
    assert {part for kind in kinds for part in kind_parts(kind)} == set(MODULE_KINDS.names())
    assert any(len(kind_parts(kind)) > 1 for kind in kinds)  # a hybrid slot
    assert {case.router for case in CASES} == set(ROUTERS.names())


def test_every_task_is_learned_into_its_slots(runs: Runs):
    report, names, size = runs.run.report, runs.names, len(runs.names)
    assert list(runs.run.learned) == names and report["task_names"] == names
    assert report["status"] == "finished" and len(runs.run.records) == size
    modes = {"oracle"} | ({"routed"} if runs.case.router != "oracle" else set())
    modes |= {"route_or_merge"} if runs.case.strategy == "route_or_merge" else set()
    assert set(report["accuracy_matrix"]) == modes
    for matrix in report["accuracy_matrix"].values():
        assert len(matrix) == size and all(len(row) == size for row in matrix)
        assert all(0 <= matrix[i][j] <= 1 for i in range(size) for j in range(i + 1))
    slots = [record["slot"] for record in runs.run.records]
    shared, merged = runs.case.strategy in SHARED_SLOT, runs.case.strategy in MERGED_SLOT
    heads_only = runs.case.strategy in HEADS_ONLY
    if merged:  # the merged slot opens after the first task's
        assert slots == [0, *range(2, size + 1)] and runs.run.strategy.merged == [1]
    elif heads_only:
        assert slots == [NO_SLOT] * size
    else:
        assert slots == ([0] * size if shared else list(range(size)))
    assert runs.run.bank.num_slots == (0 if heads_only else 1 if shared else size + merged)
    kinds = dict(runs.case.task_modules)
    modules = [
        None if slot == NO_SLOT else kinds.get(name, runs.case.module)
        for slot, name in zip(slots, names, strict=True)
    ]
    assert [t["module"] for t in report["tasks"]] == modules
    for folder, done in ((runs.run_dir, size), (runs.saved, size - 1)):
        saved = json.loads((folder / "checkpoint.json").read_text(encoding="utf-8"))
        assert saved["tasks_done"] == done and saved["last_task"] == names[done - 1]
        if runs.case.router != "oracle":  # each task's rows once, the shared part per run
            rows = [f"tasks/{name}/router-rows.safetensors" for name in names[:done]]
            assert saved["router"]["task_rows"] == rows and set(rows) <= set(saved["files"])
            assert saved["router"]["tensors"] == f"state/router-{done}.safetensors"


def _tensors(learner: ContinualLearner) -> dict[str, torch.Tensor]:
    """Every tensor the learner holds besides the backbone's own weights."""
    found = {f"bank/{n}": t for n, t in learner.backbone.named_buffers() if "stack" in n}
    found |= {f"bank/{n}": p for n, p in learner.backbone.named_parameters() if "stack" in n}
    found |= {f"heads/{n}": p for n, p in learner.heads.named_parameters()}
    if learner.router is not None:
        found |= {f"router/{k}": v for k, v in learner.router.state()[0].items()}
    found |= {f"strategy/{k}": v for k, v in learner.strategy.state()[0].items()}
    return found


def test_nothing_is_made_off_the_backbones_device(runs: Runs):
    stored = ("strategy/buffer.", "strategy/kept.")  # stored inputs wait on the CPU by design
    inputs, names = runs.probes()
    with torch.device("meta" if runs.family.meta else "cpu"):
        reloaded = load_learner(runs.run_dir, backbone=runs.family.build())
        assert reloaded.predict(inputs, task=names) == runs.run.predict(inputs, task=names)
        if runs.case.router != "oracle":
            assert {row["task"] for row in reloaded.predict_details(inputs)} <= {*names, None}
        if runs.case.family not in GENERATIVE:
            logits = runs.run.logits(inputs, names)
            sizes = {task.name: len(task.labels) for task in runs.family.tasks}
            assert logits.device == runs.run.backbone.device
            for row, name in zip(logits, names, strict=True):  # a row's own labels' logits
                assert torch.isfinite(row[: sizes[name]]).all()
    for learner in (runs.run, runs.resumed, reloaded):
        device = learner.backbone.device
        wrong = {
            name: str(t.device)
            for name, t in _tensors(learner).items()
            if t.device != device and not name.startswith(stored)
        }
        assert not wrong, f"tensors off the backbone's device {device}: {wrong}"
        for name, head in learner.heads.named_parameters():  # a language model's have none
            assert head.dtype == torch.float32, f"head {name} is {head.dtype}"


def _same_learning(learner: ContinualLearner, straight: ContinualLearner, runs: Runs) -> None:
    """The same matrices, records (but times) and predictions, and for classification the same
    logits to the last bit: a state that differs anywhere shows."""
    for key in ("accuracy_matrix", "initial_accuracy", "metrics"):
        assert learner.report[key] == straight.report[key], key
    strip = ("train_seconds", "eval_seconds")
    records = [
        [{k: v for k, v in r.items() if k not in strip} for r in x.records]
        for x in (learner, straight)
    ]
    assert records[0] == records[1]
    inputs, names = runs.probes()
    assert learner.predict(inputs, task=names) == straight.predict(inputs, task=names)
    if runs.case.family not in GENERATIVE:
        assert torch.equal(learner.logits(inputs, names), straight.logits(inputs, names))


def test_a_failed_task_rolls_back_completely(runs: Runs):
    """A failed task leaves the learner as before it; learning it again, then the rest, ends
    as if it had never failed."""
    before, after = runs.rolled_back
    assert after == before and before["learned"] == [runs.names[0]]
    _same_learning(runs.retried, runs.run, runs)


def test_loading_then_learning_equals_learning_straight(runs: Runs):
    _same_learning(runs.resumed, runs.run, runs)


def test_a_reloaded_run_predicts_what_the_run_predicted(runs: Runs):
    loaded = load_learner(runs.run_dir, backbone=runs.family.build())
    inputs, names = runs.probes()
    assert loaded.predict(inputs, task=names) == runs.run.predict(inputs, task=names)
    if runs.case.router != "oracle":
        assert loaded.predict_details(inputs) == runs.run.predict_details(inputs)
        assert loaded.report["routing_accuracy"] == runs.run.report["routing_accuracy"]
    assert loaded.report["metrics"] == runs.run.report["metrics"]
    assert loaded.records == runs.run.records
    if runs.case.family not in GENERATIVE:  # to the last bit: the files hold exact tensors
        assert torch.equal(loaded.logits(inputs, names), runs.run.logits(inputs, names))


def _accuracy(predicted: list, task: Task) -> float:
    truth = [task.labels[y] for y in task.test_labels]
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


def test_a_mixed_batch_equals_each_row_alone_and_predict_recomputes_the_matrix(runs: Runs):
    learner, inputs, names = runs.run, *runs.probes()
    alone = [learner.predict([x], task=name)[0] for x, name in zip(inputs, names, strict=True)]
    assert learner.predict(inputs, task=names) == alone
    if runs.case.family not in GENERATIVE:
        mixed = learner.logits(inputs, names)
        for row, (x, name) in enumerate(zip(inputs, names, strict=True)):
            assert_close(mixed[row : row + 1], learner.logits([x], [name]))
    final = learner.report["accuracy_matrix"]["oracle"][-1]
    for task, value in zip(runs.family.tasks, final, strict=True):
        assert _accuracy(learner.predict(task.test_inputs, task=task.name), task) == value
    if runs.case.router != "oracle":  # the router chooses per row
        final = learner.report["accuracy_matrix"]["routed"][-1]
        for task, value in zip(runs.family.tasks, final, strict=True):
            assert _accuracy(learner.predict(task.test_inputs), task) == value


def test_a_task_exports_as_peft_what_the_run_evaluated(runs: Runs, tmp_path):
    """The exported adapter gives each task the hidden states the run evaluated it with: its
    own slot (per_task), the shared slot as it is now (seq, replay, ewc, joint), every slot
    summed into one LoRA of rank Σr (olora); a prompt pool (l2p), and a task with no module
    (linear_probe), are refused with the reason."""
    case, tasks = runs.case, runs.family.tasks
    if case.module not in ("lora", "ia3", "prompt_pool") or case.task_modules:
        pytest.skip("peft export holds LoRA and (IA)^3 tasks")
    for task in (tasks[0].name, tasks[-1].name):
        out = tmp_path / f"{task}-peft"
        if not runs.run.strategy.routing(runs.run, task)[0]:  # its head alone trained
            with pytest.raises(ContinualPeftError, match="no module to export.*head.safetensors"):
                export_task(runs.run_dir, task, "peft", out)
            continue
        if case.strategy == "l2p":
            with pytest.raises(ContinualPeftError, match="prompt_pool.*can express only"):
                export_task(runs.run_dir, task, "peft", out)
            continue
        with torch.device("meta" if runs.family.meta else "cpu"):
            export_task(runs.run_dir, task, "peft", out)
        provenance = json.loads((out / "continual_peft.json").read_text(encoding="utf-8"))
        assert provenance["slots"] == runs.run.strategy.routing(runs.run, task)[0]
        if case.family == "bert":  # the other families': test_export_generative.py, test_ia3.py
            _peft_gives_what_was_evaluated(runs.run, task, out)


def _peft_gives_what_was_evaluated(learner: ContinualLearner, task: str, out: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    backbone = learner.backbone
    batch = backbone.collate(backbone.encode(["a red apple", "the dog sleeps at home"]).items)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), out).eval()
    with torch.no_grad(), learner.use_task(task):
        evaluated = backbone(**batch)
    with torch.no_grad():
        assert_close(model(**batch.copy()).last_hidden_state, evaluated)
        with learner.bank.base_only():
            bare = backbone(**batch)
    assert not torch.allclose(evaluated, bare, atol=1e-4)  # the task's module is no no-op
