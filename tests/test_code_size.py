"""The package stays readable in pieces: every file under 400 lines, every function's body
(its statements, less the docstring) about 40 lines at most (STYLE.md; issue 14)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "continual_peft"
MAX_FILE_LINES = 400
MAX_BODY_LINES = 42  # "about 40"


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from a function's first statement after its docstring to its last."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def long_functions(source: str) -> list[tuple[str, int]]:
    tree = ast.parse(source)
    return [
        (node.name, body_lines(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and body_lines(node) > MAX_BODY_LINES
    ]


def test_every_file_is_under_400_lines():
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) >= MAX_FILE_LINES
    }
    assert not long, f"files of {MAX_FILE_LINES} lines or more (split by concept): {long}"


def test_every_function_is_about_40_lines_at_most():
    found = {
        f"{path.relative_to(PACKAGE)}:{name}": n
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, n in long_functions(path.read_text(encoding="utf-8"))
    }
    assert not found, f"function bodies over {MAX_BODY_LINES} lines: {found}"


def test_the_measure_counts_statements_not_the_docstring():
    source = 'def f():\n    """Doc.\n\n    More."""\n' + "    x = 1\n" * 43
    assert long_functions(source) == [("f", 43)]
    assert long_functions(source.replace("    x = 1\n", "", 2)) == []
