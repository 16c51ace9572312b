"""Wall-clock phases of a run: where the time of a notebook (or any script) goes.

``with phase("generation"): ...`` or ``@phase("generation")`` on a function times a coarse step of the work
(model load, generation, a replay, the hidden-state CoE pass, embedding, probe fitting, compile warm-up ...).
Phases nest: a phase entered inside another is recorded under its full path (``"self-evaluation/generation"``),
so the parent's seconds include the child's. A phase entered directly inside one of the same name (a function
calling itself, e.g. :func:`kvlib.runs.generation.generate` on its share of a launch) is part of it, not a child.
:func:`add` records a time measured elsewhere (the extractors' seconds that generation already sums) as a child
of the current phase.

**GPU work.** CUDA kernels run after the Python call that queues them returns. When torch is loaded and CUDA is
initialised, a phase waits for the current GPU (``torch.cuda.synchronize()``) as it starts and as it ends, so
queued work is counted in the phase that launched it (for a model spread over several GPUs, up to what the current
one waits for). That wait is why phases go around coarse steps only, never around one decoding step: a phase costs
two clock reads, two synchronisations and a few dictionary updates.

**Hand-off.** Every finished phase adds its seconds and one call to a process-wide registry (:func:`totals`). When
the environment variable ``KVLIB_PHASES`` names a file, the phases are also appended to it as JSON lines
(``{"phase": path, "seconds": s, "calls": n}``, one per path) each time an outermost phase ends: so a notebook
kernel, started by the papermill runner (:mod:`kvlib.experiments.pipeline`), hands its phases to the runner
without any notebook code, and a kernel that dies loses at most its running outermost phase. :func:`read` reads
such a file back, summed per path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["ENV", "SEP", "phase", "add", "current", "totals", "reset", "read"]

ENV = "KVLIB_PHASES"  # the file a process appends its finished phases to (JSON lines)
SEP = "/"  # joins a nested phase's path

_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_TOTALS: dict[str, list] = {}  # path -> [seconds, calls], in the order the phases first started
_PENDING: dict[str, list] = {}  # the same, not yet written to $KVLIB_PHASES
_LOCAL = threading.local()  # .stack: the paths of this thread's running phases, outermost first


def _stack() -> list[str]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def _sync() -> None:
    """Wait for the work queued on the current GPU (nothing when torch is not loaded or CUDA not initialised)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _check(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or SEP in name:
        raise ValueError(f"a phase name is a non-empty text without {SEP!r} (nesting makes the path), not {name!r}")


def _register(path: str) -> None:
    with _LOCK:
        _TOTALS.setdefault(path, [0.0, 0])
        _PENDING.setdefault(path, [0.0, 0])


def _finish(path: str, seconds: float, calls: int = 1) -> None:
    with _LOCK:
        for table in (_TOTALS, _PENDING):
            entry = table.setdefault(path, [0.0, 0])
            entry[0] += seconds
            entry[1] += calls


@contextlib.contextmanager
def phase(name: str):
    """Time the enclosed block (or, as a decorator, every call of the function) as phase ``name``, nested under
    the phases running in this thread; see the module docstring."""
    _check(name)
    stack = _stack()
    if stack and stack[-1].rpartition(SEP)[2] == name:  # re-entered: part of the running phase
        yield
        return
    path = f"{stack[-1]}{SEP}{name}" if stack else name
    _register(path)
    _sync()
    stack.append(path)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        seconds = time.perf_counter() - start
        stack.pop()
        _finish(path, seconds)
        if not stack:
            _flush()


def add(name: str, seconds: float, calls: int = 1) -> None:
    """Record ``seconds`` (over ``calls`` calls) measured elsewhere as phase ``name`` inside the current phase
    (at the top level when none runs)."""
    _check(name)
    stack = _stack()
    _finish(f"{stack[-1]}{SEP}{name}" if stack else name, float(seconds), int(calls))
    if not stack:
        _flush()


def current() -> str:
    """The path of this thread's innermost running phase (``""`` when none runs)."""
    stack = _stack()
    return stack[-1] if stack else ""


def totals() -> dict[str, tuple[float, int]]:
    """``{path: (seconds, calls)}`` of every phase finished in this process, in the order they first started."""
    with _LOCK:
        return {p: (s, n) for p, (s, n) in _TOTALS.items() if n}


def reset() -> None:
    """Forget every finished phase of this process (those not yet written to ``$KVLIB_PHASES`` too)."""
    with _LOCK:
        _TOTALS.clear()
        _PENDING.clear()


def _flush() -> None:
    """Append the phases finished since the last flush to ``$KVLIB_PHASES`` (if set), one JSON line per path."""
    with _LOCK:
        done = [(p, s, n) for p, (s, n) in _PENDING.items() if n]
        _PENDING.clear()
    target = os.environ.get(ENV)
    if not target or not done:
        return
    text = "".join(json.dumps({"phase": p, "seconds": round(s, 6), "calls": n}) + "\n" for p, s, n in done)
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:  # timing is never worth failing the work for
        _log.warning("phase timings not written to $%s=%s: %s", ENV, target, err)


def read(path: str | os.PathLike) -> dict[str, tuple[float, int]]:
    """``{path: (seconds, calls)}`` summed over the JSON lines of a ``$KVLIB_PHASES`` file, in the order the paths
    first appear (a parent before its children); ``{}`` for a missing file. A line that is not a whole record (a
    process killed while writing it) is skipped."""
    out: dict[str, list] = {}
    path = Path(path)
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            name, seconds, calls = str(rec["phase"]), float(rec["seconds"]), int(rec["calls"])
        except (ValueError, KeyError, TypeError):
            continue
        entry = out.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += calls
    return {p: (s, n) for p, (s, n) in out.items()}
