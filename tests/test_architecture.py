"""The package's import structure: no import cycle between its modules, no `_private` name imported across
modules, and the subsystems layered as README's "Architecture" section describes.

Every ``import`` statement counts, also those inside functions (a function-level import is still a
dependency; hiding a cycle in a function does not remove it). A package's ``__init__`` is a node of its own;
importing ``pkg.mod`` is an edge to ``pkg.mod`` only (Python runs ``pkg/__init__`` first, but that is not a
dependency of the importing module's code).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "crfrnn_deeplab"

# What each subsystem may import from the package (besides itself). Lower layers first.
ALLOWED = {
    "images": set(),
    "allocator": set(),
    "files": set(),
    "distributed": set(),
    "crf": {"images"},
    "models": {"images", "crf", "predict"},  # predict: the models' thin `predict` method (predict imports no model)
    "predict": {"images", "files", "weights", "data", "visualize", "models"},  # models: only the CLI builds from checkpoints
    "data": {"images", "models", "distributed"},  # models: the input conventions the transforms apply
    "visualize": {"data", "images", "files"},
    "weights": {"images", "files", "crf", "models"},
    "training": {"images", "files", "crf", "models", "data", "weights", "distributed", "visualize"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Edges ``module -> imported modules of the package`` and the cross-module imports of private names."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    package = root.name
    edges: dict[str, set[str]] = {name: set() for name in paths}
    private: list[str] = []
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [(base, alias.name) for alias in node.names]
            else:
                continue
            for module, imported in targets:
                if module != package and not module.startswith(package + "."):
                    continue
                if any(part.startswith("_") for part in module.split(".")):
                    private.append(f"{name} imports the private module {module}")
                if imported is not None and f"{module}.{imported}" in paths:
                    target = f"{module}.{imported}"  # `from pkg import submodule`
                else:
                    target = module
                    if imported is not None and imported.startswith("_") and target != name:
                        private.append(f"{name} imports the private name {imported} from {module}")
                if target in paths and target != name:
                    edges[name].add(target)
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a list of modules, first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def subsystem(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycle():
    edges, _ = import_graph(PACKAGE_ROOT)
    assert len(edges) > 30, "the walk found too few modules"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    _, private = import_graph(PACKAGE_ROOT)
    assert private == []


def test_subsystems_import_only_the_layers_below():
    edges, _ = import_graph(PACKAGE_ROOT)
    wrong = []
    for module, targets in edges.items():
        source = subsystem(module)
        if source is None:  # the top-level __init__ re-exports everything
            continue
        for target in targets:
            dest = subsystem(target)
            if dest is not None and dest != source and dest not in ALLOWED[source]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
    assert set(ALLOWED) == {subsystem(m) for m in edges if subsystem(m)}, "a subsystem is missing from ALLOWED"


def test_prediction_api_imports_no_model():
    # The models' `predict` method imports the prediction API; the API must not import the models back.
    edges, _ = import_graph(PACKAGE_ROOT)
    assert not any(t.startswith("crfrnn_deeplab.models") for t in edges["crfrnn_deeplab.predict.api"])


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "a.py": "from pkg.b import f\n", "b.py": "def f():\n    from pkg import a\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .a import x\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    ({"__init__.py": "", "a.py": "import os\n", "b.py": "from pkg.a import x\n"}, None),
])
def test_the_cycle_finder_finds_cycles(tmp_path, files, expected):
    edges, _ = import_graph(_write(tmp_path, files))
    assert find_cycle(edges) == expected


def test_the_walk_finds_private_imports(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "a.py": "_x = 1\n", "b.py": "from pkg.a import _x\n",
                             "_c.py": "", "d.py": "import pkg._c\n"})
    _, private = import_graph(root)
    assert private == ["pkg.b imports the private name _x from pkg.a", "pkg.d imports the private module pkg._c"]
