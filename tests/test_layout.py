"""The library (kvlib/) and the paper's experiments (kvlib/experiments/) stay apart: the library never imports the
experiments; only the console script reaches them, inside the command that runs the notebooks. The package
itself is cheap to import: its names load lazily from their submodules. Its import graph has no circle and few
floors, and a module imports another inside a function only for a reason written beside it."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvlib

PACKAGE = Path(kvlib.__file__).parent
# the one way from the library into the experiments: `kvlib reproduce` hands over to the notebook runner
ALLOWED = {("cli", "_reproduce")}


def _experiment_imports(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function or "<module>", line)`` of every import of kvlib.experiments in a library module."""
    found = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else where
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                absolute = child.level == 0 and module.split(".")[:2] == ["kvlib", "experiments"]
                relative = child.level == 1 and (module.split(".")[0] == "experiments"
                                                 or (not module and any(a.name == "experiments" for a in child.names)))
                if absolute or relative:
                    found.append((where, child.lineno))
            elif isinstance(child, ast.Import):
                if any(a.name.split(".")[:2] == ["kvlib", "experiments"] for a in child.names):
                    found.append((where, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def _library_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "experiments" not in p.relative_to(PACKAGE).parts]


def test_the_library_never_imports_the_experiments():
    bad = [f"kvlib/{p.relative_to(PACKAGE)}:{line} ({where})" for p in _library_files()
           for where, line in _experiment_imports(p)
           if (p.relative_to(PACKAGE).with_suffix("").as_posix(), where) not in ALLOWED]
    assert not bad, f"library modules import kvlib.experiments: {bad}"
    assert [where for where, _ in _experiment_imports(PACKAGE / "cli.py")] == ["_reproduce"]


def test_importing_the_library_loads_no_experiment():
    modules = [_module(p) for p in _library_files()]
    code = (f"import sys, kvlib, kvlib.cli; import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('kvlib.experiments')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_exports_library_names_only():
    """Every name ``kvlib`` re-exports is defined in a library module."""
    from_experiments = [name for name in kvlib.__all__
                        if (getattr(getattr(kvlib, name), "__module__", None) or "").startswith("kvlib.experiments")]
    assert not from_experiments, f"kvlib re-exports experiment names: {from_experiments}"


def test_importing_kvlib_loads_no_heavy_module():
    """``import kvlib`` (and the console script's parser, so ``kvlib --help``) load neither torch, transformers
    nor pandas: the package's names load on first use."""
    code = ("import sys, kvlib, kvlib.cli; kvlib.cli._parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_from_the_module_that_defines_it():
    """Each name of ``kvlib.__all__`` loads lazily from its submodule (the same object as there), the lazy map
    and the type-checking imports name exactly ``__all__``, and ``dir(kvlib)`` lists them all."""
    import importlib

    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    typed = {a.asname or a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.level == 1 for a in node.names}
    assert len(kvlib.__all__) == len(set(kvlib.__all__))
    assert kvlib._WHERE == typed and set(typed) == set(kvlib.__all__)
    for name in kvlib.__all__:
        assert getattr(kvlib, name) is getattr(importlib.import_module(f"kvlib.{typed[name]}"), name), name
    scope: dict = {}
    exec(f"from kvlib import {', '.join(kvlib.__all__)}", scope)
    assert all(scope[name] is getattr(kvlib, name) for name in kvlib.__all__)
    assert set(kvlib.__all__) | {m.split(".")[0] for m in kvlib._SUBMODULES} <= set(dir(kvlib))
    assert kvlib.runs.store.ResultStore is kvlib.ResultStore  # submodules are attributes, as when the package was eager
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        kvlib.no_such_name


def test_only_the_cache_module_calls_the_model_with_a_cache():
    """Every loop goes through :func:`kvlib.core.cache.forward` / :func:`~kvlib.core.cache.step_logits`: no other
    library
    module builds a ``DynamicCache``, passes ``logits_to_keep`` or names the cache keyword."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cache.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if fn in ("DynamicCache", "cache_kwargs") or any(k.arg == "logits_to_keep" for k in node.keywords
                                                                  if fn not in ("prefill", "forward")):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {fn}")
    assert offenders == [], offenders


MAX_FLOORS = 9


def _module(path: Path) -> str:
    parts = ("kvlib", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kvlib_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported kvlib module, line, inside a function?)`` of every kvlib import of ``path`` outside
    ``if TYPE_CHECKING:`` blocks; ``from .x import name`` counts as an import of ``.x.name`` when that is a module."""
    here = _module(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                base = ".".join(here[: len(here) - child.level + 1] + ([child.module] if child.module else [])) \
                    if child.level else (child.module or "")
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else base
                    found.append((target, child.lineno, local))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(t, line, local) for t, line, local in found if t.split(".")[0] == "kvlib"]


def _graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (the lazy ``kvlib/__init__.py`` is left out)."""
    files = {_module(p): p for p in _library_files() if p != PACKAGE / "__init__.py"}
    return {m: {t for t, _, _ in _kvlib_imports(p) if t in files and t != m} for m, p in files.items()}


def test_the_import_graph_has_no_circle_and_few_floors():
    """A reader climbs the library from :mod:`kvlib.core.cache` up without meeting a module twice: no import circle
    (``graphlib`` names one), and at most ``MAX_FLOORS`` modules on the longest chain of imports."""
    import graphlib

    graph = _graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")
    floor: dict[str, int] = {}
    for m in order:  # imports come first
        floor[m] = 1 + max((floor[t] for t in graph.get(m, ())), default=0)
    top = max(floor, key=floor.get)
    chain = [top]
    while graph.get(chain[-1]):
        chain.append(max(graph[chain[-1]], key=floor.get))
    assert floor[top] <= MAX_FLOORS, f"{floor[top]} floors: {' -> '.join(chain)}"


# function-local imports of kvlib modules, each for a reason: (module, imported module) -> why
LOCAL_IMPORTS = {
    ("kvlib.cli", "kvlib.experiments.pipeline"): "the one way into the experiments (`kvlib reproduce`)",
    ("kvlib.cli", "kvlib.core.memory"): "torch: `kvlib --help` answers at once",
    ("kvlib.core.models", "kvlib.core.memory"): "torch: the console script imports kvlib.core.models",
    ("kvlib.core.models", "kvlib.profiles"): "the console script imports kvlib.core.models",
    ("kvlib.core.models", "kvlib.core.tiny"): "torch and transformers: the console script imports kvlib.core.models",
    ("kvlib.core.model_info", "kvlib.core.memory"): "torch: the console script imports kvlib.core.model_info",
    (
        "kvlib.core.model_info",
        "kvlib.core.tiny",
    ): "torch and transformers: the console script imports kvlib.core.model_info",
}


def test_library_modules_import_inside_functions_only_for_a_reason():
    """A function-local import hides an arrow of the import graph: only those of :data:`LOCAL_IMPORTS` (a heavy
    module kept out of ``kvlib --help``, the hand-over to the experiments) are allowed."""
    found = {(_module(p), t): f"kvlib/{p.relative_to(PACKAGE)}:{line}" for p in _library_files()
             for t, line, local in _kvlib_imports(p) if local}
    unexplained = sorted(where for key, where in found.items() if key not in LOCAL_IMPORTS)
    assert not unexplained, f"function-local kvlib imports without a reason in LOCAL_IMPORTS: {unexplained}"


# ----- the floor plan (kvlib/__init__.py's docstring) -----
def _floor_plan() -> dict[str, set[str]]:
    """group -> the groups it may import, read from the table of ``kvlib.__doc__``."""
    lines = kvlib.__doc__.split("Floor plan", 1)[1].splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"=", " "}]
    plan = {}
    for line in lines[rules[1] + 1:rules[2]]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 2:
            plan[cells[0]] = set() if cells[-1] == "-" else set(cells[-1].split(", "))
    return plan


def test_every_group_imports_only_what_the_floor_plan_allows():
    """The library's modules sit in the groups of the floor plan (plus a handful at the top); a group imports
    itself, the groups the plan lists for it, and ``kvlib.profiles``."""
    plan = _floor_plan()
    assert set(plan) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"experiments"}
    top = {p.stem for p in PACKAGE.glob("*.py") if "sys.modules[__name__] = " not in p.read_text(encoding="utf-8")}
    assert top <= {"__init__", "cli", "profiles"}, f"modules at kvlib/'s top level: {sorted(top)}"
    bad = []
    for module, targets in _graph().items():
        group = module.split(".")[1]
        if group not in plan:
            continue
        for target in targets:
            other = target.split(".")[1]
            if other != group and other != "profiles" and other not in plan[group]:
                bad.append(f"{module} -> {target}")
    assert not bad, f"imports against the floor plan: {bad}"
