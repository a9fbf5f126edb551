"""What a comparison runs: entries from strategy names or spec files, a sweep, one shared budget.

An entry is a strategy with its whole configuration (module kind, module options, lr, router,
strategy options). `--strategies` items resolve as follows:

- a path ending in `.toml`: that strategy spec file; the label is the file's stem.
- a registered strategy name: the single shipped spec for it, i.e. the one file
  `<spec_dir>/<name>.toml` or `<spec_dir>/<name>_*.toml` whose `strategy` is that name (e.g.
  `l2p` -> `strategies/l2p_prompt_pool.toml`, which sets the module kind it needs); when there is
  none, or several (per_task ships one per module kind), the default configuration (LoRA) with
  that strategy. The label is the name.

Command-line overrides then apply to every entry. The training budget (BUDGET_KEYS, and the seed
unless seeds are given) must end up the same for every entry; entries that disagree are refused,
naming the option that sets it for all.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_peft.config import LearnerConfig
from continual_peft.errors import ContinualPeftError
from continual_peft.modules import MODULE_KINDS
from continual_peft.strategies import (
    STRATEGIES,
    check_strategy,
    load_strategy_spec,
    names_spec_file,
)
from continual_peft.tasks.streams import shipped_folder

# dotted config key -> the command-line option that sets it for every entry
BUDGET_KEYS: dict[str, str] = {
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "backbone.name": "--backbone",
    "backbone.max_length": "--max-length",
    "backbone.dtype": "--dtype",
    "backbone.quantize": "--quantize",
}
SWEEP_EXAMPLE = "e.g. --sweep lora.r=1,2,4,8,16"
LIST_JOIN = "+"  # joins the names of one list value: --sweep lora.targets=query,query+value


@dataclass(kw_only=True)
class Entry:
    """One leaderboard entry: a labelled configuration."""

    label: str  # unique within a comparison; also its folder name
    config: LearnerConfig  # strategy, module kind and options, lr, router, ...
    spec: str | None = None  # the strategy spec file it came from; None = the defaults
    sweep: dict[str, Any] | None = None  # {"key": "lora.r", "value": 4} for a sweep point
    base: str = ""  # the entry a sweep point was made from ("" = the label itself)


def get(data: dict[str, Any], key: str) -> Any:
    """The value of a dotted key ("lora.r", "module") in a config dict."""
    section, _, field = key.rpartition(".")
    return (data[section] if section else data)[field]


def override(config: LearnerConfig, values: dict[str, Any], where: str) -> LearnerConfig:
    """A copy of `config` with dotted keys ("train.lr": 0.01) set; None values are skipped."""
    data = config.to_dict()
    for key, value in values.items():
        if value is not None:
            section, _, field = key.rpartition(".")
            # a section at its defaults may be absent from the dict ([generation], [evaluation])
            (data.setdefault(section, {}) if section else data)[field] = value
    config = LearnerConfig.from_dict(data, where)
    check_strategy(config, where)
    return config


def shipped_spec(name: str, spec_dir: Path) -> Path | None:
    """The one spec file in `spec_dir` for strategy `name`; None when there is none or several."""
    candidates = [spec_dir / f"{name}.toml", *sorted(spec_dir.glob(f"{name}_*.toml"))]
    found = []
    for path in candidates:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue  # absent, or another's unreadable file: not the one we are looking for
        if data.get("strategy", LearnerConfig.strategy) == name:
            found.append(path)
    return found[0] if len(found) == 1 else None


def entry_from(text: str, spec_dir: str | Path | None = None) -> Entry:
    """An entry from a `--strategies` item: a spec file or a strategy name (module docstring)."""
    if names_spec_file(text):
        return Entry(label=Path(text).stem, config=load_strategy_spec(text), spec=str(text))
    STRATEGIES.get(text)  # an unknown name lists the valid ones
    spec = shipped_spec(text, Path(spec_dir) if spec_dir else shipped_folder("strategies"))
    if spec is not None:
        return Entry(label=text, config=load_strategy_spec(spec), spec=str(spec))
    return Entry(label=text, config=LearnerConfig(strategy=text))


def resolve_entries(
    strategies: list[str],
    overrides: dict[str, Any] | None = None,
    sweep: str | None = None,
    spec_dir: str | Path | None = None,
) -> list[Entry]:
    """Entries for `--strategies` items, with overrides applied and a sweep expanded.

    Args:
        strategies: Strategy names or spec files (see the module docstring).
        overrides: Dotted keys set on every entry (None values are skipped).
        sweep: "KEY=V1,V2,..." (e.g. "lora.r=1,2,4"): every entry once per value (a cross
            product when there are several strategies).
        spec_dir: Where spec files are looked up by name; None: the shipped `strategies/`
            folder, found from the package (not the working directory).
    """
    if not strategies:
        raise ContinualPeftError("give at least one strategy, e.g. --strategies per_task,seq")
    entries = []
    for text in strategies:
        entry = entry_from(text, spec_dir)
        config = override(entry.config, overrides or {}, f"{entry.label} (command line)")
        entries.append(Entry(label=entry.label, config=config, spec=entry.spec))
    if sweep is not None:
        set_keys = {key for key, value in (overrides or {}).items() if value is not None}
        entries = expand_sweep(entries, sweep, set_keys)
    return unique_labels(entries)


def unique_labels(entries: list[Entry]) -> list[Entry]:
    """Entries whose labels are made unique (a repeated label gets -2, -3, ...)."""
    seen: set[str] = set()
    for entry in entries:
        label, number = entry.label, 1
        while label in seen:
            number += 1
            label = f"{entry.label}-{number}"
        entry.label = label
        seen.add(label)
    return entries


# ---------------------------------------------------------------- sweep


def _sweepable(data: dict[str, Any]) -> list[str]:
    """Every key a sweep may set: a scalar setting, or a list of names (`lora.targets`), whose
    values are written with `+` between the names."""
    sections = ["backbone", "train", *MODULE_KINDS.names()]
    keys = ["module", "router"]
    keys += [f"{s}.{f}" for s in sections for f, v in data[s].items() if _sweepable_value(v)]
    return keys


def _sweepable_value(value: Any) -> bool:
    return not isinstance(value, list) or all(isinstance(item, str) for item in value)


def _convert(key: str, item: str, current: Any) -> Any:
    kinds = {bool: "true or false", int: "an integer", float: "a number"}
    if isinstance(current, list):  # a list of names: "query+value" (one value of the sweep)
        names = [name.strip() for name in item.split(LIST_JOIN)]
        if not all(names) or len(set(names)) != len(names):
            problem = "an empty name" if not all(names) else "a name twice"
            raise ContinualPeftError(
                f"--sweep {key}: {item!r} has {problem}; a value of {key} is one name or "
                f"several joined by '{LIST_JOIN}', e.g. --sweep {key}=query,value,query+value"
            )
        return names
    try:
        if isinstance(current, bool):
            if item.lower() not in ("true", "false"):
                raise ValueError
            return item.lower() == "true"
        return type(current)(item)
    except ValueError:
        raise ContinualPeftError(
            f"--sweep {key}: {item!r} is not {kinds.get(type(current), 'valid')}; {SWEEP_EXAMPLE}"
        ) from None


def parse_sweep(text: str, config: LearnerConfig) -> tuple[str, list[Any]]:
    """The key and typed values of "KEY=V1,V2,...", checked against `config`'s settings."""
    key, sep, values = (part.strip() for part in text.partition("="))
    items = [item.strip() for item in values.split(",")]
    if not sep or not key or not values:
        raise ContinualPeftError(f"--sweep {text!r}: write KEY=V1,V2,...; {SWEEP_EXAMPLE}")
    if not all(items):
        raise ContinualPeftError(
            f"--sweep {text!r}: a value is empty (two commas in a row, or one at an end); "
            f"write KEY=V1,V2,...; {SWEEP_EXAMPLE}"
        )
    data = config.to_dict()
    valid = _sweepable(data)
    if key not in valid:
        raise ContinualPeftError(
            f"--sweep {key!r} is not a setting that can be swept; use section.field of a "
            f"strategy spec (e.g. lora.r, prompt.num_virtual_tokens, adapter.reduction_factor, "
            f"train.lr) or module / router; valid keys: {', '.join(valid)}"
        )
    typed = [_convert(key, item, get(data, key)) for item in items]
    # a list's order does not matter to a setting: query+value is value+query
    seen = [str(sorted(v)) if isinstance(v, list) else str(v) for v in typed]
    if len(set(seen)) != len(seen):
        raise ContinualPeftError(f"--sweep {text!r}: a value is listed twice")
    return key, typed


def expand_sweep(entries: list[Entry], sweep: str, fixed: set[str] | None = None) -> list[Entry]:
    """Every entry once per sweep value (entry-major), each validated with its value."""
    key, values = parse_sweep(sweep, entries[0].config)
    if key in (fixed or set()):
        raise ContinualPeftError(
            f"--sweep {key} and a command-line option both set {key}; give only one."
        )
    section = key.rpartition(".")[0]
    expanded = []
    for entry in entries:
        kinds = entry.config.part_kinds()
        if section in MODULE_KINDS.names() and section not in kinds:
            raise ContinualPeftError(
                f"--sweep {key}: entry {entry.label!r} uses module kind(s) {sorted(kinds)}, "
                f"not {section}, so {key} would change nothing."
            )
        for value in values:
            # a list of names is shown as written: "query+value"
            shown = LIST_JOIN.join(value) if isinstance(value, list) else value
            config = override(entry.config, {key: value}, f"--sweep {key}={shown}")
            label = re.sub(r"[^A-Za-z0-9._-]", "_", f"{entry.label}-{key}-{shown}")
            expanded.append(
                Entry(
                    label=label,
                    config=config,
                    spec=entry.spec,
                    sweep={"key": key, "value": shown},
                    base=entry.label,
                )
            )
    return expanded


# ---------------------------------------------------------------- budget


def common_budget(entries: list[Entry], keys: list[str]) -> dict[str, Any]:
    """The value every entry has for each key; entries that disagree are refused."""
    budget = {}
    datas = {entry.label: entry.config.to_dict() for entry in entries}
    for key in keys:
        values = {label: get(data, key) for label, data in datas.items()}
        if len(set(map(repr, values.values()))) > 1:
            option = BUDGET_KEYS.get(key, "--seeds" if key == "seed" else f"--sweep {key}=...")
            raise ContinualPeftError(
                f"the entries disagree on {key}: {values}; a comparison trains every entry "
                f"with the same budget: set it for all with {option}."
            )
        budget[key] = next(iter(values.values()))
    return budget
