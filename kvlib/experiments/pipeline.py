"""Execute every numbered notebook headlessly with papermill, in order.

``python -m kvlib.experiments.pipeline --profile small [--model NAME] [--data-dir DIR] [--only 03]``

Each notebook runs with its working directory set to ``notebooks/`` (as in JupyterLab) and the
parameters ``PROFILE``, ``MODEL``, ``DATA_DIR``; the executed copy is kept in ``build/executed/``.
A failing cell stops the run with a non-zero exit naming the notebook and the cell, numbered as in the
source notebook (papermill inserts a cell with the injected parameters; that shift is undone). A kernel
that dies (most often killed by the system for running out of memory) is reported as such, with what to
try next, instead of a traceback. Before each notebook the runner says how long the rest should take,
from the durations it recorded last time (``tables/timings/notebooks.csv``, one row per profile, model and
notebook); inside a notebook every long loop shows a progress bar with its own estimate.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["notebooks", "run_notebook", "update_readme", "main", "NotebookError", "KernelDiedError",
           "source_cell_index", "read_times", "record_time", "time_left"]

_log = logging.getLogger("kvlib.experiments.pipeline")  # not __name__: "__main__" under python -m

ROOT = Path(__file__).resolve().parents[2]  # the source checkout, two levels above kvlib/experiments/
_INJECTED = "injected-parameters"
_ERROR_MARKER = "papermill-error-cell-tag"


class NotebookError(RuntimeError):
    """A notebook run failed. ``notebook``: its file name; ``cell``: the failing cell's index in the source
    notebook (0-based, markdown cells counted; ``None`` when unknown); ``executed``: the executed copy."""

    def __init__(self, message: str, notebook: str, cell: int | None, executed: Path):
        super().__init__(message)
        self.notebook, self.cell, self.executed = notebook, cell, executed


class KernelDiedError(NotebookError):
    """The notebook's kernel died (killed by a signal, most often for running out of memory)."""


def notebooks(root: Path = ROOT) -> list[Path]:
    """The numbered notebooks ``notebooks/NN_*.ipynb`` in order."""
    return sorted(p for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def source_cell_index(source_nb, executed_nb, index: int) -> int | None:
    """Index in ``source_nb`` of cell ``index`` of ``executed_nb`` (papermill's output, which holds an extra
    ``injected-parameters`` cell). Cells are matched by id, else by position with injected cells not counted;
    ``None`` for an injected cell itself."""
    cell = executed_nb.cells[index]
    if _INJECTED in cell.get("metadata", {}).get("tags", []):
        return None
    ids = [c.get("id") for c in source_nb.cells]
    if cell.get("id") and ids.count(cell.get("id")) == 1:
        return ids.index(cell.get("id"))
    return index - sum(_INJECTED in c.get("metadata", {}).get("tags", []) for c in executed_nb.cells[:index])


def _describe_cell(source_nb, index: int | None) -> str:
    if index is None:
        return "the injected parameters cell (check the parameter values)"
    first = next((ln.strip() for ln in source_nb.cells[index].source.splitlines() if ln.strip()), "")
    return f"cell {index} (source index from 0, markdown cells counted; it starts {first[:70]!r})"


def _running_cell(out: Path):
    """``(executed copy, index of the last cell papermill started in it)``: the cell a dead kernel was running
    (``(None, None)`` when the copy cannot be read or no cell started)."""
    import nbformat

    try:
        nb = nbformat.read(out, as_version=4)
    except Exception:  # no copy: the kernel died before the first cell was saved
        return None, None
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    return nb, (started[-1] if started else None)


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel_name: str = "python3") -> Path:
    """Run one notebook with papermill; the executed copy goes to ``out_dir/<name>``.

    Raises:
        NotebookError: a cell raised; the message names the notebook, the cell (as numbered in the source
            notebook), the error and the executed copy.
        KernelDiedError: the kernel died (e.g. killed for running out of memory); the message says so and
            suggests a smaller profile or batch size.
    """
    import nbformat
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    source = nbformat.read(path, as_version=4)
    # matplotlib stamps PDFs with this date instead of now: unchanged figures give unchanged files
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    try:
        pm.execute_notebook(
            str(path), str(out), parameters=parameters, cwd=str(path.parent), kernel_name=kernel_name,
            progress_bar=False, log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as err:
        executed = nbformat.read(out, as_version=4)
        # err.cell_index counts the cells before papermill added its error-marker cells to the copy
        executed.cells = [c for c in executed.cells if _ERROR_MARKER not in c.get("metadata", {}).get("tags", [])]
        index = source_cell_index(source, executed, err.cell_index)
        raise NotebookError(
            f"{path.name}: {_describe_cell(source, index)} failed with {err.ename}: {err.evalue}\n"
            f"  executed copy with the traceback: {out}", path.name, index, out) from None
    except DeadKernelError as err:
        executed, running = _running_cell(out)
        index = source_cell_index(source, executed, running) if running is not None else None
        where = _describe_cell(source, index) if running is not None else "the notebook"
        raise KernelDiedError(
            f"{path.name}: the kernel died while running {where} ({str(err).strip() or 'no message'}). The most "
            f"likely cause is memory: the system kills a process that exhausts RAM (or GPU memory). Run it again "
            f"with a smaller PROFILE (e.g. PROFILE=small, or SMOKE=True to check the code path), a profile with a "
            f"smaller batch_size, or a smaller MODEL, and close other memory-hungry programs.\n"
            f"  executed copy up to that cell: {out}", path.name, index, out) from None
    return out


_TABLE = re.compile(r"(<!-- table: *(?P<name>[\w.-]+(?:/[\w.-]+)*) *-->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def update_readme(root: Path = ROOT) -> list[str]:
    """Copy each generated ``tables/NAME.md`` into README.md between ``<!-- table: NAME -->`` and
    ``<!-- /table -->``, so the README never holds a typed number. ``NAME`` may name a subfolder, e.g.
    ``timings/coe_cost`` (wall-clock columns, see :func:`kvlib.experiments.report.save_table`). Returns the
    names filled in."""
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    filled = []

    def fill(m: re.Match) -> str:
        path = root / "tables" / f"{m['name']}.md"
        if not path.exists():
            return m.group(0)
        filled.append(m["name"])
        return m.group(1) + path.read_text(encoding="utf-8").strip() + "\n" + m.group(4)

    readme.write_text(_TABLE.sub(fill, text), encoding="utf-8")
    return filled


NOTEBOOK_TIMES = Path("tables") / "timings" / "notebooks.csv"


def read_times(path: Path) -> dict[tuple[str, str, str], float]:
    """``{(profile, model, notebook): seconds}`` of the last recorded run of each notebook (empty if none)."""
    import csv

    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {(r["profile"], r["model"], r["notebook"]): float(r["seconds"]) for r in csv.DictReader(f)}


def record_time(path: Path, profile: str, model: str, notebook: str, seconds: float) -> None:
    """Store the duration of a notebook run (one row per profile, model and notebook; the latest wins)."""
    import csv

    times = read_times(path)
    times[(profile, model, notebook)] = round(seconds, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["profile", "model", "notebook", "seconds"])
        for key in sorted(times):
            w.writerow([*key, times[key]])


def time_left(times: dict, profile: str, model: str, names: list[str]) -> str:
    """``"about 12 min"`` for notebooks ``names`` from their last recorded durations, or what is unknown."""
    known = [times[(profile, model, n)] for n in names if (profile, model, n) in times]
    if not names:
        return "nothing"
    if not known:
        return "unknown (no earlier run of this profile and model recorded)"
    note = "" if len(known) == len(names) else f" for the {len(known)} of {len(names)} notebooks timed before"
    return f"about {sum(known) / 60:.0f} min{note}"


def _disk_note(profile: str, model: str) -> str:
    """The profile's estimated store size for ``model`` (:mod:`kvlib.experiments.disk`), or why there is none."""
    from ..model_info import describe_model
    from ..memory import load_config
    from ..profiles import get_profile
    from .disk import describe, estimate_disk

    try:
        _, config = describe_model(model)
    except (ValueError, OSError) as err:
        return f"no estimate ({err})"
    if config is None:
        return "no estimate (the model's config is not readable here yet)"
    return describe(estimate_disk(get_profile(profile), load_config(config)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--model", default="")
    ap.add_argument("--data-dir", default="", help="folder with theoremqa_test.json, amazon_counterfactual/, ...")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    ap.add_argument("--out", default=str(ROOT / "build" / "executed"))
    ap.add_argument("--dry-run", action="store_true",
                    help="only say which notebooks would run and how long they took last time")
    ap.add_argument("--publish", action="store_true",
                    help="copy each executed notebook's outputs into notebooks/ (the committed copies show them)")
    args = ap.parse_args(argv)
    _show_log()

    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    todo = [p for p in notebooks() if not args.only or p.name[:2] in args.only]
    if not todo:
        _log.error("no notebooks matched")
        return 2
    params = {"PROFILE": args.profile, "MODEL": args.model, "DATA_DIR": data_dir}
    from ..profiles import get_profile

    model = args.model or get_profile(args.profile).model
    scratch = get_profile(args.profile).scratch
    times_path = ROOT / ("build" / Path(args.profile) / "timings.csv" if scratch else NOTEBOOK_TIMES)
    times = read_times(times_path)
    _log.info("%d notebook(s) to run (%s), profile %s, model %s; time they took last time: %s", len(todo),
              ", ".join(p.name for p in todo), args.profile, model,
              time_left(times, args.profile, model, [p.name for p in todo]))
    _log.info("disk: %s", _disk_note(args.profile, model))
    if args.dry_run:
        return 0
    t_all = time.perf_counter()
    for k, path in enumerate(todo):
        t0 = time.perf_counter()
        _log.info("==> %s %s; time left for this and the remaining notebooks: %s (last recorded run)", path.name,
                  params, time_left(times, args.profile, model, [p.name for p in todo[k:]]))
        try:
            executed = run_notebook(path, Path(args.out), params)
        except RuntimeError as err:
            _log.error("FAILED: %s", err)
            return 1
        if args.publish:
            from .notebook_outputs import publish_outputs

            publish_outputs(executed, path)
        seconds = time.perf_counter() - t0
        record_time(times_path, args.profile, model, path.name, seconds)
        _log.info("<== %s done in %.0f s", path.name, seconds)
    _log.info("all %d notebooks done in %.1f min", len(todo), (time.perf_counter() - t_all) / 60)
    _log.info("README tables refreshed: %s", ", ".join(update_readme()) or "none")
    return 0


def _show_log() -> None:
    """Show kvlib's log on stderr as plain lines (what the runner and the library report: progress, notices,
    failures); other libraries (papermill, transformers) keep showing their warnings only. Does nothing to a
    root logger that is already configured (beyond letting kvlib's info through)."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("kvlib").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
