"""One registry for module kinds, routers and strategies: each builds by name with keyword
options, checked the same way, with the same error naming the valid options."""

from __future__ import annotations

import pytest

from continual_peft import MODULE_KINDS, STRATEGIES, ContinualPeftError
from continual_peft.registry import Registry
from continual_peft.routers import ROUTERS

REGISTRIES = {"module kind": MODULE_KINDS, "router": ROUTERS, "strategy": STRATEGIES}
ITEMS = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize(("kind", "name"), ITEMS)
def test_every_item_builds_with_its_defaults_and_refuses_an_unknown_option(kind, name):
    registry = REGISTRIES[kind]
    options = registry.options(name)
    assert "self" not in options
    assert registry.build(name, {}) is not None
    if name == "topk":  # a wrapper: options it does not know go to the router it wraps
        with pytest.raises(ContinualPeftError, match="router '[a-z]+': invalid options"):
            registry.build(name, {"bogus": 1}, "spec.toml")
        return
    message = rf"spec.toml: {kind} '{name}': invalid options \['bogus'\]; valid options: " + (
        ", ".join(options) if options else "none"
    )
    with pytest.raises(ContinualPeftError, match=message):
        registry.build(name, {"bogus": 1}, "spec.toml")


@pytest.mark.parametrize("name", ROUTERS.names())
def test_a_router_knows_the_name_it_is_registered_under(name):
    assert ROUTERS.get(name).name == name  # what router.json records, to rebuild it


def test_unknown_names_and_bad_values_are_named():
    registry: Registry = Registry("thing", "[things] in a spec")

    @registry.register("one")
    class One:
        def __init__(self, size: int = 1) -> None:
            if size < 1:
                raise ValueError("size must be >= 1")

    with pytest.raises(ContinualPeftError, match="unknown thing 'two'; valid names: one"):
        registry.build("two")
    with pytest.raises(ContinualPeftError, match=r"valid options: size \(\[things\] in a spec\)"):
        registry.build("one", {"sise": 2})
    with pytest.raises(ContinualPeftError, match=r"thing 'one': bad options \{'size': 0\}: size"):
        registry.build("one", {"size": 0})
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("one")(One)
    assert registry.options("one") == {"size": 1}


def test_oracle_ignores_router_options_as_it_always_did():
    """`router = "oracle"` builds no router, so `[router_options]` left from another router
    (a spec's, overridden by `--router oracle`; runs written so) are unused, not refused."""
    from continual_peft import LearnerConfig
    from continual_peft.strategies import check_config

    check_config(LearnerConfig(router="oracle", router_options={"shrinkage": "oas", "k": 2}))
    with pytest.raises(ContinualPeftError, match="router 'mahalanobis': invalid options"):
        check_config(LearnerConfig(router="mahalanobis", router_options={"k": 2}))


def test_old_import_paths_of_tasks_and_strategies_still_work():
    from continual_peft.strategies import PerTask, Sequential
    from continual_peft.tasks import Stream, Task, class_split, load_stream, load_task

    assert STRATEGIES.get("per_task") is PerTask and STRATEGIES.get("seq") is Sequential
    assert all(callable(f) for f in (Stream, Task, class_split, load_stream, load_task))
