"""The published CL_Benchmark folder as it is: JSON-array splits read by folder, the shipped
specs' orders, and the protocol's hygiene (a dev split that is never the test set, records with
no gold label left out and counted, named budgets, missing folders named before training).

The tests build their own small folder in the published layout (`<category>/<task>/{train,dev,
test,labels}.json`, records `{"sentence", "label"}`, dev.json a copy of test.json, MNLI's test
holding records labelled "-"), so they need none of the real data.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from collections import Counter
from pathlib import Path

import pytest

from continual_peft import ContinualPeftError
from continual_peft.tasks.sources import read_json_array, read_rows
from continual_peft.tasks.streams import load_stream
from continual_peft.tasks.task import build_task

REPO = Path(__file__).resolve().parents[1]
CL_LONG = REPO / "streams" / "cl_long.toml"
CL_STANDARD = REPO / "streams" / "cl_standard.toml"
# The published orders, as the shared data's README lists them (Progressive Prompts / O-LoRA).
PUBLISHED = {
    "order1": "dbpedia amazon yahoo agnews",
    "order2": "dbpedia amazon agnews yahoo",
    "order3": "yahoo amazon agnews dbpedia",
    "order4": "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo",
    "order5": "multirc boolq wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo",
    "order6": "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic",
}
NO_GOLD = 3  # records labelled "-" in the fake MNLI test split


def write_cl_folder(root: Path, spec: Path, n_train: int = 30, n_test: int = 12) -> Path:
    """Every task of `spec` in the published layout under `root`: 3 labels each, balanced
    train/test, dev.json byte-identical to test.json; MNLI's test gets NO_GOLD "-" records."""
    raw = tomllib.loads(spec.read_text(encoding="utf-8"))
    for entry in raw["tasks"]:
        folder = root / entry["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        labels = [f"{entry['name']}-{c}" for c in "abc"]
        splits = {}
        tests = max(n_test, 20 * NO_GOLD) if entry["name"] == "mnli" else n_test  # "-": 5 % at most
        for split, n in (("train", n_train), ("test", tests)):
            splits[split] = [
                {"sentence": f"{entry['name']} {split} {i} {labels[i % 3]}", "label": labels[i % 3]}
                for i in range(n)
            ]
        if entry["name"] == "mnli":
            splits["test"] += [
                {"sentence": f"unlabelled {i}", "label": "-"} for i in range(NO_GOLD)
            ]
        for split, records in splits.items():
            (folder / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
        (folder / "dev.json").write_bytes((folder / "test.json").read_bytes())
        (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return root


@pytest.fixture
def tiny_cli(monkeypatch, make_backbone):
    """`continual-peft run` trains on the tiny backbone instead of loading one by name."""
    import functools

    from continual_peft.experiments import launch
    from continual_peft.experiments.runner import run_stream

    monkeypatch.setattr(
        launch, "run_stream", functools.partial(run_stream, make_backbone=make_backbone)
    )


@pytest.fixture(scope="module")
def cl_root(tmp_path_factory) -> Path:
    return write_cl_folder(tmp_path_factory.mktemp("CL_Benchmark"), CL_LONG)


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = load_stream(*args, **kwargs)
    return stream, [str(w.message) for w in caught]


# ---------------------------------------------------------------- the JSON-array source


def test_json_array_reads_records_with_a_column_mapping(tmp_path: Path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"sentence": "a b", "label": "x"}, {"sentence": "c", "label": 2}]))
    rows = read_rows(path, text_column="sentence")
    assert [(r.input, r.label, r.where) for r in rows] == [
        ("a b", "x", f"{path}[0]"),
        ("c", "2", f"{path}[1]"),
    ]


def test_a_json_file_of_lines_is_still_jsonl(tmp_path: Path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert [r.input for r in read_rows(path)] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"sentence": "a", "label": "x"},', r"train.json:1: malformed JSON"),
        ('[{"text": "a", "label": "x"}]', r'train.json\[0\]: expected \{"sentence".*keys: '),
        ('[{"sentence": "a", "label": 1.5}]', r"train.json\[0\]: label 1.5 is a floating"),
        ('[["a", "x"]]', r"train.json\[0\]: expected"),
    ],
)
def test_bad_json_arrays_name_the_record(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ContinualPeftError, match=expected):
        read_rows(path, text_column="sentence")


def test_a_json_object_is_not_an_array(tmp_path: Path):
    path = tmp_path / "train.json"
    path.write_text('{"sentence": "a", "label": "x"}')
    with pytest.raises(ContinualPeftError, match="holds a JSON dict, not an array"):
        read_json_array(path)


# ---------------------------------------------------------------- the shipped specs


@pytest.mark.parametrize(
    ("spec", "orders"),
    [(CL_STANDARD, ["order1", "order2", "order3"]), (CL_LONG, ["order4", "order5", "order6"])],
    ids=["cl_standard", "cl_long"],
)
def test_shipped_specs_hold_the_published_orders(spec: Path, orders: list[str], tmp_path: Path):
    root = write_cl_folder(tmp_path, spec, n_train=6, n_test=3)
    stream, _ = quiet_load(spec, data_root=root)
    assert {name: stream.orders[name] for name in orders} == {
        name: PUBLISHED[name].split() for name in orders
    }
    assert stream.epochs == tomllib.loads(spec.read_text())["epochs"]
    for task in stream.tasks:  # read from <folder>/{train,test,labels}.json, sentence -> text
        assert task.sources["train"].endswith("train.json")
        assert task.labels == [f"{task.name}-{c}" for c in "abc"]
        assert all(text.startswith(task.name) for text in task.train_inputs)
        assert task.template and "{text}" in task.template


def test_the_whole_long_stream_loads_with_its_hazards_reported(cl_root: Path):
    stream, messages = quiet_load(CL_LONG, data_root=cl_root)
    assert len(stream.tasks) == 15
    mnli = next(t for t in stream.tasks if t.name == "mnli")
    assert mnli.skipped == {"test": {"-": NO_GOLD}}  # skipped, counted, not refused
    assert len(mnli.test_inputs) == 20 * NO_GOLD
    skipped = [m for m in messages if "left out records" in m]
    assert len(skipped) == 1 and f"test: {NO_GOLD} ('-' x{NO_GOLD})" in skipped[0]
    # every dev.json is the test set: never used as dev, and said once for all tasks
    refused = [m for m in messages if "hold a copy of their test split" in m]
    assert len(refused) == 1 and "'mnli'" in refused[0] and "'wic'" in refused[0]
    assert all(not t.dev_inputs and t.dev_refused for t in stream.tasks)


def test_strict_labels_restore_the_refusal(cl_root: Path):
    with pytest.raises(ContinualPeftError, match=r"MNLI/test.json\[60\]: label '-' is not one of"):
        quiet_load(CL_LONG, data_root=cl_root, unknown_labels="refuse")


# ---------------------------------------------------------------- the dev split


def test_dev_is_carved_from_train_stratified_seeded_and_disjoint(cl_root: Path):
    stream, messages = quiet_load(CL_LONG, data_root=cl_root, dev_share=0.2)
    for task in stream.tasks:
        assert len(task.dev_inputs) == 6 and len(task.train_inputs) == 24  # 0.2 x 10 per label
        assert Counter(task.dev_labels) == {0: 2, 1: 2, 2: 2}
        assert not set(task.dev_inputs) & set(task.train_inputs)
        assert not set(task.dev_inputs) & set(task.test_inputs)
        assert "carved from" in task.sources["dev"] and "0.2" in task.sources["dev"]
    again, _ = quiet_load(CL_LONG, data_root=cl_root, dev_share=0.2)
    assert [t.dev_inputs for t in again.tasks] == [t.dev_inputs for t in stream.tasks]
    assert any("carved from each one's training data is used instead" in m for m in messages)


def test_a_given_dev_file_that_is_not_the_test_set_is_used(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    dev = root / "TC" / "agnews" / "dev.json"
    dev.write_text(json.dumps([{"sentence": "a dev record", "label": "agnews-b"}]))
    stream, _ = quiet_load(CL_STANDARD, data_root=root, dev_share=0.5)
    agnews = next(t for t in stream.tasks if t.name == "agnews")
    assert agnews.dev_inputs == ["a dev record"] and agnews.sources["dev"] == str(dev)
    assert len(agnews.train_inputs) == 6  # nothing carved from it


def test_a_dev_split_is_capped_like_the_test_split(cl_root: Path):
    stream, _ = quiet_load(CL_LONG, data_root=cl_root, dev_share=0.5, max_test=4)
    assert all(len(t.dev_inputs) == 4 and len(t.test_inputs) == 4 for t in stream.tasks)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5, True])
def test_a_dev_share_outside_0_1_is_refused(cl_root: Path, share):
    with pytest.raises(ContinualPeftError, match=r"dev_share = .* strictly between 0 and 1"):
        load_stream(CL_LONG, data_root=cl_root, dev_share=share)


def test_a_share_that_leaves_no_dev_example_is_refused():
    rows = {"train": [], "test": []}
    from continual_peft.tasks.sources import Row

    rows["train"] = [Row(f"t{i}", "ab"[i % 2], f"train[{i}]") for i in range(4)]
    rows["test"] = [Row("e", "a", "test[0]")]
    with pytest.raises(ContinualPeftError, match="leaves no dev example"):
        build_task("tiny", rows, dev_share=0.1)


# ---------------------------------------------------------------- bad input, budgets, exclude


def test_missing_task_folders_are_all_named_before_anything_loads(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    for name in ("yahoo", "agnews"):
        for file in (root / "TC" / name).iterdir():
            file.unlink()
        (root / "TC" / name).rmdir()
    with pytest.raises(ContinualPeftError) as err:
        load_stream(CL_STANDARD, data_root=root)
    message = str(err.value)
    assert "yahoo (" in message and "agnews (" in message and str(root / "TC" / "yahoo") in message
    assert "--data-root" in message and "--exclude" in message


def test_exclude_drops_a_task_from_every_order(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    for file in (root / "TC" / "yahoo").iterdir():
        file.unlink()
    stream, _ = quiet_load(CL_STANDARD, data_root=root, exclude=["yahoo"])
    assert stream.orders["order3"] == ["amazon", "agnews", "dbpedia"]
    assert stream.excluded == ["yahoo"] and "yahoo" not in [t.name for t in stream.tasks]
    with pytest.raises(ContinualPeftError, match=r"cannot exclude \['yahooo'\]"):
        load_stream(CL_STANDARD, data_root=root, exclude=["yahooo"])


def test_a_named_budget_sets_counts_and_epochs(cl_root: Path):
    budget = tomllib.loads(CL_LONG.read_text())["budgets"]["cpu"]
    stream, _ = quiet_load(CL_LONG, data_root=cl_root, budget="cpu", max_test=5)
    assert stream.epochs == budget["epochs"] and stream.budget == "cpu"
    assert all(len(t.train_inputs) == min(30, budget["max_train"]) for t in stream.tasks)
    assert all(len(t.test_inputs) == 5 for t in stream.tasks)  # the argument beats the budget
    with pytest.raises(
        ContinualPeftError, match=r"no budget named 'gpu'; its \[budgets\]: \['cpu'\]"
    ):
        load_stream(CL_LONG, data_root=cl_root, budget="gpu")


def test_an_order_naming_an_unknown_task_is_refused(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    spec = tmp_path / "s.toml"
    spec.write_text(
        CL_STANDARD.read_text().replace('order3 = ["yahoo"', 'order3 = ["yahooo"'),
        encoding="utf-8",
    )
    with pytest.raises(ContinualPeftError, match=r"orders.order3: unknown task\(s\) \['yahooo'\]"):
        load_stream(spec, data_root=root)


def test_a_task_without_labels_json_takes_its_training_labels(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    (root / "TC" / "agnews" / "labels.json").unlink()
    stream, _ = quiet_load(CL_STANDARD, data_root=root)
    agnews = next(t for t in stream.tasks if t.name == "agnews")
    assert agnews.labels == ["agnews-a", "agnews-b", "agnews-c"]


# ---------------------------------------------------------------- through the command line


def test_a_run_records_the_protocol_it_followed(cl_root: Path, tmp_path: Path, tiny_cli):
    from typer.testing import CliRunner

    from continual_peft import cli as cli_module
    from continual_peft.reports.run import load_report

    out = tmp_path / "run"
    args = ["run", CL_LONG, "--data-root", cl_root, "--order", "mnli,cb", "--budget", "cpu"]
    args += ["--max-test", "6", "--dev-share", "0.2", "--baseline", "none", "--out", out]
    with pytest.warns(UserWarning) as caught:
        result = CliRunner().invoke(cli_module.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert any("left out records" in m for m in said)
    assert any("hold a copy of their test split" in m for m in said)
    report = load_report(out)
    budget = tomllib.loads(CL_LONG.read_text())["budgets"]["cpu"]
    assert report["config"]["train"]["epochs"] == budget["epochs"]  # the spec's, not the default
    mnli, cb = report["tasks"]
    assert mnli["skipped_records"] == {"test": {"-": NO_GOLD}} and "skipped_records" not in cb
    assert mnli["dev_examples"] == 6 and mnli["train_examples"] == 24
    assert mnli["sources"]["test"].endswith("MNLI/test.json")
    assert report["dev"]["tasks"] == ["mnli", "cb"] and 0 <= report["dev"]["acc"] <= 1
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert f"mnli: {NO_GOLD} test record(s) left out" in markdown and "dev ACC" in markdown

    again = tmp_path / "again"
    args = ["run", CL_LONG, "--data-root", cl_root, "--order", "cb", "--budget", "cpu"]
    args += ["--epochs", "1", "--max-test", "6", "--baseline", "none", "--out", again]
    result = CliRunner().invoke(cli_module.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert load_report(again)["config"]["train"]["epochs"] == 1  # --epochs beats the spec
    assert load_report(again)["dev"] is None  # no dev split asked for: none scored


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--dev-share", "1.5"], "--dev-share: dev_share = 1.5 must be a number strictly between"),
        (["--dev-share", "0"], "--dev-share: dev_share = 0.0 must be a number strictly between"),
        (["--budget", "gpu"], "no budget named 'gpu'; its [budgets]: ['cpu']"),
        (["--exclude", "yahoo,nope"], "cannot exclude ['nope']: no [[tasks]] table has that name"),
        (["--order", "order4,nope"], "--order 'order4,nope': not a named order"),
        (["--exclude", "cb"], "task folder(s) without their data files: yahoo"),
    ],
    ids=["share-high", "share-zero", "budget", "exclude", "order", "missing"],
)
def test_bad_protocol_options_exit_2_before_any_model(
    tmp_path: Path, monkeypatch, options: list[str], expected: str
):
    from typer.testing import CliRunner

    from continual_peft import Backbone
    from continual_peft import cli as cli_module

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the input was validated")

    monkeypatch.setattr(Backbone, "from_pretrained", refuse)
    root = write_cl_folder(tmp_path / "data", CL_LONG, n_train=6, n_test=3)
    for file in (root / "TC" / "yahoo").iterdir():
        file.unlink()
    out = tmp_path / "out"
    for command in ("run", "compare"):
        args = [command, CL_LONG, "--data-root", root, "--out", out, *options]
        if "--exclude" not in options:
            args += ["--exclude", "yahoo"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = CliRunner().invoke(cli_module.app, [str(a) for a in args])
        assert result.exit_code == 2, (command, result.output)
        assert expected in " ".join(result.stderr.split()), result.stderr
        assert not out.exists()


def test_the_leaderboard_shows_each_order(tmp_path: Path):
    from continual_peft.experiments.compare import leaderboard
    from continual_peft.reports.leaderboard import render_leaderboard_markdown

    def run(order: str, seed: int, acc: float) -> dict:
        return {"order": order, "seed": seed, "acc": acc, "routed_acc": acc - 0.1,
                "seen_acc": [acc], "matrix": [[acc]], "tasks": ["a"]}  # fmt: skip

    runs = [run("order4", 0, 0.5), run("order4", 1, 0.7), run("order5", 0, 0.4)]
    result = {"label": "per_task", "strategy": "per_task", "module": "lora", "router": "x",
              "lr": 0.1, "spec": None, "run_dir": "per_task", "base": "per_task", "sweep": None,
              "status": "finished", "runs": runs}  # fmt: skip
    head = {"orders": {"order4": ["a"], "order5": ["a"]}, "seeds": [0, 1], "tasks": ["a"]}
    markdown = render_leaderboard_markdown(leaderboard(head, [result]))
    # order4: mean 60.0, sample std of (50, 70) = 14.1; order5: one run, no std
    assert "| per_task | 60.0 ± 14.1 (50.0 ± 14.1) | 40.0 (30.0) |" in markdown


def test_resuming_with_another_dev_split_is_refused(cl_root: Path, tmp_path: Path, make_backbone):
    from continual_peft import LearnerConfig
    from continual_peft.config import TrainConfig
    from continual_peft.experiments.runner import run_stream

    def stream(share: float):
        loaded, _ = quiet_load(CL_LONG, data_root=cl_root, order="order4", dev_share=share)
        return loaded.with_order(["cb", "copa"])

    config = LearnerConfig(train=TrainConfig(epochs=1, batch_size=8, warmup=0.0))
    run = tmp_path / "run"
    run_stream(stream(0.2), config, run, make_backbone=make_backbone)
    with pytest.raises(
        ContinualPeftError, match="other data than when the run learned it.*--dev-share"
    ):
        run_stream(stream(0.5), config, run, make_backbone=make_backbone, resume=True)
    again = run_stream(stream(0.2), config, run, make_backbone=make_backbone, resume=True)
    assert again.report["status"] == "finished"


# ---------------------------------------------------------------- what a hostile new user found


def test_strict_labels_check_every_record_whatever_the_caps(cl_root: Path):
    with pytest.raises(ContinualPeftError, match=r"MNLI/test.json\[60\]: label '-'"):
        quiet_load(CL_LONG, data_root=cl_root, unknown_labels="refuse", max_test=5, max_train=4)


def _cb(root: Path) -> Path:
    return root / "NLI" / "CB"


@pytest.mark.parametrize(
    ("dev_of", "reason"),
    [
        (lambda test, train: test[::-1], "are also test records"),
        (lambda test, train: test[:-1], "are also test records"),
        (lambda test, train: train[:5], "are also training records"),
    ],
    ids=["reordered-test", "test-minus-one", "train-records"],
)
def test_a_dev_file_sharing_records_with_test_or_train_is_not_dev(tmp_path: Path, dev_of, reason):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=30, n_test=12)
    agnews = root / "TC" / "agnews"
    test = json.loads((agnews / "test.json").read_text())
    train = json.loads((agnews / "train.json").read_text())
    (agnews / "dev.json").write_text(json.dumps(dev_of(test, train)))
    stream, messages = quiet_load(CL_STANDARD, data_root=root, dev_share=0.2)
    task = next(t for t in stream.tasks if t.name == "agnews")
    assert reason in task.dev_refused and any(reason in m for m in messages)
    assert "carved from" in task.sources["dev"]  # carved instead, as asked
    assert not set(task.dev_inputs) & (set(task.train_inputs) | set(task.test_inputs))
    plain, _ = quiet_load(CL_STANDARD, data_root=root)  # no share: no dev, and none named
    task = next(t for t in plain.tasks if t.name == "agnews")
    assert not task.dev_inputs and "dev" not in task.sources


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            ["agnews-a ", "agnews-b", "agnews-c"],
            "differs from the declared 'agnews-a ' only in case",
        ),
        (["Agnews-A", "agnews-b", "agnews-c"], "differs from the declared 'Agnews-A' only in case"),
        (["agnews-a", "agnews-b"], r"10 of the 30 records of its train split .*'agnews-c' x10"),
        ([0, 1, 2], r"30 of the 30 records of its train split"),
    ],
    ids=["trailing-space", "case", "class-left-out", "integers-for-strings"],
)
def test_a_labels_mistake_is_refused_not_skipped(tmp_path: Path, labels, expected):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=30, n_test=12)
    (root / "TC" / "agnews" / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(ContinualPeftError, match=expected):
        quiet_load(CL_STANDARD, data_root=root)


def test_which_test_records_a_run_scores_depends_on_the_seed_alone(cl_root: Path):
    def tests(**options):
        stream, _ = quiet_load(CL_LONG, data_root=cl_root, max_test=5, **options)
        return [t.test_inputs for t in stream.tasks]

    first = tests(max_train=8)
    assert tests(max_train=16) == first
    assert tests(max_train=8, dev_share=0.2) == first
    assert tests(max_train=8, dev_needed=True) == first


def test_a_carve_that_takes_a_whole_label_is_refused(tmp_path: Path):
    from continual_peft.tasks.sources import Row

    rows = {
        "train": [Row(f"t{i}", "a", f"train[{i}]") for i in range(20)] + [Row("b0", "b", "x")],
        "test": [Row("e", "a", "test[0]")],
    }
    with pytest.raises(ContinualPeftError, match=r"every training example of label\(s\) \['b'\]"):
        build_task("tiny", rows, dev_share=0.6)
    small = {"train": [Row(f"t{i}", "ab"[i % 2], "x") for i in range(4)], "test": rows["test"]}
    with pytest.raises(ContinualPeftError, match="choose a share of at least 0.25"):
        build_task("tiny", small, dev_share=0.1)


def test_resuming_a_grid_with_another_dev_split_rewrites_nothing(
    cl_root: Path, tmp_path: Path, make_backbone
):
    from continual_peft import LearnerConfig
    from continual_peft.config import TrainConfig
    from continual_peft.experiments.grid import run_grid

    config = LearnerConfig(train=TrainConfig(epochs=1, batch_size=8, warmup=0.0))
    orders = [["cb", "copa"], ["copa", "cb"]]
    out = tmp_path / "grid"

    def grid(share: float, resume: bool = False):
        stream, _ = quiet_load(CL_LONG, data_root=cl_root, dev_share=share, max_test=6)
        options = {"orders": orders, "seeds": [0], "out_dir": out, "resume": resume}
        return run_grid(stream, config, make_backbone=make_backbone, **options)

    grid(0.2)
    before = {p.name: p.read_bytes() for p in out.glob("aggregate.*")}
    with pytest.raises(ContinualPeftError, match="other data than when the run learned it"):
        grid(0.5, resume=True)
    assert {p.name: p.read_bytes() for p in out.glob("aggregate.*")} == before


def test_order_all_runs_orders_that_coincide_once(tmp_path: Path):
    from continual_peft.experiments.grid import resolve_orders

    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    stream, _ = quiet_load(CL_STANDARD, data_root=root, exclude=["yahoo"])
    with pytest.warns(UserWarning, match=r"\['order2'\] have the same tasks .* \['yahoo'\]"):
        assert resolve_orders(stream, ["all"]) == ["order1", "order3"]
    from continual_peft.experiments.grid import label_orders

    with pytest.raises(ContinualPeftError, match=r"same order as 'order1' once \['yahoo'\]"):
        label_orders(stream, ["order1", "order2"])


def test_exclude_edges(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    every = ["dbpedia", "amazon", "yahoo", "agnews"]
    with pytest.raises(ContinualPeftError, match="every task of the stream is excluded"):
        load_stream(CL_STANDARD, data_root=root, exclude=every)
    stream, _ = quiet_load(CL_STANDARD, data_root=root, exclude=["yahoo"])
    with pytest.raises(
        ContinualPeftError, match=r"names task\(s\) \['yahoo'\], which were left out"
    ):
        stream.with_order(["amazon", "yahoo"])
    spec = tmp_path / "s.toml"
    text = CL_STANDARD.read_text().replace("[orders]", '[orders]\nonly = ["yahoo"]')
    spec.write_text(text, encoding="utf-8")
    stream, _ = quiet_load(spec, data_root=root, exclude=["yahoo"])
    assert "only" not in stream.orders  # an order every task of which is left out is gone


def test_every_budget_is_checked_chosen_or_not(tmp_path: Path, cl_root: Path):
    spec = tmp_path / "s.toml"
    base = CL_LONG.read_text()
    spec.write_text(
        base.replace("\n[budgets.cpu]", "\n[budgets.big]\nmax_trian = 5\n\n[budgets.cpu]")
    )
    with pytest.raises(ContinualPeftError, match=r"budgets.big: unknown key\(s\) \['max_trian'\]"):
        load_stream(spec, data_root=cl_root)
    spec.write_text(
        base.replace("\n[budgets.cpu]", "\n[budgets.big]\nmax_train = -8\n\n[budgets.cpu]")
    )
    with pytest.raises(ContinualPeftError, match=r"budgets.big: max_train = -8 is invalid"):
        load_stream(spec, data_root=cl_root)
    spec.write_text(base.replace("epochs = 10", "epochs = 0"))
    with pytest.raises(ContinualPeftError, match=r"s.toml: epochs = 0 is invalid"):
        load_stream(spec, data_root=cl_root)


def test_messages_name_the_actual_problem(tmp_path: Path):
    root = write_cl_folder(tmp_path / "d", CL_STANDARD, n_train=6, n_test=3)
    with pytest.raises(ContinualPeftError, match="data root .*nowhere is not a folder"):
        load_stream(CL_STANDARD, data_root=tmp_path / "nowhere")
    (root / "TC" / "agnews" / "train.json").unlink()
    with pytest.raises(ContinualPeftError, match=r"agnews \(.*agnews: no train.json\)"):
        load_stream(CL_STANDARD, data_root=root)
    path = tmp_path / "t.json"
    path.write_text('[{"sentence": null, "label": "x"}]')
    with pytest.raises(ContinualPeftError, match=r't.json\[0\]: the value of "sentence" is null'):
        read_rows(path, text_column="sentence")
    path.write_text('[{"sentence": "a", "label": NaN}]')
    with pytest.raises(ContinualPeftError, match=r"label nan is not a label"):
        read_rows(path, text_column="sentence")


# ---------------------------------------------------------------- the second hostile pass


def test_any_named_order_works_whatever_the_spec_order(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=6, n_test=3)
    spec = tmp_path / "s.toml"
    text = CL_STANDARD.read_text().replace('order = "order1"', 'order = "mine"')
    spec.write_text(text.replace("[orders]", '[orders]\nmine = ["amazon", "agnews"]'))
    stream, _ = quiet_load(spec, data_root=root)
    assert [t.name for t in stream.tasks] == ["amazon", "agnews"]
    assert [t.name for t in stream.with_order("order3").tasks] == PUBLISHED["order3"].split()
    assert [t.name for t in stream.with_order(["yahoo"]).tasks] == ["yahoo"]


def test_a_dev_text_that_is_a_test_text_is_caught_whatever_spaces_and_label(tmp_path: Path):
    root = write_cl_folder(tmp_path, CL_STANDARD, n_train=30, n_test=12)
    agnews = root / "TC" / "agnews"
    test = json.loads((agnews / "test.json").read_text())
    fresh = [{"sentence": f"fresh {i}", "label": "agnews-a"} for i in range(20)]
    leaked = {"sentence": test[0]["sentence"] + "  ", "label": "agnews-b"}
    (agnews / "dev.json").write_text(json.dumps([*fresh, leaked]))
    stream, _ = quiet_load(CL_STANDARD, data_root=root)
    task = next(t for t in stream.tasks if t.name == "agnews")
    assert "1 of the 21 records" in task.dev_refused and not task.dev_inputs


def test_the_recorded_data_is_how_it_was_read_and_dev_acc_needs_every_task():
    from continual_peft.experiments.grid import routing_metrics
    from continual_peft.tasks.streams import Stream
    from continual_peft.tasks.task import Task

    stream = Stream("s", [Task.from_examples("a", [("x", "p"), ("y", "q")], [("z", "p")])])
    assert "epochs" not in stream.protocol  # the run's own epochs are in its config
    report = {"task_names": ["a", "b"], "dev": {"acc": 0.9, "tasks": ["a"]}}
    assert routing_metrics(report)["dev_acc"] is None  # over some tasks: ranks nothing
    report["dev"]["tasks"] = ["b", "a"]
    assert routing_metrics(report)["dev_acc"] == 0.9


def test_a_no_gold_marker_among_undeclared_labels_is_warned_about():
    from continual_peft.tasks.sources import Row

    rows = {
        "train": [Row(f"t{i}", ["a", "b", "-"][i % 3], f"train[{i}]") for i in range(9)],
        "test": [Row("e", "a", "test[0]")],
    }
    with pytest.warns(UserWarning, match=r"include '-', which usually marks a record without"):
        task = build_task("nli", rows)
    assert "-" in task.labels  # learned as a class, as asked, but said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_task("nli", rows, labels=["a", "b", "-"])  # declared: the user's choice, no warning
