"""Human surfaces of a comparison: the leaderboard table fits an 80-column terminal uncut."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from continual_peft.reports.leaderboard import console_leaderboard

HEADERS = ("#", "entry", "strategy", "module", "ACC", "BWT", "Forgetting", "routed", "params")


def _stats(mean: float | None, std: float | None = None, n: int = 3) -> dict[str, Any]:
    return {"mean": mean, "std": std, "n": n if mean is not None else 0}


def _entry(rank: int, label: str, strategy: str, acc: float, routed: float | None = None) -> dict:
    return {
        "rank": rank,
        "label": label,
        "strategy": strategy,
        "module": "prompt" if strategy == "l2p" else "lora",
        "router": "mahalanobis" if routed else "oracle",
        "status": "finished",
        "acc": _stats(acc, 0.012),
        "bwt": _stats(-0.123, 0.01),
        "forgetting": _stats(0.1234, 0.021),
        "routed_acc": _stats(routed, 0.01),
        "trainable_parameters": _stats(1234567.0, 0.0),
        "train_seconds": _stats(123.4, 5.6),
        "eval_seconds": _stats(12.3, 0.4),
    }


@pytest.fixture
def board() -> dict[str, Any]:
    """Three seeds, a router and a label that is not its strategy: the widest table there is."""
    entries = [
        _entry(1, "per_task_lora_long", "per_task", 0.95, routed=0.9),
        _entry(2, "seq", "seq", 0.6),
        _entry(3, "l2p", "l2p", 0.5),
    ]
    return {
        "stream": "clbench",
        "status": "finished",
        "orders": {"default": ["a", "b"]},
        "seeds": [0, 1, 2],
        "budget": {"train.epochs": 3},
        "entries": entries,
    }


def _render(board: dict[str, Any], width: int) -> str:
    console = Console(width=width, record=True)
    console.print(console_leaderboard(board))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_leaderboard_is_never_cut(board: dict[str, Any], width: int) -> None:
    text = _render(board, width)
    assert "…" not in text
    assert all(len(line) <= width for line in text.splitlines())
    for header in HEADERS:
        assert header in text.split(), header
    for number in ("95.0", "-12.3", "12.3", "90.0", "1,234,567", "123.4", "± 5.6", "± 1.2"):
        assert number in text, number


def test_leaderboard_takes_a_wide_terminal_on_one_line_per_entry(board: dict[str, Any]) -> None:
    text = _render(board, 200)
    row = next(line for line in text.splitlines() if "per_task_lora_long" in line)
    assert "95.0 ± 1.2" in row and "90.0 ± 1.0" in row and "1,234,567" in row


def test_leaderboard_prints_once_per_call(board: dict[str, Any]) -> None:
    assert _render(board, 80).count("Leaderboard (%)") == 1
