"""The documentation against the code: every relative link resolves, the README stays a front
door, and every command and Python block in a code fence names what exists. The README's library
quickstart runs, in a subprocess, as a reader would paste it.

A fence's info string says what a block is: ```bash (or sh, shell, console) blocks are commands,
```python blocks are Python (```python no-run: a fragment that must parse and import, not run),
```toml blocks must parse; any other fence (```text, a bare ```) is output and is not checked.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

from continual_peft import MODULE_KINDS, STRATEGIES, ContinualPeftError
from continual_peft.backbones.load import FAMILIES
from continual_peft.cli import app
from continual_peft.cli.show import LISTS
from continual_peft.routers import ROUTERS

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "benchmarks" / "RESULTS.md"]
    + list((REPO / "docs").glob("*.md"))
)
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`]*)$")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")  # runs/<time>-demo: a value the reader fills in
SHELL = {"bash", "sh", "shell", "console", "zsh"}
PLAIN_PROGRAMS = {"cd", "echo", "cat", "head", "tee", "kill", "ls", "mkdir", "export", "ruff"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-avalanche/bin/python"}
PIPS = {"pip", "pip3", ".venv/bin/pip", ".venv-avalanche/bin/pip"}
README_MAX_LINES = 200


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def split_fences(text: str) -> tuple[list[str], list[tuple[str, str, int]]]:
    """A page's lines with its fenced blocks blanked, and the blocks: (info string, code, line
    of the opening fence). A block closes at a fence of its own character, at least as long."""
    kept, found, opened, info, start, body = [], [], None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.strip())
        if opened is None and match:
            opened, info, start, body = match.group(1), match.group(2).strip(), number, []
        elif opened is not None and re.fullmatch(
            f"{re.escape(opened[0])}{{{len(opened)},}}", line.strip()
        ):
            found.append((info, "\n".join(body), start))
            opened = None
        elif opened is not None:
            body.append(line)
        kept.append(line if opened is None and not match else "")
    assert opened is None, f"the code fence of line {start} is never closed"
    return kept, found


def blocks(page: Path) -> list[tuple[str, str, int]]:
    return split_fences(page.read_text(encoding="utf-8"))[1]


def outside_fences(page: Path) -> list[str]:
    return split_fences(page.read_text(encoding="utf-8"))[0]


def prose(page: Path) -> str:
    """The page without its fenced blocks and inline code: what a reader sees as text."""
    return INLINE_CODE.sub("", "\n".join(outside_fences(page)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... for repeated headings."""
    found, counts = set(), {}
    for line in outside_fences(page):
        if match := re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line):
            base = slug(match.group(1))
            counts[base] = counts.get(base, 0) + 1
            found.add(base if counts[base] == 1 else f"{base}-{counts[base] - 1}")
    return found


# ---------------------------------------------------------------- links and the README's size


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or whose heading anchor, does not exist."""
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page: Path):
    assert broken_links(page) == []


def test_the_link_check_catches_mistakes(tmp_path: Path):
    (tmp_path / "other.md").write_text("# A `code` title\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-title) [ok](other.md#twice-1) ![ok](other.md) [ok](#here)\n"
        "`[skipped](inline.md)` [web](https://example.org/x.md)\n\n# Here\n\n"
        "```bash\n[skipped](fenced.md)\n```\n"
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#there)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
        "#there: no heading #there in page.md",
    ]


def test_anchors_follow_github():
    assert slug("Stream spec (`streams/*.toml`)") == "stream-spec-streamstoml"
    assert slug("2026-11-28 — the demo: `continual-peft run`") == (
        "2026-11-28--the-demo-continual-peft-run"
    )


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move the manual to docs/"
    )


def test_docs_describe_the_code_as_it_is():
    """No issue numbers or "as before" stories in the README or docs/ (CHANGELOG.md has them)."""
    story = re.compile(r"\bissues?\s+#?\d+|\bas before\b|\bbefore issue\b", re.I)
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = {page_id(p): story.findall(p.read_text(encoding="utf-8")) for p in pages}
    assert not {k: v for k, v in found.items() if v}


def test_the_readme_names_everything_registered():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z0-9_]+)`", readme))
    registered = {*MODULE_KINDS.names(), *STRATEGIES.names(), *ROUTERS.names(), *FAMILIES}
    assert registered - named == set()


def test_ci_runs_the_readmes_test_command():
    commands = [
        c
        for info, code, _ in blocks(REPO / "README.md")
        if info.split(" ")[0] in SHELL
        for c in lines(code)
    ]
    test_command = "bash scripts/test.sh"
    assert test_command in commands
    assert test_command in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    script = (REPO / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert "set -euo pipefail" in script and 'cd "$(dirname "$0")/.."' in script


# ---------------------------------------------------------------- commands in code blocks


def lines(code: str) -> list[str]:
    """A shell block's commands: continuations joined, `$ ` prompts read, output left out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    prompted = any(line.startswith("$ ") for line in joined.splitlines())
    commands = []
    for line in joined.splitlines():
        if prompted and not line.startswith("$ "):
            continue  # console output
        line = line.removeprefix("$ ").strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def simple_commands(line: str) -> list[list[str]]:
    """A command line's simple commands (split at |, &&, ;), redirections and comments left out."""
    lexer = shlex.shlex(PLACEHOLDER.sub("PLACEHOLDER", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, tokens = [], [], iter(list(lexer))
    for token in tokens:
        if token in ("<", ">", ">>"):
            next(tokens, None)  # the file redirected from or to
        elif token and set(token) <= set("|&;()"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def cli_options(command) -> dict[str, bool]:
    """Each option's spellings -> whether it takes a value."""
    options = {"--help": False}
    for param in command.params:
        if param.param_type_name == "option":  # typer's own click: no isinstance
            for name in [*param.opts, *param.secondary_opts]:
                options[name] = not param.is_flag
    return options


def check_value(option: str, value: str) -> list[str]:
    """Values a reader could mistype: registered names and spec files that ship."""
    names = {
        "--module": MODULE_KINDS,
        "--router": ROUTERS,
        "--strategy": STRATEGIES,
        "--strategies": STRATEGIES,
    }
    problems = []
    for piece in value.split(",") if option == "--strategies" else [value]:
        if piece.endswith(".toml"):
            problems += [] if (REPO / piece).exists() else [f"{option} {piece}: no such file"]
        elif option in names and "PLACEHOLDER" not in piece and piece not in names[option].names():
            problems.append(f"{option} {piece}: not registered")
    return problems


def check_cli(args: list[str]) -> list[str]:
    """A `continual-peft ...` command: a real subcommand, only its options, real names."""
    group = typer.main.get_command(app)
    if not args or args[0] in ("--help", "--version", "-V"):
        return []
    command = group.commands.get(args[0])
    if command is None:
        return [f"no command {args[0]!r}; commands: {sorted(group.commands)}"]
    options, problems, positionals = cli_options(command), [], []
    rest = iter(args[1:])
    for token in rest:
        if token.startswith("-") and token != "-":
            name, eq, value = token.partition("=")
            if name not in options:
                problems.append(f"{args[0]} has no option {name}")
            elif options[name]:
                problems += check_value(name, value if eq else next(rest, ""))
        else:
            positionals.append(token)
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if len(positionals) > len(arguments):
        problems.append(f"{args[0]} takes {len(arguments)} argument(s): {positionals}")
    for positional in positionals:
        if positional.endswith(".toml") and not (REPO / positional).exists():
            problems.append(f"{args[0]} {positional}: no such file")
    if args[0] == "list" and positionals and positionals[0] not in LISTS:
        problems.append(f"list {positionals[0]}: one of {list(LISTS)}")
    return problems


def check_module(args: list[str]) -> list[str]:
    """`python -m MODULE ...` and `torchrun ... -m MODULE ...`."""
    module, rest = args[0], args[1:]
    if module == "continual_peft":
        return check_cli(rest)
    if module == "pytest":
        return [f"pytest {a}: no such path" for a in rest if not (REPO / a).exists()]
    if module == "venv" or importlib.util.find_spec(module) is not None:
        return []
    return [f"-m {module}: no such module"]


def check_python(args: list[str]) -> list[str]:
    if args and args[0] == "-m":
        return check_module(args[1:])
    script = next((a for a in args if not a.startswith("-")), "")
    return [] if (REPO / script).is_file() else [f"python {script}: no such script"]


def check_pip(args: list[str]) -> list[str]:
    """`pip install ... -e ".[extra,...]"`: the project is here and declares the extras."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = set(extras["optional-dependencies"])
    problems = []
    for target in (a for a in args if a.startswith(".")):
        wanted = set(re.findall(r"[\w-]+", target.partition("[")[2]))
        problems += [f"pip: no extra {e!r} in pyproject.toml" for e in wanted - declared]
    return problems


def check_curl(args: list[str]) -> list[str]:
    """`curl localhost:PORT/PATH ...`: PATH is an endpoint of `continual-peft serve`."""
    from continual_peft.serve.app import KNOWN

    urls = [a for a in args if re.match(r"^(https?://)?(localhost|127\.0\.0\.1)[:/]", a)]
    paths = [re.sub(r"^(https?://)?[^/]+", "", url) for url in urls]
    return [
        f"curl: {path or '/'} is no endpoint of the server" for path in paths if path not in KNOWN
    ]


def check_command(tokens: list[str]) -> list[str]:
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the program
    program, args = tokens[0], tokens[1:]
    if program.endswith("continual-peft"):
        return check_cli(args)
    if program in PYTHONS:
        return check_python(args)
    if program in PIPS:
        return check_pip(args)
    if program == "torchrun":
        return check_module(args[args.index("-m") + 1 :]) if "-m" in args else check_python(args)
    if program in ("bash", "sh"):
        return [] if (REPO / args[0]).is_file() else [f"{program} {args[0]}: no such script"]
    if program == "curl":
        return check_curl(args)
    if program in PLAIN_PROGRAMS:
        return []
    return [f"{program}: a program tests/test_docs.py does not know how to check"]


def blocks_of(kinds: set[str]) -> list:
    """Every block of these kinds (the info string's first word) in the pages, as test cases."""
    return [
        pytest.param(code, id=f"{page_id(page)}:{line}")
        for page in PAGES
        for info, code, line in blocks(page)
        if info.split(" ")[0] in kinds
    ]


@pytest.mark.parametrize("code", blocks_of(SHELL))
def test_commands_name_real_commands_options_and_files(code: str):
    problems = [p for line in lines(code) for c in simple_commands(line) for p in check_command(c)]
    assert problems == []


@pytest.mark.parametrize(
    "command, problem",
    [
        ("continual-peft run --epochs 2 --bogus 1", "run has no option --bogus"),
        ("continual-peft train", "no command 'train'"),
        ("continual-peft run --router nearest", "--router nearest: not registered"),
        ("continual-peft compare --strategies seq,nope", "--strategies nope: not registered"),
        ("continual-peft run streams/missing.toml", "no such file"),
        ("python -m continual_peft list models", "list models: one of"),
        ('pip install -e ".[gpu]"', "no extra 'gpu'"),
        ("bash scripts/missing.sh", "no such script"),
    ],
)
def test_the_command_check_catches_mistakes(command: str, problem: str):
    problems = [p for c in simple_commands(command) for p in check_command(c)]
    assert any(problem in p for p in problems), problems


# ---------------------------------------------------------------- Python and TOML blocks


def top_level_names(path: str) -> set[str]:
    """Names a module's source defines or imports at its top level (read, not run)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def resolves(module: str, name: str) -> bool:
    """`from module import name` works: an attribute or a submodule. A module that needs an
    optional extra not installed here (Avalanche) is read instead of imported."""
    try:
        loaded = importlib.import_module(module)
    except (ImportError, ContinualPeftError):
        spec = importlib.util.find_spec(module)
        return spec is not None and name in top_level_names(spec.origin)
    return hasattr(loaded, name) or importlib.util.find_spec(f"{module}.{name}") is not None


def unresolved_imports(code: str) -> list[str]:
    missing = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("continual_peft"):
            missing += [
                f"{node.module}.{a.name}" for a in node.names if not resolves(node.module, a.name)
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("continual_peft")]
            missing += [n for n in names if importlib.util.find_spec(n) is None]
    return missing


@pytest.mark.parametrize("code", blocks_of({"python", "py"}))
def test_python_blocks_parse_and_import_what_exists(code: str):
    ast.parse(code)
    assert unresolved_imports(code) == []


# A formatter's work on a too-long line: `x = (\n    call()\n)  # its comment`.
MANGLED = re.compile(r"=\s*\(\n\s+[\w.]+\([^()\n]*\)\n\s*\)")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_blocks_hold_no_formatter_marks(page: Path):
    marked = [line for _, code, line in blocks(page) if "# fmt:" in code or MANGLED.search(code)]
    assert not marked, f"{page_id(page)}: formatter marks in the blocks at lines {marked}"


def test_the_mangling_check_knows_the_formatters_work():
    assert MANGLED.search("stream = (\n    load_stream()\n)  # the embedded demo")
    assert not MANGLED.search("stream = load_stream()  # the embedded demo")


@pytest.mark.parametrize("code", blocks_of({"toml"}))
def test_toml_blocks_parse(code: str):
    tomllib.loads(code)


def test_the_readmes_library_quickstart_runs(tmp_path: Path):
    """The README's library quickstart, pasted into a fresh interpreter in an empty folder."""
    readme = REPO / "README.md"
    heading = readme.read_text(encoding="utf-8").splitlines().index("## Library quickstart")
    info, quickstart = next((i, c) for i, c, line in blocks(readme) if line > heading + 1)
    assert info == "python", "the quickstart is a Python block that runs as it is"
    done = subprocess.run(
        [sys.executable, "-c", quickstart],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'acc':" in done.stdout
    assert (tmp_path / "runs" / "quickstart" / "report.json").is_file()
