"""The package's layers, enforced: the import graph of ``treeopt`` (module-level and
function-local imports, and ``importlib.import_module`` of a literal name) has no cycle, and
no module imports one of a higher layer. Package ``__init__`` files count as imported by
whoever imports a module inside them, as Python does.

Layers, lowest first (a module may import its own layer and those below):

0. base: errors, limits
1. core types: Tree, growmaps, tree sets, prompts, the Profile and Calibration types
2. search: the exact DP, hardware-aware choice, tree shapes and specs, engine families, exports,
   pictures
3. decode: the engine, verification rules, sampling, tree attention, the Drafter interface
4. models: loading, fetching, CPU kernels, cheaper draft variants
5. drafters: every Drafter implementation
6. api: text in / text out, chat, tiny test models
7. measure: acceptance, latency, quality and calibration profiling, the Optuna search, benches
8. pipeline: the search API, tuning, evaluation
9. cli
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "treeopt"

LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["treeopt", "treeopt.errors", "treeopt.limits", "treeopt.rules"]),
    ("core types", ["treeopt.tree", "treeopt.growmap", "treeopt.treeset", "treeopt.datasets",
                    "treeopt.profile", "treeopt.profile.model", "treeopt.profile.calibration",
                    "treeopt.profile.copytable"]),
    ("search", ["treeopt.search", "treeopt.search.dp", "treeopt.search.hardware",
                "treeopt.search.family", "treeopt.search.speclen", "treeopt.shapes", "treeopt.viz",
                "treeopt.export"]),
    ("decode", ["treeopt.decode", "treeopt.decode.*"]),
    ("models", ["treeopt.models", "treeopt.models.*"]),
    ("drafters", ["treeopt.drafters", "treeopt.drafters.*"]),
    ("api", ["treeopt.api", "treeopt.chat", "treeopt.testing"]),
    ("measure", ["treeopt.profile.acceptance", "treeopt.profile.latency",
                 "treeopt.profile.quality", "treeopt.profile.calibrate", "treeopt.profile.copy",
                 "treeopt.profile.replay",
                 "treeopt.search.optuna_search", "treeopt.bench", "treeopt.bench.*"]),
    ("pipeline", ["treeopt.search.api", "treeopt.tuning", "treeopt.tune_dtypes",
                  "treeopt.pipeline",
                  "treeopt.evaluate", "treeopt.evaluate.*"]),
    ("cli", ["treeopt.cli", "treeopt.cli.*", "treeopt.__main__"]),
]

# Imports that go up on purpose, each with its reason.
ALLOWED_UPWARD = {
    ("treeopt", "treeopt.tree"): "the package facade: treeopt.Tree",
    ("treeopt", "treeopt.search"): "the package facade: parent of treeopt.search.api",
    ("treeopt", "treeopt.api"): "the package facade: treeopt.generate, loaded on first use",
    ("treeopt", "treeopt.search.api"): "the package facade: treeopt.search_tree",
    ("treeopt", "treeopt.tuning"): "the package facade: treeopt.tune",
    ("treeopt.decode.drafter", "treeopt.drafters"): "the drafter registry loads the built-in "
    "drafters as it loads plugins: the interface never names an implementation",
}
# At most this many function-local imports of treeopt modules, each marked ``# lazy: why``.
MAX_LOCAL_IMPORTS = 40


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The treeopt modules one import statement (or importlib call) loads."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
            and node.module.split(".")[0] == "treeopt":
        out = []
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            out.append(sub if sub in modules else node.module)
        return out
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "treeopt"]
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
            and node.args and isinstance(node.args[0], ast.Constant) \
            and str(node.args[0].value).startswith("treeopt"):
        return [str(node.args[0].value)]
    return []


def _parents(name: str, modules: dict[str, Path]) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in modules]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> treeopt modules it imports, function-local imports as (module, line, text))."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: list[tuple[str, int, str]] = []
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside.update(id(n) for n in ast.walk(fn))
        for node in ast.walk(tree):
            targets = _targets(node, modules)
            for target in targets:
                for dep in [target, *_parents(target, modules)]:
                    if dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
            if targets and id(node) in inside and not isinstance(node, ast.Call):
                local.append((name, node.lineno, lines[node.lineno - 1].strip()))
    return graph, local


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to one")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module) and (module, dep) not in ALLOWED_UPWARD:
                out.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
    return out


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_cycle():
    """The allowed upward imports run on first use, never while a module loads: they close
    no cycle at import time and are left out here; every other edge counts."""
    graph, _ = import_graph()
    for module, dep in ALLOWED_UPWARD:
        graph[module].discard(dep)
    assert cycles(graph) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    graph, _ = import_graph()
    assert upward_imports(graph) == []


def test_function_local_imports_are_few_and_say_why():
    _, local = import_graph()
    assert len(local) <= MAX_LOCAL_IMPORTS, local
    unexplained = [x for x in local if "# lazy:" not in x[2]]
    assert unexplained == []


def test_allowed_upward_imports_exist():
    """An exception that no longer happens is removed from the list, not kept."""
    graph, _ = import_graph()
    for module, dep in ALLOWED_UPWARD:
        assert dep in graph[module], (module, dep)


# ---------------------------------------------------------------- the checks can fail
def test_checks_catch_a_cycle_and_an_upward_import():
    graph = {"treeopt.tree": {"treeopt.decode.engine"}, "treeopt.decode.engine": {"treeopt.tree"},
             "treeopt.errors": set()}
    assert cycles(graph) == [["treeopt.decode.engine", "treeopt.tree"]]
    assert upward_imports(graph) == [
        "treeopt.tree (core types) imports treeopt.decode.engine (decode)"]


def test_function_local_and_importlib_imports_are_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "treeopt"
    (pkg / "decode").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "decode" / "__init__.py").write_text("")
    (pkg / "tree.py").write_text("def f():\n    from treeopt.decode import engine\n")
    (pkg / "errors.py").write_text("import importlib\n"
                                   "def g():\n    importlib.import_module('treeopt.tree')\n")
    (pkg / "decode" / "engine.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph, local = import_graph()
    assert "treeopt.decode.engine" in graph["treeopt.tree"]
    assert "treeopt.tree" in graph["treeopt.errors"]
    assert [x[:2] for x in local] == [("treeopt.tree", 2)]
    assert upward_imports(graph) == [
        "treeopt.errors (base) imports treeopt.tree (core types)",
        "treeopt.tree (core types) imports treeopt.decode (decode)",
        "treeopt.tree (core types) imports treeopt.decode.engine (decode)"]


def test_public_functions_take_few_parameters():
    """Settings travel as objects (Sampling, SearchSettings, ...), not as dozens of keywords:
    no public function or method of the package takes more than 12 parameters."""
    wide = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not node.name.startswith("_"):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                if params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                if len(params) > 12:
                    wide.append(f"{name}.{node.name}: {len(params)}")
    assert wide == []


def test_no_test_file_imports_another():
    """Shared test helpers live in ``tests/helpers.py`` (and ``tests/lossless.py``), never in a
    test file another one imports."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert offenders == []
