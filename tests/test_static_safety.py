"""Static check: the library and the CLI never deserialize code.

Fails when ``lmcache_core`` or ``lmcache_cli`` imports ``pickle``/``marshal``
(or look-alikes: ``dill``, ``cloudpickle``, ``shelve``, ``joblib``), calls
``torch.load`` without ``weights_only=True``, ``np.load`` with anything but
``allow_pickle=False`` (or its default), or ``yaml.load`` without a safe loader.
Aliases (``import torch as t``, ``from numpy import load``) are resolved.
The checker tests itself on samples, so a refactor cannot blind it silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lmcache_core", "lmcache_cli")
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, with the first name resolved through imports."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<sample>") -> list[str]:
    """Every unsafe-deserialization use in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    found: list[str] = []
    for node in ast.walk(tree):  # imports first: aliases apply to the whole module
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        where = f"{filename}:{node.lineno}"
        if name in ("__import__", "importlib.import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where}: dynamically imports {arg.value}")
        elif name == "torch.load" or name.startswith("torch.serialization.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("numpy.load", "np.load"):
            allow = _kw(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                found.append(f"{where}: np.load with allow_pickle not False")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (_dotted(loader, aliases) or "") if loader is not None else ""
            if loader_name.rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: yaml.load without a safe Loader")
        elif name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "pandas.read_pickle"):
            found.append(f"{where}: {name}")
    return found


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert files, "no sources found: the checker would pass vacuously"
    return files


def test_library_and_cli_never_deserialize_code():
    problems: list[str] = []
    for path in _sources():
        problems += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert problems == [], "unsafe deserialization:\n" + "\n".join(problems)


BAD = [
    "import pickle",
    "import pickle as p",
    "import marshal",
    "from pickle import loads",
    "import dill",
    "import _pickle",
    "__import__('pickle')",
    "import importlib\nimportlib.import_module('marshal')",
    "import torch\ntorch.load('x')",
    "import torch as t\nt.load('x', weights_only=False)",
    "from torch import load\nload('x')",
    "import torch\nflag = True\ntorch.load('x', weights_only=flag)",
    "import numpy as np\nnp.load('x', allow_pickle=True)",
    "from numpy import load\nload('x', allow_pickle=1)",
    "import numpy\nnumpy.load('x', allow_pickle=True)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(s)",
]
GOOD = [
    "import torch\ntorch.load('x', weights_only=True)",
    "import torch as t\nt.load('x', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x')",
    "import numpy as np\nnp.load('x', allow_pickle=False)",
    "import yaml\nyaml.safe_load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import json\njson.loads(s)",
    "# import pickle (a comment)\nx = 'import pickle'",
]


@pytest.mark.parametrize("source", BAD, ids=range(len(BAD)))
def test_checker_catches(source):
    assert violations(source)


@pytest.mark.parametrize("source", GOOD, ids=range(len(GOOD)))
def test_checker_allows(source):
    assert violations(source) == []
