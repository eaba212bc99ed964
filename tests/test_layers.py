"""The package layers: sgl_engine <- sgl_plugins <- sgl_adapters, nothing imports upwards.

`import sgl_plugins` (the contract a third-party plugin implements) must load neither the front
doors nor the frameworks they adapt, and the import graph of the three packages (every import
statement, lazy ones inside functions included) has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "sgl_engine": ROOT / "engine" / "sgl_engine",
    "sgl_plugins": ROOT / "plugins" / "sgl_plugins",
    "sgl_adapters": ROOT / "sgl_adapters",
}
LAYER = {"sgl_engine": 0, "sgl_plugins": 1, "sgl_adapters": 2}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(PACKAGES)


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files importing it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            for target in _imported_packages(path) - {package}:
                graph[package].setdefault(target, []).append(str(path.relative_to(ROOT)))
    return graph


def test_no_package_imports_upwards():
    upward = {
        f"{src} -> {dst}": files
        for src, deps in _package_graph().items()
        for dst, files in deps.items()
        if LAYER[dst] > LAYER[src]
    }
    assert not upward, upward


def test_package_import_graph_has_no_cycle():
    graph = {src: set(deps) for src, deps in _package_graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_import_sgl_plugins_loads_no_front_door_or_framework():
    code = (
        "import sys, sgl_plugins, sgl_plugins.graph, sgl_plugins.manager\n"
        "from sgl_plugins.builtin import local, http\n"
        "bad = [m for m in ('sgl_adapters', 'langchain_core', 'langchain', 'dspy')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_langchain_front_door_loads_no_http_server():
    """A LangChain user importing ChatSGLang gets no FastAPI/uvicorn stack: the OpenAI-shaped
    result pieces it shares with the server live in `sgl_engine.openai_format`. A subprocess,
    so that other tests' imports cannot mask it."""
    code = (
        "import sys\n"
        "from sgl_adapters.langchain import ChatSGLang, SGLang\n"
        "import sgl_engine.openai_format\n"
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'sgl_engine.server')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_adapters_graph_re_exports_the_contract():
    import sgl_plugins.backend
    import sgl_plugins.graph

    import sgl_adapters.graph

    assert sgl_adapters.graph.CallGraph is sgl_plugins.graph.CallGraph
    assert sgl_adapters.graph.Backend is sgl_plugins.backend.Backend
    assert sgl_adapters.graph.LeafResult is sgl_plugins.graph.LeafResult
