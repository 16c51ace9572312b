"""Paths as a reader of a notebook or a log should see them: relative to the repository, or under the variable
that names a root (``$KVLIB_CACHE/qwen2.5-0.5b``), never as an absolute path of the machine that ran it.

:func:`shown_path` gives one path's shown form; :func:`hide_machine_paths` rewrites every such path inside a text
(a cell's printed output), for outputs written before a path reached the code as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["cache_root", "repository_root", "machine_roots", "shown_path", "hide_machine_paths", "machine_paths_in"]


def repository_root() -> Path | None:
    """The checkout kvlib is imported from (the folder holding ``pyproject.toml`` and ``kvlib/``), else the
    nearest such folder above the current directory, else ``None`` (an installed copy run elsewhere)."""
    here = Path(__file__).resolve().parents[2]
    for start in (here, Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "pyproject.toml").is_file() and (parent / "kvlib").is_dir():
                return parent
    return None


def cache_root() -> Path:
    """Where converted models live: ``$KVLIB_CACHE``, else ``$XDG_CACHE_HOME/kvlib`` or ``~/.cache/kvlib``."""
    if os.environ.get("KVLIB_CACHE"):
        return Path(os.environ["KVLIB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kvlib"


def machine_roots() -> list[tuple[Path, str]]:
    """``(absolute root, shown prefix)`` pairs, most specific first: the model cache (``$KVLIB_CACHE``), the
    generation stores (``$KVLIB_RUNS``, when set), the repository (shown relative, ``""``) and the home folder
    (``~``)."""
    roots: list[tuple[Path, str]] = [(cache_root(), "$KVLIB_CACHE")]
    if os.environ.get("KVLIB_RUNS"):
        roots.append((Path(os.environ["KVLIB_RUNS"]).expanduser(), "$KVLIB_RUNS"))
    repo = repository_root()
    if repo is not None:
        roots.append((repo, ""))
    roots.append((Path.home(), "~"))
    out, seen = [], set()
    for root, label in roots:
        for form in (root.absolute(), root.resolve()):  # a root behind a symbolic link is found by either spelling
            if str(form) not in seen and str(form) != "/":
                seen.add(str(form))
                out.append((form, label))
    return sorted(out, key=lambda pair: len(str(pair[0])), reverse=True)


def _join(label: str, rel: str) -> str:
    if not label:
        return rel or "."
    return f"{label}/{rel}" if rel else label


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a reader should see it: ``$KVLIB_CACHE/<rest>`` under the model cache, ``$KVLIB_RUNS/<rest>``
    under a ``KVLIB_RUNS`` folder, relative to the repository inside it (``runs/classifiers/x.safetensors``),
    ``~/<rest>`` under the home folder; a relative path, or one outside all of these, as it is."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    for root, label in machine_roots():
        for form in (p, p.resolve()):
            if form.is_relative_to(root):
                return _join(label, form.relative_to(root).as_posix() if form != root else "")
    return str(path)


def hide_machine_paths(text: str) -> str:
    """``text`` with every absolute path under one of :func:`machine_roots` replaced by its shown form
    (``/home/me/.cache/kvlib/m`` -> ``$KVLIB_CACHE/m``; ``/home/me/kvlib/runs/x`` -> ``runs/x``)."""
    for root, label in machine_roots():
        start = r"(?<![\w.~$/-])" + re.escape(str(root))
        text = re.sub(start + "/", lambda m, label=label: f"{label}/" if label else "", text)
        text = re.sub(start + r"(?![\w-]|\.[\w.-])", lambda m, label=label: label or ".", text)
    return text


def machine_paths_in(text: str, extra_roots=()) -> list[str]:
    """Absolute paths of this machine in ``text``: under one of :func:`machine_roots`, the temporary folder or
    ``extra_roots`` (each found path up to the next space or quote). ``[]`` for text fit to publish."""
    roots = {str(r) for r, _ in machine_roots()} | {tempfile.gettempdir(), *map(str, extra_roots)}
    found = []
    for root in sorted(r for r in roots if len(r.rstrip("/")) > 1):
        pattern = r"(?<![\w.~$/-])" + re.escape(root.rstrip("/")) + r"(?:/[^\s'\"<>`]*)?(?![\w-]|\.[\w.-])"
        found += [m.group(0) for m in re.finditer(pattern, text)]
    return found

