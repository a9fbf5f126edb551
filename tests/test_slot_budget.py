"""A slot budget (`max_slots`, `engine.budget`): the bank never outgrows it, the most similar
pair of slots is merged as a plain recomputation says, merged tasks route to the kept slot, a
failed task undoes its consolidation, and without a budget nothing changes."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import load_tokenizer, tiny_backbone
from typer.testing import CliRunner

from continual_peft import STRATEGIES, ContinualLearner, ContinualPeftError, Task
from continual_peft.cli import app
from continual_peft.config import LearnerConfig, TrainConfig
from continual_peft.engine import learner as learner_module
from continual_peft.engine.budget import (
    merge_slots,
    merged_slots_from,
    most_similar_pair,
    task_vector_dot,
)
from continual_peft.experiments.entries import entry_from
from continual_peft.integrations.export_source import read_task
from continual_peft.integrations.peft_export import _merged_words
from continual_peft.reports.run import consolidation_line, render_markdown
from continual_peft.store.checkpoint import read_checkpoint
from continual_peft.store.digests import config_sha256
from continual_peft.store.rundir import RunDir
from continual_peft.strategies import check_config, load_strategy_spec

TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
VOCAB = ["red", "blue", "green", "cat", "dog", "fish", "happy", "sad", "angry"]
VOCAB += ["apple", "car", "house", "bird", "cup", "shoe", "runs", "sleeps", "eats"]
LABELS = [
    ["red", "blue"],
    ["cat", "dog"],
    ["red", "green"],
    ["happy", "sad"],
    ["fish", "cat"],
    ["blue", "green"],
]


def keyword_task(name: str, labels: list[str]) -> Task:
    """A small task whose label is the keyword its sentence holds (the rest is filler)."""
    rng = random.Random(name)
    fillers = [word for word in VOCAB if word not in labels]

    def sample(n: int) -> list[tuple[str, str]]:
        rows = []
        for i in range(n):
            words = [labels[i % len(labels)], *rng.sample(fillers, 3)]
            rng.shuffle(words)
            rows.append((" ".join(words), labels[i % len(labels)]))
        return rows

    return Task.from_examples(name, train=sample(24), test=sample(12), labels=labels)


TASKS = [keyword_task(f"t{i}", labels) for i, labels in enumerate(LABELS)]


def budget_config(max_slots: int = 0, **changes) -> LearnerConfig:
    return dataclasses.replace(LearnerConfig.of(train=TRAIN), max_slots=max_slots, **changes)


def states(learner: ContinualLearner) -> dict[int, dict[str, torch.Tensor]]:
    bank = learner.bank
    return {s: {k: v.clone() for k, v in bank.slot_state(s).items()} for s in range(bank.num_slots)}


def lora_delta(state: dict[str, torch.Tensor], site: str) -> torch.Tensor:
    a, b = state[f"{site}.lora_A"].double(), state[f"{site}.lora_B"].double()
    return float(state[f"{site}.scale"]) * b @ a  # (d_out, d_in)


def sites(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".lora_A") for k in state if k.endswith(".lora_A"))


@dataclass
class Budgeted:
    learner: ContinualLearner  # per_task LoRA over TASKS with max_slots = 3
    slots: list[int]  # the bank's slot count after each task
    before: list[dict[int, dict[str, torch.Tensor]]]  # every slot's values before each task
    task_slots: list[dict[str, int]]  # every task's slot before each task
    own: dict[str, dict[str, torch.Tensor]]  # each task's slot right after it was learned


@pytest.fixture(scope="module")
def budgeted() -> Budgeted:
    learner = ContinualLearner(tiny_backbone(load_tokenizer()), config=budget_config(3))
    run = Budgeted(learner, [], [], [], {})
    for task in TASKS:
        run.before.append(states(learner))
        run.task_slots.append({name: s.slot for name, s in learner.learned.items()})
        record = learner.learn(task)
        run.slots.append(learner.bank.num_slots)
        run.own[task.name] = states(learner)[record["slot"]]
    return run


@pytest.fixture(scope="module")
def unbudgeted() -> ContinualLearner:
    learner = ContinualLearner(tiny_backbone(load_tokenizer()), config=budget_config())
    for task in TASKS[:4]:
        learner.learn(task)
    return learner


# ---------------------------------------------------------------- the policy, end to end


def test_the_bank_never_holds_more_slots_than_the_budget(budgeted):
    assert budgeted.slots == [1, 2, 3, 3, 3, 3]
    records = budgeted.learner.records
    assert [("consolidation" in r) for r in records] == [False] * 3 + [True] * 3
    assert {s.slot for s in budgeted.learner.learned.values()} == {0, 1, 2}


def test_each_consolidation_merges_the_most_similar_pair_as_recomputed(budgeted):
    learner = budgeted.learner
    for index in range(3, len(TASKS)):
        facts = learner.records[index]["consolidation"]
        kept, freed = facts["slots"]
        before, task_slots = budgeted.before[index], budgeted.task_slots[index]
        pair = most_similar_pair(["lora"] * len(before), before)
        assert (kept, freed) == pair[:2] and kept < freed
        assert facts["similarity"] == round(pair[2], 6)
        # the record names every task now on the kept slot: the kept slot's and the freed one's
        served = [n for n, s in task_slots.items() if s == kept]
        moved = [n for n, s in task_slots.items() if s == freed]
        assert facts["tasks"] == served + moved
        # the kept slot = the rank-r SVD of the task-count-weighted mean of the two ΔW
        after = budgeted.before[index + 1] if index + 1 < len(TASKS) else states(learner)
        weights = torch.tensor([len(served), len(moved)], dtype=torch.float64)
        weights = weights / weights.sum()
        rank = before[kept][f"{sites(before[kept])[0]}.lora_A"].shape[0]
        energies = []
        for site in sites(before[kept]):
            mean = weights[0] * lora_delta(before[kept], site)
            mean = mean + weights[1] * lora_delta(before[freed], site)
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            torch.testing.assert_close(lora_delta(after[kept], site), best, atol=1e-5, rtol=1e-4)
            energies.append(float(s[:rank].pow(2).sum() / s.pow(2).sum()))
        assert facts["kept_energy"] == pytest.approx(sum(energies) / len(energies), abs=1e-5)


def test_the_new_task_reopens_the_freed_slot_as_a_fresh_slot(budgeted, unbudgeted):
    """t3 trains in the freed slot exactly as it trains in a slot of its own without a budget:
    the same initial values (add_slot's, from the task's seed), the same trained values."""
    freed = budgeted.learner.records[3]["consolidation"]["slots"][1]
    assert budgeted.learner.records[3]["slot"] == freed
    expected = unbudgeted.bank.slot_state(3)
    got = budgeted.own["t3"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert (
        budgeted.learner.records[3]["final_train_loss"] == unbudgeted.records[3]["final_train_loss"]
    )


def test_a_budget_changes_nothing_until_it_is_reached(budgeted, unbudgeted):
    ours = budgeted.learner.report["accuracy_matrix"]["oracle"]
    theirs = unbudgeted.report["accuracy_matrix"]["oracle"]
    assert [row[:3] for row in ours[:3]] == [row[:3] for row in theirs[:3]]
    for key in ("final_train_loss", "slot", "train_steps"):
        assert [r[key] for r in budgeted.learner.records[:3]] == [
            r[key] for r in unbudgeted.records[:3]
        ]
    assert "consolidation" not in str(unbudgeted.records)
    assert unbudgeted.merged_slots == {}


def test_merged_tasks_route_to_the_kept_slot(budgeted):
    learner = budgeted.learner
    texts = ["red apple car", "dog sleeps", "sad at home", "blue cup", "fish hides"]
    for name, state in learner.learned.items():
        assert learner.strategy.routing(learner, name) == ([state.slot], [1.0])
        tasks = [name] * len(texts)
        rows = learner.heads.prompt_rows(texts, tasks)
        with torch.no_grad(), learner.bank.use_slot(state.slot):
            expected = learner.heads.row_logits(rows, tasks).float()
        torch.testing.assert_close(learner.logits(texts, tasks), expected)
    last = learner.records[-1]["consolidation"]
    assert all(learner.learned[n].slot == last["slots"][0] for n in last["tasks"])


def test_the_learner_names_the_slots_a_consolidation_rewrote(budgeted):
    learner = budgeted.learner
    # t3 merged slots 1 and 2 (say) into 1; a later merge may free a merged slot again
    expected: dict[int, str] = {}
    for record in learner.records[3:]:
        kept, freed = record["consolidation"]["slots"]
        expected = {s: n for s, n in expected.items() if s != freed} | {kept: record["name"]}
    assert learner.merged_slots == expected == merged_slots_from(learner.records)
    assert expected


def _same_learner(loaded: ContinualLearner, learner: ContinualLearner) -> None:
    saved, now = states(loaded), states(learner)
    assert saved.keys() == now.keys()
    for slot, values in now.items():
        assert all(torch.equal(values[k], saved[slot][k]) for k in values), slot
    assert {n: s.slot for n, s in loaded.learned.items()} == {
        n: s.slot for n, s in learner.learned.items()
    }
    assert loaded.merged_slots == learner.merged_slots
    texts = ["red apple car", "dog sleeps", "sad at home"]
    for name in learner.learned:
        torch.testing.assert_close(
            loaded.logits(texts, [name] * 3), learner.logits(texts, [name] * 3)
        )


def test_a_saved_budgeted_learner_loads_back_the_same(budgeted, tmp_path):
    """`save` writes every slot as it is now, merged ones included."""
    learner = budgeted.learner
    loaded = ContinualLearner.load(
        learner.save(tmp_path / "saved"), tiny_backbone(load_tokenizer())
    )
    assert loaded.config.max_slots == 3
    _same_learner(loaded, learner)


def test_a_budgeted_run_directory_reads_back_its_merged_slots(tmp_path):
    """A merged slot is written as a new file into the folder of the task it made room for;
    the run reads back as it was, and keeps learning as an uninterrupted run does."""
    run = tmp_path / "run"
    learner = ContinualLearner(
        tiny_backbone(load_tokenizer()), config=budget_config(2), run_dir=run
    )
    for task in TASKS[:4]:
        learner.learn(task)
    learner.close()
    learner.run_dir = None  # it goes on in memory only, beside the resumed copy
    saved = read_checkpoint(run)
    merged = {entry.file for entry in saved.slots if "merged-slot" in entry.file}
    holders = learner.merged_slots.items()
    assert merged and merged == {f"tasks/{t}/merged-slot{k}.safetensors" for k, t in holders}
    _same_learner(ContinualLearner.load(run, tiny_backbone(load_tokenizer())), learner)
    resumed = ContinualLearner.load(run, tiny_backbone(load_tokenizer()), tasks=TASKS[:4])
    resumed.resume_into(RunDir(run, resume=True), saved.stream_plan or {})
    resumed.learn(TASKS[4])
    learner.learn(TASKS[4])
    _same_learner(resumed, learner)
    resumed.close()
    # what merged is stated: report.md, the console report, and an export of a merged slot
    learner.finish()  # in memory: its report only
    markdown = render_markdown(learner.report)
    assert "## Slot budget: at most 2 slots" in markdown and "merged into slot" in markdown
    merged_task = next(r for r in learner.records if r.get("consolidation"))
    assert consolidation_line(merged_task).startswith(f"slot budget: before {merged_task['name']}")
    shared = merged_task["consolidation"]["tasks"][0]
    merged = read_task(run, shared).record["merged"]  # what the export writes and says
    slot = learner.learned[shared].slot
    together = {name for name, state in learner.learned.items() if state.slot == slot}
    assert set(merged["with_tasks"]) == together - {shared} and merged["slots"][0] == slot
    assert "This LoRA is shared" in _merged_words(merged)


# ---------------------------------------------------------------- the math, alone


def _lora_state(generator: torch.Generator, scale: float, d_out=6, d_in=5, r=2) -> dict:
    state = {}
    for site in ("q", "v"):
        state[f"{site}.lora_A"] = torch.randn(r, d_in, generator=generator)
        state[f"{site}.lora_B"] = torch.randn(d_out, r, generator=generator)
        state[f"{site}.scale"] = torch.tensor(scale)
    return state


def test_a_lora_merge_is_the_weighted_mean_delta_at_rank_r():
    generator = torch.Generator().manual_seed(0)
    first, second = _lora_state(generator, 2.0), _lora_state(generator, 0.5)
    merged, kept = merge_slots([first, second], [3.0, 1.0], torch.device("cpu"))
    energies = []
    for site in ("q", "v"):
        mean = 0.75 * lora_delta(first, site) + 0.25 * lora_delta(second, site)
        u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(lora_delta(merged, site), best, atol=1e-5, rtol=1e-5)
        assert merged[f"{site}.lora_A"].shape == first[f"{site}.lora_A"].shape
        assert float(merged[f"{site}.scale"]) == 1.0
        energies.append(float(s[:2].pow(2).sum() / s.pow(2).sum()))
    assert kept == pytest.approx(sum(energies) / 2, abs=1e-6)


def test_other_kinds_merge_as_the_weighted_mean_of_their_tensors():
    generator = torch.Generator().manual_seed(1)
    first = {"s.adapter_down": torch.randn(2, 4, generator=generator), "s.scale": torch.tensor(1.0)}
    second = {
        "s.adapter_down": torch.randn(2, 4, generator=generator),
        "s.scale": torch.tensor(1.0),
    }
    merged, kept = merge_slots([first, second], [1.0, 2.0], torch.device("cpu"))
    expected = (first["s.adapter_down"] + 2 * second["s.adapter_down"]) / 3
    torch.testing.assert_close(merged["s.adapter_down"], expected)
    assert float(merged["s.scale"]) == 1.0 and kept is None


def test_the_lora_inner_product_equals_the_flattened_deltas():
    generator = torch.Generator().manual_seed(2)
    first, second = _lora_state(generator, 2.0), _lora_state(generator, 0.5)
    flat = [
        torch.cat([lora_delta(s, site).flatten() for site in ("q", "v")]) for s in (first, second)
    ]
    assert task_vector_dot(first, second) == pytest.approx(float(flat[0] @ flat[1]), rel=1e-9)


def test_the_most_similar_pair_of_one_kind_is_chosen():
    generator = torch.Generator().manual_seed(3)
    x = _lora_state(generator, 1.0)
    near = {k: 2 * v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in x.items()}
    opposite = {k: -v if k.endswith("lora_B") else v for k, v in x.items()}
    other = _lora_state(generator, 1.0)
    candidates = {0: other, 1: x, 2: opposite, 3: near}
    kept, freed, cos = most_similar_pair(["lora"] * 4, candidates)
    assert (kept, freed) == (1, 3) and cos > 0.99
    # a pair of another kind, or of other shapes, is never merged, however similar
    assert most_similar_pair(["lora", "adapter", "lora", "prompt"], candidates)[:2] == (0, 2)
    small = _lora_state(generator, 1.0, d_in=3)
    assert most_similar_pair(["lora", "lora"], {0: x, 1: small}) is None


# ---------------------------------------------------------------- undo and refusals


def test_a_failed_task_undoes_its_consolidation(monkeypatch):
    learner = ContinualLearner(tiny_backbone(load_tokenizer()), config=budget_config(2))
    for task in TASKS[:3]:
        learner.learn(task)  # the third merged the first two slots
    before_states, before_slots = states(learner), {n: s.slot for n, s in learner.learned.items()}
    layout = (list(learner.bank.slot_kinds), list(learner.bank.slot_scale))
    merged_before, records = dict(learner.merged_slots), len(learner.records)

    def fail(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(learner_module, "train_task", fail)
    with pytest.raises(RuntimeError, match="training failed"):
        learner.learn(TASKS[3])
    after = states(learner)
    assert after.keys() == before_states.keys()
    for slot, values in before_states.items():
        assert all(torch.equal(values[k], after[slot][k]) for k in values), slot
    assert {n: s.slot for n, s in learner.learned.items()} == before_slots
    assert (list(learner.bank.slot_kinds), list(learner.bank.slot_scale)) == layout
    assert learner.merged_slots == merged_before and len(learner.records) == records
    assert not learner.bank.has_trainable and learner.bank.released == []
    monkeypatch.undo()
    record = learner.learn(TASKS[3])  # learned again: it consolidates as the first try did
    assert record["consolidation"]["slots"][1] == record["slot"] and learner.bank.num_slots == 2


def test_a_full_bank_of_different_kinds_is_refused(monkeypatch):
    config = budget_config(2, task_modules={"t1": "adapter"})
    learner = ContinualLearner(tiny_backbone(load_tokenizer()), config=config)
    for task in TASKS[:2]:
        learner.learn(task)
    with pytest.raises(ContinualPeftError, match=r"max_slots = 2\) and no two of its slots share"):
        learner.learn(TASKS[2])
    assert learner.bank.num_slots == 2 and list(learner.learned) == ["t0", "t1"]


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if n != "per_task"])
def test_a_strategy_that_cannot_take_a_budget_is_refused_by_name(name):
    config = dataclasses.replace(entry_from(name).config, max_slots=4)
    with pytest.raises(
        ContinualPeftError, match=f"max_slots = 4 does not apply to strategy {name!r}"
    ):
        check_config(config)


# ---------------------------------------------------------------- configuration


def test_without_a_budget_the_config_and_its_hash_do_not_change():
    default = LearnerConfig()
    assert "max_slots" not in default.to_dict()
    assert config_sha256(LearnerConfig(max_slots=0).to_dict()) == config_sha256(default.to_dict())
    budget = LearnerConfig(max_slots=5)
    assert budget.to_dict()["max_slots"] == 5
    assert LearnerConfig.from_dict(budget.to_dict()) == budget
    assert LearnerConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize("value", [1, -1, True, 2.5])
def test_a_bad_budget_is_refused_naming_the_key(value):
    with pytest.raises(ContinualPeftError, match=rf"max_slots = {value!r} is invalid; .*from 2 to"):
        LearnerConfig(max_slots=value).validate()


def test_a_spec_file_sets_the_budget(tmp_path: Path):
    spec = tmp_path / "budget.toml"
    spec.write_text('strategy = "per_task"\nmax_slots = 50\n', encoding="utf-8")
    assert load_strategy_spec(spec).max_slots == 50
    spec.write_text('strategy = "per_task"\nmax_slots = "50"\n', encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="key 'max_slots' must be int"):
        load_strategy_spec(spec)
    spec.write_text('strategy = "seq"\nmax_slots = 50\n', encoding="utf-8")
    with pytest.raises(ContinualPeftError, match="does not apply to strategy 'seq'"):
        load_strategy_spec(spec)


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-slots", "1"], "max_slots = 1 is invalid"),
        (["--max-slots", "3", "--strategy", "olora"], "does not apply to strategy 'olora'"),
    ],
)
def test_the_command_line_refuses_a_bad_budget(args, message, monkeypatch):
    monkeypatch.setattr("continual_peft.backbones.text.Backbone.from_pretrained", pytest.fail)
    result = invoke("run", *args, "--baseline", "none")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())


def test_compare_takes_a_budget_for_every_entry(monkeypatch):
    monkeypatch.setattr("continual_peft.backbones.text.Backbone.from_pretrained", pytest.fail)
    result = invoke("compare", "--strategies", "per_task,seq", "--max-slots", "3")
    assert result.exit_code == 2, result.output
    assert "does not apply to strategy 'seq'" in " ".join(result.stderr.split())


def test_a_run_resumes_only_with_its_own_budget(finished_run, run_copy):
    result = invoke("run", finished_run.spec, "--resume", run_copy, "--max-slots", "3")
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "max_slots: 0 in the run, 3 here" in text and "started with another" in text


def test_a_budget_beyond_a_million_slots_is_refused():
    with pytest.raises(ContinualPeftError, match="max_slots = 10+ is invalid.*1,000,000"):
        check_config(budget_config(10**20))
