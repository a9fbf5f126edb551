"""The package's modules import one another without circles (read with `ast`, so it holds for
imports inside functions too). Two kinds of edges are not counted yet: imports under
`if TYPE_CHECKING:` (type hints only) and a package's `__init__` importing its own plug-in
modules (modules/, strategies/); issue 14's layering removes those as well."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "continual_peft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hints = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in hints:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in paths else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(PACKAGE.name)}
        graph[name] = {
            other
            for other in found
            if other in paths and other != name and not other.startswith(name + ".")
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for other in sorted(graph[node]):
            if other in path:
                return path[path.index(other) :] + [other]
            if other not in done:
                found = visit(other, [*path, other])
                if found:
                    return found
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_module_imports_itself_round_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_strategies_type_against_their_protocol_not_the_learner():
    """Strategies see the learner through `strategies.Learner` (a Protocol of what they use):
    no strategy imports the engine, not even for type hints."""
    engine = {
        "continual_peft.engine.learner",
        "continual_peft.engine.loading",
        "continual_peft.experiments.runner",
    }
    for path in sorted((PACKAGE / "strategies").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }  # fmt: skip
        assert not imported & engine, (path.name, imported & engine)
