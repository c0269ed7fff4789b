"""The layering of the ``roads`` package, read from its source (every import statement anywhere in a file: inside
functions too, relative ones resolved): stages are leaves — no module under roads/stages/ imports another — the
roads.* import graph has no cycle, and importing every roads module (in a fresh interpreter) pulls in neither
Prefect nor MLflow. Each check is also run on a small package built to break it, so it is known to fail."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import roads

ROOT = Path(roads.__file__).resolve().parent  # the roads package
ORCHESTRATION = ("prefect", "mlflow")  # what the library never imports (tasks/ and flows/ do)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file of every module of the package at ``root`` (packages by their ``__init__.py``)."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        if "__pycache__" in file.parts:
            continue
        parts = [root.name, *file.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _imports_of(name: str, file: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(module of the package, line) for every import in ``file``: ``import a.b`` -> a.b; ``from a import b`` ->
    a.b when that is a module, else a; relative imports resolved against the file's package; also
    ``import_module("a.b")`` with a literal name. Names outside the package are left out."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.append((sub if sub in known else module, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__")):
            targets.append((node.args[0].value, node.lineno))
    out = []
    for target, line in targets:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):  # the longest prefix that is a module of the package
            if ".".join(parts[:i]) in known:
                out.append((".".join(parts[:i]), line))
                break
    return out


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line of such an import}, within the package."""
    known = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, file in known.items():
        edges: dict[str, int] = {}
        for target, line in _imports_of(name, file, known):
            if target != name:
                edges[target] = min(line, edges.get(target, line))
        graph[name] = edges
    return graph


def stage_imports(root: Path = ROOT) -> list[str]:
    """``file:line imports module`` for every import of a module under <package>/stages/ by another module there
    (the package's ``__init__.py``, its registry, included: it may name stages only dynamically)."""
    stages = f"{root.name}.stages"
    graph, known = import_graph(root), modules(root)
    found = []
    for name, edges in graph.items():
        if name != stages and not name.startswith(stages + "."):
            continue
        for target, line in sorted(edges.items()):
            if target == stages or target.startswith(stages + "."):
                found.append(f"{known[name].relative_to(root.parent)}:{line} imports {target}")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (its modules, the first repeated at the end) per strongly connected component of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
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
                    components.append(sorted(component))
    out = []
    for component in components:  # a shortest path from the first member back to it, inside the component
        first, members = component[0], set(component)
        paths = {first: [first]}
        queue = [first]
        while queue:
            node = queue.pop(0)
            for child in sorted(graph.get(node, {})):
                if child == first:
                    out.append(paths[node] + [first])
                    queue = []
                    break
                if child in members and child not in paths:
                    paths[child] = paths[node] + [child]
                    queue.append(child)
    return out


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path = ROOT) -> str:
    known = modules(root)
    steps = [f"{known[a].relative_to(root.parent)}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


_IMPORT_ALL = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    package, root, banned = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    inside = os.path.join(root, package) + os.sep
    for top in banned:
        sys.modules[top] = None  # as if not installed: importing it raises, find_spec answers None
    failed = {}
    for name in json.loads(sys.stdin.read()):
        try:
            importlib.import_module(name)
        except ImportError as err:
            if (err.name or "").partition(".")[0] not in banned:
                raise
            failed[name] = {"missing": err.name, "via": [f"{f.filename[len(root) + 1:]}:{f.lineno}"
                                                         for f in traceback.extract_tb(err.__traceback__)
                                                         if f.filename.startswith(inside)]}
    print(json.dumps(failed))
""")


def orchestration_imports(root: Path = ROOT, banned: tuple[str, ...] = ORCHESTRATION) -> dict[str, dict]:
    """Import every module of the package at ``root`` in a fresh interpreter where the ``banned`` packages are
    missing (``sys.modules[name] = None``: an import of one raises, ``importlib.util.find_spec`` says it is not
    there). Returns, for each module whose import needed one of them, the one it missed and the package's frames
    on the way to that import. A missing package rather than a look at ``sys.modules`` afterwards: third-party
    libraries import their optional integrations when installed (TRL's profiling imports mlflow, reached by
    ``roads.stages.online_rl``'s GRPO/RLOO trainers) — that is theirs, and roads still works without them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, root.name, str(root.parent), ",".join(banned)],
                          input=json.dumps(list(modules(root))), capture_output=True, text=True, env=env,
                          cwd=root.parent, timeout=600)
    assert proc.returncode == 0, f"importing every module of {root} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the checks on roads


def test_stages_are_leaves():
    found = stage_imports()
    assert not found, ("stage modules must not import other stage modules (move shared code into a library module "
                       "below the stages):\n  " + "\n  ".join(found))


def test_the_roads_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"roads.stages.sft", "roads.verifiers", "roads.config"} <= set(graph)  # it read the package
    assert "roads.judge" in graph["roads.verifiers"]
    found = cycles(graph)
    assert not found, "import cycles among roads modules:\n  " + "\n  ".join(describe(c, graph) for c in found)


def test_verifiers_stand_below_the_stages():
    graph = import_graph()
    assert not [m for m in graph["roads.verifiers"] if m.startswith("roads.stages")]


def test_every_roads_module_imports_without_prefect_or_mlflow():
    found = orchestration_imports()
    assert not found, "the library must not import Prefect or MLflow (tasks/ and flows/ do):\n  " + "\n  ".join(
        f"{name} needs {info['missing']}, via {' -> '.join(info['via'])}" for name, info in found.items())


# --------------------------------------------------------------------------- the checks can fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(textwrap.dedent(text))
    return root


BROKEN = {
    "__init__.py": "",
    "low.py": "def helper():\n    from pkg import high  # inside a function: still an edge\n",
    "high.py": "from .low import helper\n",
    "stages/__init__.py": "from importlib import import_module\n\ndef stage(name):\n"
                          "    return import_module(f'pkg.stages.{name}')\n",
    "stages/a.py": "VERSION = 1\n",
    "stages/b.py": "import pkg.low\n\ndef run():\n    from . import a\n",
    "stages/c.py": "from pkg.stages.a import VERSION\nimport importlib\nimportlib.import_module('pkg.stages.b')\n",
    "leaf.py": "import json\nfrom pkg import tracked\n",
    "tracked.py": "import os\nimport mlflow.tracking\n",
}


def test_the_checks_find_stage_imports_and_cycles(tmp_path):
    root = _package(tmp_path, BROKEN)
    assert stage_imports(root) == ["pkg/stages/b.py:4 imports pkg.stages.a", "pkg/stages/c.py:1 imports pkg.stages.a",
                                   "pkg/stages/c.py:3 imports pkg.stages.b"]
    graph = import_graph(root)
    assert graph["pkg.stages"] == {}  # the registry names stages dynamically only
    assert cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]
    assert describe(cycles(graph)[0], graph, root) == ("pkg.high -> pkg.low -> pkg.high\n"
                                                       "      pkg/high.py:1 imports pkg.low\n"
                                                       "      pkg/low.py:2 imports pkg.high")
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_the_import_check_names_who_needs_a_banned_package(tmp_path):
    root = _package(tmp_path, BROKEN)
    assert orchestration_imports(root) == {
        "pkg.leaf": {"missing": "mlflow.tracking", "via": ["pkg/leaf.py:2", "pkg/tracked.py:2"]},
        "pkg.tracked": {"missing": "mlflow.tracking", "via": ["pkg/tracked.py:2"]},
    }
