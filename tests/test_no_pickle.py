"""No pickle anywhere in the package: every file it writes or reads is JSON or safetensors.

The scan reads each module's syntax tree (not its text, so comments and docstrings that mention
pickle are fine) and flags: importing a pickling library, `torch.load` without
`weights_only=True`, `torch.save` (which pickles), `np.load(..., allow_pickle=True)` and pandas'
pickle readers and writers. A self-test plants each offence and checks that the scan catches it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "continual_peft"
PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLE_METHODS = {"read_pickle", "to_pickle"}  # pandas


def _dotted(node: ast.AST) -> str:
    """`torch.load` for the expression `torch.load`; "" for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def offences(source: str, filename: str = "<planted>") -> list[str]:
    """Every use of pickle in `source`, as "file:line: what"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            bad = [node.module] if top in PICKLERS else []
            bad += [f"{top}.{n}" for n in names & {"load", "save"} if top == "torch"]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and not _keyword_is_true(node, "weights_only"):
                bad = ["torch.load without weights_only=True"]
            elif name == "torch.save":
                bad = ["torch.save (pickles; use safetensors)"]
            elif name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"}:
                bad = (
                    ["np.load with allow_pickle=True"]
                    if _keyword_is_true(node, "allow_pickle")
                    else []
                )
            elif isinstance(node.func, ast.Attribute) and node.func.attr in PICKLE_METHODS:
                bad = [node.func.attr]
            else:
                bad = []
        else:
            bad = []
        found += [f"{filename}:{line}: {what}" for what in bad]
    return found


def test_the_package_uses_no_pickle():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan found the package
    found = [o for f in files for o in offences(f.read_text(encoding="utf-8"), str(f))]
    assert not found, "pickle in the package:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as pk",
        "from pickle import loads",
        "import dill",
        "import cloudpickle",
        "from joblib import dump",
        "import shelve",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import torch\ntorch.save({}, 'x.pt')",
        "from torch import load",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x.pkl')",
        "frame.to_pickle('x.pkl')",
        "def f():\n    import pickle\n    return pickle",
    ],
)
def test_the_scan_catches_a_planted_offence(snippet: str):
    assert offences(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "import numpy as np\nnp.load('x.npy')",
        "from safetensors.torch import load, save",
        '"""We never use pickle."""  # nor torch.save',
        "json.load(handle)",
    ],
)
def test_the_scan_allows_safe_code(snippet: str):
    assert not offences(snippet)
