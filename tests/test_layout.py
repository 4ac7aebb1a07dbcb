"""The package's layout is a contract: the life cycle's steps as layers, no import cycles.

`pyproject.toml` [tool.importlinter] states the layers (each step imports only the steps below
it) and that the model's logged code imports nothing of the package; these tests run that
contract and check what import-linter does not: cycles inside a step, and copies of facts that
cannot be imported where they are needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from deep_repro.config import task
from deep_repro.serving import pyfunc

ROOT = Path(__file__).parents[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycles() -> None:
    graph = grimp.build_graph("deep_repro")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_the_layer_contract_holds() -> None:
    """Each life-cycle step imports only the steps below it (pyproject.toml [tool.importlinter])."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a dev dependency: uv sync"
    proc = subprocess.run(
        [lint, "--no-cache", "--no-logo", "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 broken" in proc.stdout


def test_every_step_says_what_it_owns() -> None:
    package = ROOT / "src" / "deep_repro"
    for init in sorted(package.glob("*/__init__.py")):
        text = init.read_text()
        assert text.startswith('"""') and len(text.split('"""')[1].strip()) > 40, init


def test_the_logged_model_s_copy_of_the_class_names_is_the_task_s() -> None:
    """serving/pyfunc.py is logged with the model and cannot import the package: a copy."""
    assert pyfunc.CLASS_NAMES == task.CLASS_NAMES
