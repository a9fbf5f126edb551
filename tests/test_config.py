"""Strategy specs and LearnerConfig: round trips, per-task kinds, errors that name the key."""

from __future__ import annotations

import pytest

from continual_peft import ContinualPeftError, LearnerConfig, load_strategy_spec
from continual_peft.modules import MODULE_KINDS


def test_round_trip_through_dict():
    config = LearnerConfig.from_dict(
        {"module": "lora", "lora": {"r": 4, "targets": ["all-linear"]}, "train": {"lr": 0.01}}
    )
    again = LearnerConfig.from_dict(config.to_dict())
    assert again == config
    assert config.kind_config("lora").r == 4 and config.train.lr == 0.01
    assert set(config.to_dict()) >= set(MODULE_KINDS.names())  # every kind's section is written


def test_per_task_module_override(tmp_path):
    spec = tmp_path / "mixed.toml"
    spec.write_text('module = "lora"\n[tasks.news]\nmodule = "lora"\n[lora]\nr = 2\n')
    config = load_strategy_spec(spec)
    assert config.module_for("news") == "lora" and config.module_for("other") == "lora"
    assert config.task_modules == {"news": "lora"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('module = "bogus"', "unknown module kind 'bogus'; valid names: "),
        ('[tasks.news]\nmodule = "bogus"', "unknown module kind 'bogus'"),
        ('[tasks."../x"]\nmodule = "lora"', r"\[tasks.../x\]: invalid task name"),
        ("[tasks.news]\nkind = 1", r"\[tasks.news\]: unknown key\(s\) \['kind'\]"),
        (
            "[lora]\nrank = 4",
            r"\[lora\]: module kind 'lora': invalid options \['rank'\]; valid options: r,",
        ),
        ("[lora]\nr = 0", "lora.r = 0 is invalid; it must be >= 1"),
        ('[train]\nlr = "fast"', "key 'lr' must be int or float"),
        ("[bogus]\nx = 1", r"unknown key\(s\) \['bogus'\]"),
        ('router = "psychic"', "unknown router 'psychic'"),
    ],
)
def test_bad_spec_names_file_and_key(tmp_path, text, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(text + "\n")
    with pytest.raises(ContinualPeftError, match=message) as err:
        load_strategy_spec(spec)
    assert str(spec) in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.lr", float("inf")), ("train.lr", float("nan")), ("train.weight_decay", -0.1)],
)
def test_numbers_that_cannot_train_or_be_recorded_are_refused(key, value):
    from continual_peft.experiments.entries import override

    with pytest.raises(ContinualPeftError, match=f"{key} = .* is invalid"):
        override(LearnerConfig(), {key: value}, "command line")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"lora": {"targets": ["(a"]}},
            r"spec.toml: \[lora\]: lora targets = \['\(a'\] is invalid",
        ),
        ({"lora": {"targets": []}}, r"spec.toml: \[lora\]: lora targets = \[\] is invalid"),
        ({"ia3": {"targets": ["[x"]}}, r"spec.toml: \[ia3\]: ia3 targets = \['\[x'\] is invalid"),
        ({"ia3": {"feedforward": ["*"]}}, r"\[ia3\]: ia3 feedforward = \['\*'\] is invalid"),
    ],
)
def test_a_target_that_is_no_regular_expression_is_refused_naming_file_and_key(table, expected):
    with pytest.raises(ContinualPeftError, match=expected) as err:
        LearnerConfig.from_dict(table, "spec.toml")
    assert "not a valid regular expression" in str(err.value) or "[]" in str(err.value)


def test_one_name_where_a_list_is_wanted_shows_the_list_of_one():
    with pytest.raises(ContinualPeftError, match=r'a list of one: targets = \["query"\]'):
        LearnerConfig.from_dict({"lora": {"targets": "query"}}, "spec.toml")


@pytest.mark.parametrize(
    ("router", "options", "key"),
    [
        ("mahalanobis", {"reject_rate": 1}, "reject_rate must be in"),
        ("topk", {"k": 0}, "k must be a positive integer"),
        ("gate", {"steps": "x"}, "steps must be an integer"),
    ],
)
def test_a_bad_router_option_names_the_spec_file_the_table_and_the_key(router, options, key):
    data = {"router": router, "router_options": options}
    with pytest.raises(ContinualPeftError) as err:
        LearnerConfig.from_dict(data, "spec.toml")
    message = str(err.value)
    assert message.startswith(f"spec.toml: [router_options] of router '{router}': {key}"), message
    assert f"{router}: {router}:" not in message  # the router is named once
