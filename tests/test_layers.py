"""The package is a layered DAG: the import-linter contract in pyproject.toml holds (imports only go down
the layers), no cycle joins any two modules (imports inside functions count), and the two packages that
live outside timjax/ (kernels/, convert/) import only what sits below them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_the_layers_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "KEPT" in out.stdout and "BROKEN" not in out.stdout


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph.modules):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph.find_modules_directly_imported_by(start)))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.find_modules_directly_imported_by(nxt))))
    return None


def test_no_module_imports_itself_through_others():
    cycle = _cycle(grimp.build_graph("timjax"))
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():  # the check above can fail
    g = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")]:
        g.add_import(importer=a, imported=b)
    assert _cycle(g) == ["p.a", "p.b", "p.c", "p.a"]


def _timjax_imports(folder: Path) -> set[str]:
    names = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] == "timjax"}


def test_kernels_and_convert_import_only_lower_layers():
    kernels = _timjax_imports(ROOT / "kernels")
    assert all(n.startswith("timjax.kernels") for n in kernels), sorted(kernels)
    base = ("timjax.base.errors", "timjax.base.config", "timjax.qwen3.params", "timjax.base.validation", "timjax.convert", "timjax.base.results")
    convert = _timjax_imports(ROOT / "convert")
    assert all(n.startswith(base) for n in convert), sorted(convert)
