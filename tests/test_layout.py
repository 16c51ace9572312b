"""The library (kvlib/) and the paper's experiments (kvlib/experiments/) stay apart: the library never imports the
experiments; only the console script reaches them, inside the command that runs the notebooks. The package
itself is cheap to import: its names load lazily from their submodules."""

import ast
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


def test_the_library_never_imports_the_experiments():
    bad = [f"kvlib/{p.name}:{line} ({where})" for p in sorted(PACKAGE.glob("*.py"))
           for where, line in _experiment_imports(p) if (p.stem, where) not in ALLOWED]
    assert not bad, f"library modules import kvlib.experiments: {bad}"
    assert [where for where, _ in _experiment_imports(PACKAGE / "cli.py")] == ["_reproduce"]


def test_importing_the_library_loads_no_experiment():
    code = ("import sys, kvlib, kvlib.cli; import importlib, pkgutil\n"
            "for m in pkgutil.iter_modules(kvlib.__path__):\n"
            "    if m.name != 'experiments': importlib.import_module('kvlib.' + m.name)\n"
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
    assert set(kvlib.__all__) | set(kvlib._SUBMODULES) <= set(dir(kvlib))
    assert kvlib.store.ResultStore is kvlib.ResultStore  # submodules are attributes, as when the package was eager
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        kvlib.no_such_name


def test_only_the_cache_module_calls_the_model_with_a_cache():
    """Every loop goes through :func:`kvlib.cache.forward` / :func:`~kvlib.cache.step_logits`: no other library
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
