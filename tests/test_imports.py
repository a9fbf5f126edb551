"""The package's imports run one way: no circles, and never back up a layer.

Read with `ast`, so imports inside functions and type-hint-only imports (`if TYPE_CHECKING:`)
count too. The layers, top to bottom (docs/architecture.md):

    __main__ -> cli, the package's __init__ -> experiments, integrations -> engine
        -> strategies -> config -> reports, routers -> store -> modules, tasks
        -> backbones, registry, spec, metrics, merging, _version, distributed -> errors

A module may import its own folder and any folder of a lower layer; folders of one layer do not
import each other. Inside a folder, a package `__init__` may import its own modules (that is how
plug-ins are registered: explicitly, one import each) but no module imports its package's
`__init__` back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "continual_peft"

LAYERS = [
    {"__main__"},
    {"cli", "__init__", "avalanche"},  # the command line; the public API and import paths
    {"experiments", "integrations", "serve"},
    {"engine"},
    {"strategies"},
    {"config"},
    {"reports", "routers"},
    {"store"},
    {"modules", "tasks"},
    {"backbones", "registry", "spec", "metrics", "merging", "_version", "distributed"},
    {"errors"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _paths() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file, hints included)."""
    paths = _paths()
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in paths else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(PACKAGE.name)}
        graph[name] = {other for other in found if other in paths and other != name}
    return graph


def folder(module: str) -> str:
    """The top-level folder (or top-level module) a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    """The layer index of `module` (0 = top)."""
    name = folder(module)
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{module}: its folder {name!r} is in no layer; add it to LAYERS")


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up a layer, across one layer, or into its own package's
    `__init__`, as 'importer -> imported'."""
    found = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            same_folder = folder(other) == folder(module)
            if same_folder and module.startswith(other + "."):
                found.append(f"{module} -> {other} (its own package's __init__)")
            elif not same_folder and layer(other) <= layer(module):
                found.append(f"{module} -> {other} (layer {layer(module)} -> {layer(other)})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for other in sorted(graph.get(node, ())):
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


def test_imports_run_down_the_layers():
    found = wrong_way(import_graph())
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_every_module_is_in_a_layer():
    for module in _paths():
        layer(module)


def test_the_checkers_find_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    pkg = PACKAGE.name
    graph = {
        f"{pkg}.store.io": {f"{pkg}.engine.learner"},  # up
        f"{pkg}.reports.run": {f"{pkg}.routers.base"},  # across one layer
        f"{pkg}.modules.lora": {f"{pkg}.modules"},  # into its own package's __init__
        f"{pkg}.engine.learner": {f"{pkg}.store.io", f"{pkg}.engine.bank"},  # fine
    }
    assert len(wrong_way(graph)) == 3


def test_strategies_type_against_their_protocol_not_the_learner():
    """Strategies see the learner through `strategies.Learner` (a Protocol of what they use):
    no strategy imports the engine, not even for type hints."""
    for path in sorted((PACKAGE / "strategies").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        engine = {m for m in imported if m and m.startswith(f"{PACKAGE.name}.engine")}
        assert not engine, (path.name, engine)
