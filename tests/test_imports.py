"""Every module of ``mlearn`` imports on its own, and the modules import each other without a cycle.

(a) Each module is imported with no other ``mlearn`` module loaded: one subprocess imports the heavy
third-party libraries once, then forks a child per module (a fresh ``mlearn`` state each time, without
paying torch's import per module).
(b) The import graph is built with ``ast`` from every import statement, at module level and inside
functions alike (a function-level import only hides a cycle until that function runs). ``from
mlearn.data import X`` counts as an import of X's own module, through the package's lazy ``_EXPORTS``
map; relative imports are resolved.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlearn"
NOT_IMPORTED = {"mlearn.__main__"}  # runs the CLI when imported (``python -m mlearn``)


def module_files() -> Dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``mlearn/`` (packages by their ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def lazy_exports(tree: ast.Module) -> Dict[str, str]:
    """The ``_EXPORTS = {name: module}`` literal of a package ``__init__`` (empty without one)."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and node.value is not None:
            return {str(k): str(v) for k, v in ast.literal_eval(node.value).items()}
    return {}


def import_graph() -> Dict[str, Set[str]]:
    """``{module: modules of mlearn it imports}`` from every import statement of every module."""
    files = module_files()
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in files.items()}
    exports = {name: lazy_exports(tree) for name, tree in trees.items() if files[name].name == "__init__.py"}

    def known(dotted: str) -> Optional[str]:
        """The longest prefix of ``dotted`` that is a module of ``mlearn``."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in files:
                return candidate
        return None

    graph: Dict[str, Set[str]] = {}
    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (known(alias.name) for alias in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if not (base == "mlearn" or base.startswith("mlearn.")):
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in files:
                        targets.add(submodule)
                    elif alias.name in exports.get(base, {}):
                        targets.add(exports[base][alias.name])
                    elif known(base):
                        targets.add(known(base))  # type: ignore[arg-type]
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    """A shortest cycle through the first module of a strongly connected ``component`` (breadth first)."""
    start = min(component)
    parents: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return sorted(component)  # not reached: every module of a component lies on a cycle through start


def test_import_graph_has_no_cycle() -> None:
    cycles = find_cycles(import_graph())
    listed = "\n".join(" -> ".join(cycle) for cycle in cycles)
    assert not cycles, f"import cycles between mlearn modules (function-level imports included):\n{listed}"


def test_cycle_finder_names_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_names_resolve_to_their_modules() -> None:
    graph = import_graph()
    assert "mlearn.lazy" in graph["mlearn.data"]
    exports = lazy_exports(ast.parse((PACKAGE / "data" / "__init__.py").read_text(encoding="utf-8")))
    files = module_files()
    assert exports and all(module in files for module in exports.values()), "a lazy export names no module"


_CHILD_IMPORTS = textwrap.dedent("""
    import importlib, os, sys, traceback
    import numpy, torch, pytorch_lightning  # noqa: F401  (heavy, third-party: imported once, shared)
    failed = []
    for name in sys.argv[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().encode()[-4000:])
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            message = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(f"{name}:\\n{message}")
    sys.stdout.write("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_on_its_own() -> None:
    modules = [name for name in module_files() if name not in NOT_IMPORTED]
    result = subprocess.run([sys.executable, "-c", _CHILD_IMPORTS, *modules], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (f"modules that fail to import alone:\n{result.stdout}\n"
                                    f"{result.stderr[-2000:]}")
