"""Execute every numbered notebook headlessly with papermill, in order.

``python -m kvlib.experiments.pipeline --profile small [--model NAME ...] [--side-by-side] [--data-dir DIR]
[--only 03] [--publish]``

Each notebook runs with its working directory set to ``notebooks/`` (as in JupyterLab) and the
parameters ``PROFILE``, ``MODEL``, ``DATA_DIR`` and ``OUT_DIR``. A run writes only into its run folder under
``build/`` (:meth:`kvlib.profiles.Profile.run_dir`: tables, figures, the executed notebooks in ``notebooks/``
(``notebooks/<model>/`` in the run folder that every model of a profile with ``results_dir`` shares),
``timings.csv``); the committed ``tables/``, ``figures/``, ``notebooks/`` and README change only with
``--publish``, which runs into a ``build/publish/...`` folder and copies what it wrote or changed into place once every
notebook succeeded (all or nothing), and only for the profile and model that produced the committed results
(:data:`kvlib.profiles.COMMITTED`). Two runs of one run folder at once are refused (the second says which
process holds it). An unknown profile or model, or a missing data folder, is refused before any notebook runs.

A failing cell stops the run with a non-zero exit naming the notebook, the cell (numbered as in the source
notebook: papermill inserts a cell with the injected parameters; that shift is undone) and the line of the
cell that failed. A kernel that dies (most often killed by the system for running out of memory) is reported
as such, with what to try next, instead of a traceback. Ctrl-C stops with one line (exit status 130): a rerun
resumes from the stores. Before each notebook the runner says how long the rest should take, from the
durations recorded last time (``tables/timings/notebooks.csv`` for published runs, the run folder's
``timings.csv`` otherwise); inside a notebook every long loop shows a progress bar with its own estimate.

**Where the time goes.** Each notebook's kernel appends the wall-clock phases of the library's coarse steps (model
load, generation, replay, the hidden-state CoE pass, embedding, probe fitting, the switching runs, compile
warm-up: :mod:`kvlib.core.phases`) to the file that ``$KVLIB_PHASES`` names, set by the runner per notebook
(``<executed notebooks>/NN_name.phases.jsonl``); after the notebook the runner sums them into the run's
``timings/phases.csv`` and ``.md`` beside the tables (:func:`record_phases`; ``tables/timings/`` for the small
profile, ``tables/gpu/<model>/timings/`` for the gpu profile), which publishing copies like the other timings.

**Several models.** ``--model A B`` runs each model's notebooks, one model after another (``--side-by-side``:
at the same time, one child process of this runner per model, each with its own run folder, publishing on its
own; a small model leaves a GPU mostly idle, so two at once take less time than one after the other). Each
child's lines start with ``[model]``; its whole output goes to ``build/logs/<profile>/<model>.log``. Every model is
checked before anything runs; one that fails does not stop the others, is named at the end and makes the exit
status non-zero; Ctrl-C stops them all. For a profile with ``results_dir`` the notebooks that line up every
model's tables (:data:`ACROSS_MODELS`: 06) run once, after every model's run succeeded (and published), as the
last model's; not at all when one failed. A run publishes only the files it wrote or changed, so models that
finish at different times all land. Side by side is for one process launch (a launch of several processes runs
the models one after another).

**More than one process.** Launched by ``torchrun --nproc_per_node N -m kvlib.experiments.pipeline ...`` or
``accelerate launch --num_processes N -m kvlib.experiments.pipeline ...`` (they set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``), every process runs every notebook: the kernels inherit ``RANK`` and
``WORLD_SIZE``, so each item loop generates its share of the items (:mod:`kvlib.runs.sharding`) and every rank
then computes the same tables from the merged stores. Where CUDA is visible each process shows its kernels the GPU
of its ``LOCAL_RANK`` alone (``CUDA_VISIBLE_DEVICES``), so a profile's ``"cuda"`` and
:func:`kvlib.runs.sharding.local_device` both name that process's own GPU. Rank 0 alone writes the run folder (or
the publishing stage), records the timings and publishes; rank ``r > 0`` writes its executed notebooks, tables and
figures into a scratch folder of its own in the system's temporary folder (removed once the launch succeeded) and
does not echo its kernels' output. Rank 0 publishes only after every rank finished every notebook (a barrier over
a gloo process group). A rank whose notebook fails says so and exits non-zero; the launcher then stops the other
ranks, each of which says it was stopped and that nothing was published.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["notebooks", "run_notebook", "update_readme", "publish", "main", "NotebookError", "KernelDiedError",
           "RunError", "failing_line", "source_cell_index", "read_times", "record_time", "device_name", "time_left",
           "LaunchStopped", "record_phases", "PHASES"]

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


def _describe_cell(source_nb, index: int | None, line: int | None = None) -> str:
    """``cell N (...)``: the cell as numbered in the source notebook and the line that failed (``line``, 1-based
    in the cell), else the cell's first line."""
    if index is None:
        return "the injected parameters cell (check the parameter values)"
    lines = source_nb.cells[index].source.splitlines()
    if line is not None and 1 <= line <= len(lines) and lines[line - 1].strip():
        return (f"cell {index} (source index from 0, markdown cells counted), line {line}: "
                f"{lines[line - 1].strip()[:100]!r}")
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return f"cell {index} (source index from 0, markdown cells counted; it starts {first[:70]!r})"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failing_line(traceback_lines) -> int | None:
    """The line (1-based, in the cell) at which a cell raised: from IPython's traceback (``Cell In[3], line 2``),
    the cell's own frame (the first one); ``None`` when the traceback does not say."""
    for text in traceback_lines or []:
        m = re.search(r"Cell In\[\d+\], line (\d+)", _ANSI.sub("", str(text)))
        if m:
            return int(m.group(1))
    return None


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


def _mark_not_run(out: Path, nb, running: int) -> None:
    """In the executed copy of a notebook whose kernel died in cell ``running``: that cell failed and the
    cells after it never ran (papermill may have marked them completed); their outputs are dropped."""
    import nbformat

    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {}).get("papermill")
        if i < running or meta is None:
            continue
        meta["status"] = "failed" if i == running else "pending"
        if i > running:
            for key in ("start_time", "end_time", "duration", "exception"):
                meta[key] = None
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
    try:
        nbformat.write(nb, out)
    except OSError:
        pass


def _kernel_manager(log: Path):
    """A kernel manager class whose kernel writes its own stderr (the kernel app's log and what it prints while
    shutting down, e.g. after Ctrl-C) to ``log`` instead of this terminal; cell output still comes through."""
    from jupyter_client.manager import AsyncKernelManager

    class _LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["stderr"] = open(log, "ab")
            try:
                return await super()._async_launch_kernel(kernel_cmd, **kw)
            finally:
                kw["stderr"].close()  # the kernel holds its own copy

    return _LoggedKernelManager


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel_name: str = "python3",
                 echo: bool = True) -> Path:
    """Run one notebook with papermill; the executed copy goes to ``out_dir/<name>``; ``echo=False`` keeps the
    kernel's output out of this terminal (it is in the executed copy all the same).

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
            progress_bar=False, log_output=echo, stdout_file=sys.stdout if echo else None,
            stderr_file=sys.stderr if echo else None,
            kernel_manager_class=_kernel_manager(out.with_suffix(".kernel.log")),
        )
    except pm.PapermillExecutionError as err:
        executed = nbformat.read(out, as_version=4)
        # err.cell_index counts the cells before papermill added its error-marker cells to the copy
        executed.cells = [c for c in executed.cells if _ERROR_MARKER not in c.get("metadata", {}).get("tags", [])]
        index = source_cell_index(source, executed, err.cell_index)
        raise NotebookError(
            f"{path.name}: {_describe_cell(source, index, failing_line(err.traceback))} failed with {err.ename}: "
            f"{err.evalue}\n"
            f"  executed copy with the traceback: {out}", path.name, index, out) from None
    except DeadKernelError as err:
        executed, running = _running_cell(out)
        index = source_cell_index(source, executed, running) if running is not None else None
        if running is not None:
            _mark_not_run(out, executed, running)
        where = _describe_cell(source, index) if running is not None else "the notebook"
        raise KernelDiedError(
            f"{path.name}: the kernel died while running {where} ({str(err).strip() or 'no message'}). The most "
            f"likely cause is memory: the system kills a process that exhausts RAM (or GPU memory). Run it again "
            f"with a smaller PROFILE (e.g. PROFILE=small, or SMOKE=True to check the code path), a profile with a "
            f"smaller batch_size, or a smaller MODEL, and close other memory-hungry programs.\n"
            f"  executed copy up to that cell: {out}; the kernel's own log: {out.with_suffix('.kernel.log')}",
            path.name, index, out) from None
    return out


# NAME: folders and a file name under tables/, each starting with a letter, digit or underscore (no ``..``)
_TABLE = re.compile(r"(<!-- table: *(?P<name>\w[\w.-]*(?:/\w[\w.-]*)*) *-->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def update_readme(root: Path = ROOT) -> list[str]:
    """Copy each generated ``tables/NAME.md`` into README.md between ``<!-- table: NAME -->`` and
    ``<!-- /table -->``, so the README never holds a typed number. ``NAME`` may name a subfolder, e.g.
    ``timings/coe_cost`` (wall-clock columns, see :func:`kvlib.experiments.report.save_table`). Returns the
    names filled in."""
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    filled = []

    tables = (root / "tables").resolve()

    def fill(m: re.Match) -> str:
        path = root / "tables" / f"{m['name']}.md"
        if not path.is_file() or not path.resolve().is_relative_to(tables):  # a link out of tables/ is not followed
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


def record_time(path: Path, profile: str, model: str, notebook: str, seconds: float, device: str = "") -> None:
    """Store the duration of a notebook run and what ran it (``device``: :func:`device_name`; one row per
    profile, model and notebook; the latest wins, rows of a record without a device column keep an empty one)."""
    import csv

    with _exclusive(path, "timing record", "a+", newline="", encoding="utf-8") as f:  # several runs share it
        f.seek(0)
        times = {(r["profile"], r["model"], r["notebook"]): (float(r["seconds"]), r.get("device") or "")
                 for r in csv.DictReader(f)}
        times[(profile, model, notebook)] = (round(seconds, 1), device)
        f.seek(0)
        f.truncate()
        w = csv.writer(f)
        w.writerow(["profile", "model", "notebook", "seconds", "device"])
        for key in sorted(times):
            w.writerow([*key, *times[key]])


def device_name(device: str) -> str:
    """What a run's notebooks ran on, for the timing record: the GPU's name (``"NVIDIA H100 80GB HBM3"``, with
    ``x N`` for several) read from ``nvidia-smi`` (this process never starts CUDA: its memory is the notebooks'),
    or ``"CPU (N cores)"``; ``"cuda"`` where ``nvidia-smi`` cannot tell."""
    import subprocess

    if not str(device).startswith("cuda"):
        return f"CPU ({os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "cuda"
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return "cuda" if not names else names[0] + (f" x {len(names)}" if len(names) > 1 else "")


PHASES = "phases"  # timings/phases.csv and .md in a run's tables folder
_OUTSIDE = "(outside phases)"


def _phase_rows(profile: str, model: str, notebook: str, seconds: float, phases: dict) -> list[dict]:
    """The rows of one notebook: the whole notebook, each phase (``{path: (seconds, calls)}``) and the time outside
    every top-level phase (kernel start, imports, tables, figures), each with its share of the notebook."""
    from ..core.phases import SEP

    top = sum(s for p, (s, _) in phases.items() if SEP not in p)
    first = {p: k for k, p in enumerate(phases)}  # tree order: each phase under its parent, siblings as they came
    tree = sorted(phases, key=lambda p: [first.get(SEP.join(p.split(SEP)[:i]), len(first))
                                         for i in range(1, p.count(SEP) + 2)])
    rows = [("(notebook)", 1, seconds), *((p, phases[p][1], phases[p][0]) for p in tree),
            (_OUTSIDE, "", max(seconds - top, 0.0))]
    return [{"profile": profile, "model": model, "notebook": notebook, "phase": p, "calls": n,
             "seconds": round(s, 2), "share": f"{100 * s / seconds:.1f}%" if seconds > 0 else ""} for p, n, s in rows]


def record_phases(tables: Path, profile: str, model: str, notebook: str, seconds: float, phases_file: Path
                  ) -> list[Path]:
    """Write the phases a notebook's kernel handed over (``phases_file``: its ``$KVLIB_PHASES``, see
    :mod:`kvlib.core.phases`) into ``tables/timings/phases.csv`` and ``.md``: per notebook and phase path the calls
    and seconds summed, and the share of the notebook's ``seconds``. The rows of this profile, model and notebook
    from an earlier run are replaced; those of other notebooks are kept. Returns the paths written."""
    import pandas as pd

    from ..core import phases
    from .report import TIMINGS_DIR

    stem = Path(tables) / TIMINGS_DIR / PHASES
    new = pd.DataFrame(_phase_rows(profile, model, notebook, seconds, phases.read(phases_file))).astype(str)
    csv_path = stem.with_suffix(".csv")
    old = pd.read_csv(csv_path, dtype=str, keep_default_na=False) if csv_path.is_file() else new.iloc[:0]
    keep = old[~((old["profile"] == profile) & (old["model"] == model) & (old["notebook"] == notebook))]
    frame = pd.concat([keep, new], ignore_index=True).sort_values(["profile", "model", "notebook"], kind="stable",
                                                                  ignore_index=True)
    stem.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv_path, index=False)
    runs = frame[["profile", "model"]].drop_duplicates().values.tolist()
    caption = (f"Where each notebook's time goes ({'; '.join(f'profile {p}, model {m}' for p, m in runs)}): "
               "wall-clock seconds and calls of each phase, summed over the notebook; a nested phase (`a/b`) is part "
               f"of its parent's seconds; {_OUTSIDE} is the rest of the notebook (kernel start, imports, tables, "
               "figures). Wall-clock measurements of this run (they vary from run to run).")
    shown = frame.drop(columns=["profile", "model"]) if len(runs) == 1 else frame.copy()
    shown["seconds"] = shown["seconds"].astype(float)
    stem.with_suffix(".md").write_text(f"{caption}\n\n{shown.to_markdown(index=False)}\n", encoding="utf-8")
    return [csv_path, stem.with_suffix(".md")]


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
    from ..core.model_info import describe_model
    from ..core.memory import load_config
    from ..profiles import get_profile
    from .disk import describe, estimate_disk

    try:
        _, config = describe_model(model)
    except (ValueError, OSError) as err:
        return f"no estimate ({err})"
    if config is None:
        return "no estimate (the model's config is not readable here yet)"
    return describe(estimate_disk(get_profile(profile), load_config(config)))


class RunError(RuntimeError):
    """A run that cannot be what was asked (unknown profile or model, missing data folder, --publish of a
    scratch run): one line saying what and what to do, exit status 2, before any notebook runs."""


def _check_request(args) -> tuple:
    """``(profile, data_dir)`` for the runner's arguments, or :class:`RunError` before any notebook runs."""
    from ..profiles import COMMITTED, get_profile

    try:
        profile = get_profile(args.profile).with_model(args.model)
    except ValueError as err:
        raise RunError(f"--profile {args.profile}: {err}") from None
    data_dir = ""
    if args.data_dir:
        path = Path(args.data_dir).expanduser()
        if not path.is_dir():
            raise RunError(f"--data-dir {args.data_dir}: no such folder. Give the folder that holds "
                           "theoremqa_test.json, amazon_counterfactual/, ... (or leave DATA_DIR empty to skip those "
                           "sets)")
        data_dir = str(path.resolve())
    if not profile.model.startswith("random:"):
        from ..core.model_info import describe_model

        try:
            describe_model(profile.model)
        except ValueError as err:
            raise RunError(f"--model: {err}") from None
    if args.publish and not profile.committed:
        pairs = "; ".join(f"profile {p} with {', '.join(m)}" for p, m in COMMITTED.items())
        raise RunError(f"--publish: profile {profile.name} with model {profile.model} did not produce the committed "
                       f"results (those come from {pairs}); run it without --publish: its results go to "
                       f"{profile.run_dir(ROOT).relative_to(ROOT)}/")
    return profile, data_dir


def _staging(profile, stage: Path | None = None) -> Path:
    """The folder of a publishing run (``build/publish/<profile>/<model>/``, or ``stage``): the notebooks write
    there and nothing is copied into the checkout unless every notebook succeeds. It starts from a copy of the
    profile's committed results (``tables/`` and ``figures/``, or their ``results_dir`` subfolders), so a notebook
    that reads earlier results (06 lines up every model) sees them in a partial run (``--only``) too; files the run
    does not change are not copied back."""
    import shutil

    if stage is None:
        stage = _publish_stage(profile)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for kind in ("tables", "figures"):
        src = ROOT / kind / profile.results_dir if profile.results_dir else ROOT / kind
        if src.is_dir():
            shutil.copytree(src, stage / kind / profile.results_dir if profile.results_dir else stage / kind,
                            symlinks=True)
    _write_snapshot(stage)
    return stage


def _publish_stage(profile) -> Path:
    """``build/publish/<profile>/<model>/``: where a publishing run of ``profile`` stages its results."""
    return ROOT / "build" / "publish" / profile.name / _slug(profile.model)


def _claim_stage(args, profile, launch: _Launch) -> str | None:
    """The lock of a publishing run's stage, taken before the stage is emptied (``build/publish/<profile>/
    .<model>.lock``, beside it): a second publishing run of the same profile and model stops at once instead of
    deleting what the first is writing. ``None`` when this process stages nothing (no ``--publish``, a dry run,
    rank > 0)."""
    from ..runs.writer_lock import StoreLockedError, acquire

    if not args.publish or args.dry_run or launch.rank != 0:
        return None
    stage = _publish_stage(profile)
    stage.parent.mkdir(parents=True, exist_ok=True)
    try:
        return acquire(stage.parent / f".{stage.name}.lock", stage)
    except StoreLockedError as err:
        raise RunError(f"{err} (a publishing run stages the results of a profile and model in one folder: run the "
                       "notebooks of both runs in one call, e.g. --only 03 04, or the second one without --publish)"
                       ) from None


SNAPSHOT = "snapshot.json"  # in a publishing stage: {path under the stage: sha256} of the results it started from


def _results(stage: Path):
    """``(path under stage, file)`` of every plain file of ``stage/tables`` and ``stage/figures``."""
    for kind in ("tables", "figures"):
        for f in sorted((stage / kind).rglob("*")):
            if f.is_file() and not f.is_symlink():
                yield f.relative_to(stage).as_posix(), f


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_snapshot(stage: Path) -> None:
    """Record what a publishing stage starts from (:data:`SNAPSHOT`), so :func:`publish` copies back only the files
    this run wrote or changed, never a file another run published since."""
    import json

    (stage / SNAPSHOT).write_text(json.dumps({rel: _digest(f) for rel, f in _results(stage)}, indent=0),
                                  encoding="utf-8")


def _read_snapshot(stage: Path) -> dict[str, str]:
    """The stage's :data:`SNAPSHOT` (empty when it has none: every file then counts as written by the run)."""
    import json

    path = stage / SNAPSHOT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextlib.contextmanager
def _exclusive(path: Path, what: str, mode: str = "a+b", **kw):
    """``path`` opened (created if missing) with ``mode``, under an exclusive ``flock`` (waiting for another
    process that holds it, and saying so): two runs finishing at once take turns at ``what``."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        fcntl = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, **kw) as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.info("waiting for another run's %s to finish (%s)", what, path)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield f  # the lock goes with the file's closing


class LaunchStopped(KeyboardInterrupt):
    """The launcher (torchrun, ``accelerate launch``) stopped this process with SIGTERM: another rank failed."""


class _Launch:
    """This process's place in a launch: ``shard`` (rank and world from ``RANK`` / ``WORLD_SIZE``; rank 0 of 1
    unlaunched) and, for a world above 1, a gloo process group used for one barrier before rank 0 publishes."""

    def __init__(self):
        from ..runs.sharding import current_shard

        try:
            self.shard = current_shard()
        except ValueError as err:
            raise RunError(str(err)) from None
        self.group = False

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world(self) -> int:
        return self.shard.world

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def start(self) -> None:
        """Stop cleanly on the launcher's SIGTERM, show the kernels this rank's GPU alone, join the process
        group (every rank must get here: a rank that cannot stops the launch); once per process."""
        if self.world == 1 or self.group:
            return
        import signal
        from datetime import timedelta

        import torch.distributed as dist

        from ..runs.sharding import _timeout

        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise RunError(f"RANK={self.rank} and WORLD_SIZE={self.world} are set but MASTER_ADDR / MASTER_PORT are "
                           "not: start the runner with torchrun or accelerate launch (they set all four)")

        def stopped(signum, frame):
            raise LaunchStopped()

        signal.signal(signal.SIGTERM, stopped)
        _pin_gpu()
        dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=_timeout()))
        self.group = True

    def all_done(self) -> None:
        """Wait until every rank finished every notebook (``$KVLIB_SHARD_TIMEOUT`` seconds at most)."""
        if self.group:
            import torch.distributed as dist

            try:
                dist.barrier()
            except RuntimeError:  # a rank that failed and exited closes its connections
                raise LaunchStopped() from None

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group = False


def _pin_gpu() -> None:
    """Show this process's kernels the GPU of its ``LOCAL_RANK`` alone (``CUDA_VISIBLE_DEVICES``): a profile's
    ``"cuda"`` is then that GPU, as is :func:`kvlib.runs.sharding.local_device` (``cuda:0``). Nothing without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) == 1:  # the launcher already gave this process one GPU
        return
    if local >= len(gpus):
        raise RunError(f"LOCAL_RANK={local} but this machine shows {len(gpus)} GPU(s): launch at most {len(gpus)} "
                       "processes per machine")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[local]


def _scratch(profile, launch: _Launch, stage: Path, publishing: bool) -> Path:
    """Rank ``r > 0``'s own folder for its executed notebooks, tables and figures (in the system's temporary
    folder, never the stage or the checkout). It starts from the results rank 0's notebooks start from (the
    committed ones when publishing, else a copy of the run folder's), so every rank's notebooks read the same
    inputs."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"kvlib-rank{launch.rank}-of-{launch.world}-"))
    if publishing:
        return _staging(profile, scratch)
    for kind in ("tables", "figures"):
        if (stage / kind).is_dir():
            try:
                shutil.copytree(stage / kind, scratch / kind, symlinks=True, dirs_exist_ok=True,
                                ignore_dangling_symlinks=True)
            except shutil.Error:  # a file rank 0 is replacing right now: this run writes it anew anyway
                pass
    return scratch


def _replace_if_changed(src: Path, dest: Path) -> bool:
    """Copy ``src`` over ``dest`` (atomically: a temporary file renamed) unless they already hold the same bytes."""
    data = src.read_bytes()
    if dest.is_file() and dest.read_bytes() == data:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return True


def publish(stage: Path, executed: list[tuple[Path, Path]], times: dict, root: Path | None = None,
            notebooks_dir: str | Path = "") -> list[str]:
    """Copy a finished run's results into the checkout: the files of ``stage/tables`` and ``stage/figures`` that
    the run wrote or changed (those that differ from the stage's :data:`SNAPSHOT`; a file the run left as it
    found it is never copied back, so a run does not undo what another run of the profile published meanwhile)
    over ``tables/`` and ``figures/``, each executed notebook's outputs into its source (``executed``:
    ``(executed copy, source)`` pairs) or, with ``notebooks_dir`` (e.g. ``gpu/qwen2.5-1.5b``: a profile whose
    results sit apart per model), into a copy of it at ``notebooks/<notebooks_dir>/``, the notebook timings
    (``times``: ``{(profile, model, notebook): (seconds, device)}``, or bare seconds) into
    :data:`NOTEBOOK_TIMES`, then the README tables from the checkout's tables. Every notebook's outputs are
    checked before anything is written; two runs that publish at once take turns.
    Returns the README tables filled in."""
    root = ROOT if root is None else root
    with _exclusive(root / "build" / ".kvlib-publish.lock", "publishing"):
        changed = _copy_back(stage, executed, root, notebooks_dir)
        for (profile, model, name), took in times.items():
            seconds, device = took if isinstance(took, tuple) else (took, "")
            record_time(root / NOTEBOOK_TIMES, profile, model, name, seconds, device)
        _log.info("published into tables/, figures/ and notebooks/ (%d file(s) changed)", changed)
        return update_readme(root)


def _copy_back(stage: Path, executed: list[tuple[Path, Path]], root: Path, notebooks_dir: str | Path) -> int:
    """:func:`publish`'s copies (the notebooks' outputs checked first); returns how many files changed."""
    import shutil
    import tempfile

    from .notebook_outputs import publish_outputs

    snapshot = _read_snapshot(stage)
    with tempfile.TemporaryDirectory() as tmp:  # all outputs first, into copies: a mismatch changes nothing
        ready = []
        for ex, src in executed:
            copy = Path(tmp) / src.name
            shutil.copyfile(src, copy)
            publish_outputs(ex, copy)
            ready.append((copy, src.parent / notebooks_dir / src.name if notebooks_dir else src))
        changed = 0
        for rel, f in _results(stage):
            if rel not in snapshot or snapshot[rel] != _digest(f):  # written or changed by this run
                changed += _replace_if_changed(f, root / rel)
        for copy, src in ready:
            changed += _replace_if_changed(copy, src)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--model", nargs="+", default=[], metavar="MODEL",
                    help="the model (default: the profile's); several models run one after another, or with "
                    "--side-by-side at the same time")
    ap.add_argument("--data-dir", default="", help="folder with theoremqa_test.json, amazon_counterfactual/, ...")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    ap.add_argument("--out", default="", help="where the executed notebooks go (default: the run folder's notebooks/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="only say which notebooks would run and how long they took last time")
    ap.add_argument("--publish", action="store_true",
                    help="after every notebook succeeded, copy the run's tables, figures and notebook outputs into "
                    "tables/, figures/, notebooks/ and the README (only for the profile and model of the committed "
                    "results)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="with several models: run them at the same time, one child process each (one process "
                    "launch only; each one's lines start with its name, its whole output goes to "
                    "build/logs/<profile>/<model>.log)")
    args = ap.parse_args(argv)
    try:
        launch = _Launch()
    except RunError as err:
        _show_log()
        _log.error("kvlib: %s", err)
        return 2
    _show_log(f"[{launch}] " if launch.world > 1 else "")
    try:
        if len(args.model) > 1:
            return _several_models(args, launch)
        args.model = args.model[0] if args.model else ""
        return _main(args, launch)
    except RunError as err:
        _log.error("kvlib: %s", err)
        return 2
    except LaunchStopped:
        _log.error("stopped by the launcher: another process of this launch failed (its error is above, and the "
                   "launcher's summary names its rank) or the launch was interrupted. Nothing was published; every "
                   "finished item is kept in the stores: fix the cause and launch the same command again to resume")
        return 1
    except KeyboardInterrupt:
        _log.error("\ninterrupted: every finished item is kept in the stores; run the same command again to resume")
        return 130
    finally:
        launch.close()


def _stage_of(args, profile, launch: _Launch) -> Path:
    """Where this process's notebooks write: the run folder (or the publish stage) on rank 0, a scratch folder of
    its own on any other rank."""
    if args.dry_run:
        return profile.run_dir(ROOT)
    if launch.rank != 0:
        return _scratch(profile, launch, profile.run_dir(ROOT), args.publish)
    return _staging(profile) if args.publish else profile.run_dir(ROOT)


def _announce(args, profile, launch: _Launch, stage: Path, todo: list[Path], times: dict) -> None:
    model = profile.model
    _log.info("%d notebook(s) to run (%s), profile %s, model %s; time they took last time: %s", len(todo),
              ", ".join(p.name for p in todo), args.profile, model,
              time_left(times, args.profile, model, [p.name for p in todo]))
    if launch.rank != 0:
        import tempfile

        _log.info("this rank generates its share of every item loop; its executed notebooks and tables go to the "
                  "scratch folder %s (rank 0 writes the results)",
                  f"of its own under {tempfile.gettempdir()}" if args.dry_run else stage)
        return
    _log.info("disk: %s", _disk_note(args.profile, model))
    _log.info("results go to %s%s%s", stage, " (copied into tables/, figures/, notebooks/ and the README once "
              "every notebook succeeded)" if args.publish else " (a scratch run: the committed results are not "
              "touched)", f"; {launch.world} processes share every item loop" if launch.world > 1 else "")


def _run_all(args, profile, data_dir: str, launch: _Launch, stage: Path, out_dir: Path, todo: list[Path],
             times: dict) -> tuple[list[tuple[Path, Path]], dict] | None:
    """Every notebook of ``todo`` in turn: ``(executed, this run's times)``, or ``None`` when one failed."""
    lead, model = launch.rank == 0, profile.model
    params = {"PROFILE": args.profile, "MODEL": args.model, "DATA_DIR": data_dir,
              "OUT_DIR": str(stage)}
    executed, this_run = [], {}
    from ..profiles import resolve_device

    try:
        device = device_name(resolve_device(profile.device))
    except RuntimeError:  # CUDA asked for and absent: the notebook says so, the record keeps what was asked
        device = str(profile.device)
    for k, path in enumerate(todo):
        t0 = time.perf_counter()
        _log.info("==> %s %s; time left for this and the remaining notebooks: %s (last recorded run)",
                  path.name, params, time_left(times, args.profile, model, [p.name for p in todo[k:]]))
        phases_file = out_dir / f"{path.stem}.phases.jsonl"  # what the kernel's phases append to
        phases_file.unlink(missing_ok=True)
        try:
            with _environ(KVLIB_PHASES=str(phases_file)):
                executed.append((run_notebook(path, out_dir, params, echo=lead), path))
        except RuntimeError as err:
            _log.error("FAILED: %s", err)
            if launch.world > 1:
                _log.error("%s failed, so the launch fails: the launcher stops the other ranks (kept for a look: "
                           "%s)", launch, stage)
            if args.publish:
                _log.error("nothing was published: tables/, figures/, notebooks/ and the README are unchanged "
                           "(this run's results so far are in %s)", stage)
            return None
        seconds = time.perf_counter() - t0
        if lead:
            record_time(stage / "timings.csv", args.profile, model, path.name, seconds, device)
            try:
                record_phases(profile.output_dirs(stage)[0], args.profile, model, path.name, seconds, phases_file)
            except (OSError, KeyError, ValueError) as err:  # a timing table is never worth failing the run for
                _log.warning("%s: its phases were not recorded (%s: %s)", path.name, type(err).__name__, err)
        this_run[(args.profile, model, path.name)] = (round(seconds, 1), device)
        _log.info("<== %s done in %.0f s", path.name, seconds)
    return executed, this_run


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables (which a notebook's kernel inherits) for the enclosed block, then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _todo(only: list[str] | None) -> list[Path]:
    """The notebooks to run: those whose number is in ``only`` (every one without it)."""
    todo = [p for p in notebooks() if not only or p.name[:2] in only]
    if not todo:
        raise RunError(f"--only {' '.join(only or [])}: no notebooks matched in {ROOT / 'notebooks'}")
    return todo


def _main(args, launch: _Launch | None = None) -> int:
    from ..runs.writer_lock import release

    launch = _Launch() if launch is None else launch
    todo = _todo(args.only)
    profile, data_dir = _check_request(args)
    lead = launch.rank == 0  # writes the run folder, the timings and publishes; other ranks write a scratch folder
    claim = _claim_stage(args, profile, launch)
    try:
        return _run_claimed(args, profile, data_dir, launch, todo, lead)
    finally:
        if claim is not None:
            release(claim)


def _run_claimed(args, profile, data_dir: str, launch: _Launch, todo: list[Path], lead: bool) -> int:
    from ..runs.writer_lock import StoreLockedError, acquire, release

    stage = _stage_of(args, profile, launch)
    out_dir = Path(args.out) if args.out and lead else stage / "notebooks"
    if not args.out and profile.results_dir and not args.publish:  # one run folder for every model of the profile
        out_dir = out_dir / _slug(profile.model)
    last = stage / "timings.csv" if lead else profile.run_dir(ROOT) / "timings.csv"  # rank r > 0: rank 0's record
    times = {**read_times(ROOT / NOTEBOOK_TIMES), **read_times(last)}
    _announce(args, profile, launch, stage, todo, times)
    if args.dry_run:
        return 0
    launch.start()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # one run per executed-notebook folder: two would write the same copies
        lock = acquire(out_dir / ".kvlib-run.lock", out_dir)
    except StoreLockedError as err:
        raise RunError(f"{err} (or give this run another --out)") from None
    try:
        t_all = time.perf_counter()
        ran = _run_all(args, profile, data_dir, launch, stage, out_dir, todo, times)
        if ran is None:
            return 1
        executed, this_run = ran
        if launch.world > 1:
            _log.info("waiting for every rank to finish its notebooks")
            launch.all_done()
        _log.info("all %d notebooks done in %.1f min", len(todo), (time.perf_counter() - t_all) / 60)
        if not lead:
            import shutil

            release(lock)
            shutil.rmtree(stage, ignore_errors=True)
            _log.info("done (this rank's scratch folder is removed); rank 0 writes the results")
            return 0
        if args.publish:
            apart = (Path(profile.results_dir) / _slug(profile.model)
                     if profile.results_dir else "")
            _log.info("README tables refreshed: %s",
                      ", ".join(publish(stage, executed, this_run, notebooks_dir=apart)) or "none")
        else:
            _log.info("results in %s; the committed tables, figures, notebooks and README are unchanged", stage)
        return 0
    finally:
        release(lock)


def _slug(model: str) -> str:
    """A model as a folder or file name: ``qwen2.5-1.5b``, ``random_tiny``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name)


# notebooks that line up every model of a profile with ``results_dir`` (06: the model-size tables): with several
# models they run once, after every model's run finished (and published)
ACROSS_MODELS = ("06",)


def _with(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _several_models(args, launch: _Launch) -> int:
    """``--model A B ...``: each model's run (one after another, or side by side), then the notebooks of
    :data:`ACROSS_MODELS` once, for the last model, if every model's run succeeded. Every model is checked before
    anything runs; a model that fails does not stop the others (but does under a launch of several processes,
    whose ranks must run the same notebooks) and makes the exit status non-zero."""
    models = list(args.model)
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise RunError(f"--model: {', '.join(twice)} given more than once")
    if args.side_by_side and launch.world > 1:
        raise RunError("--side-by-side starts one process per model on this machine and cannot run under a launch "
                       "of several processes (torchrun, accelerate launch): leave it out (the models then run one "
                       "after another, each shared by every process) or launch each model on its own")
    todo = _todo(args.only)
    profiles = [_check_request(_with(args, model=m))[0] for m in models]
    lineup = [p.name[:2] for p in todo if profiles[0].results_dir and p.name[:2] in ACROSS_MODELS]
    each = [p.name[:2] for p in todo if p.name[:2] not in lineup]
    side = args.side_by_side and not args.dry_run and each
    _log.info("%d models, %s: %s%s", len(models), "side by side" if side else "one after another", ", ".join(models),
              f"; then {', '.join(lineup)} once, with every model's tables" if lineup else "")
    codes = (_side_by_side(args, models, each) if side else
             _one_after_another(args, launch, models, each) if each else {})
    failed = {m: c for m, c in codes.items() if c}
    for m, code in failed.items():
        _log.error("FAILED: model %s (exit status %d)%s", m, code, f"; its whole output: {_log_file(args, m)}"
                   if side else "")
    if lineup and failed:
        _log.error("%s not run: it lines up every model's tables, and %s failed", ", ".join(lineup),
                   ", ".join(failed))
    elif lineup:
        _log.info("=== %s with every model's tables (run as model %s)", ", ".join(lineup), models[-1])
        codes[" ".join(lineup)] = _main(_with(args, model=models[-1], only=lineup, out=_out_of(args, models[-1])),
                                        launch)
    if any(codes.values()):
        return 130 if 130 in codes.values() else 1
    if not args.dry_run:
        _log.info("every model's run succeeded: %s", ", ".join(models))
    return 0


def _out_of(args, model: str) -> str:
    """``--out`` of one model's run: a folder of its own under the given one."""
    return str(Path(args.out) / _slug(model)) if args.out else ""


def _one_after_another(args, launch: _Launch, models: list[str], only: list[str]) -> dict[str, int]:
    """Run the notebooks ``only`` of each model in turn, in this process: ``{model: exit status}``."""
    codes = {}
    for k, model in enumerate(models):
        _log.info("=== model %s (%d of %d)", model, k + 1, len(models))
        try:
            codes[model] = _main(_with(args, model=model, only=only, out=_out_of(args, model)), launch)
        except RunError as err:
            _log.error("kvlib: %s", err)
            codes[model] = 2
        if codes[model] and launch.world > 1:  # every rank must run the same notebooks: stop here
            break
    return codes


def _log_file(args, model: str) -> Path:
    return ROOT / "build" / "logs" / args.profile / f"{_slug(model)}.log"


def _child_command(argv: list[str]) -> list[str]:
    """The command line of a child run with the runner's arguments ``argv``."""
    return [sys.executable, "-m", "kvlib.experiments.pipeline", *argv]


def _side_by_side(args, models: list[str], only: list[str]) -> dict[str, int]:
    """Run the notebooks ``only`` of every model at the same time, one child process each: ``{model: exit
    status}``. Each child publishes on its own (with ``--publish``), once its notebooks all succeeded."""
    from .side_by_side import run_side_by_side

    commands, logs = {}, {}
    for model in models:
        argv = ["--profile", args.profile, "--model", model, "--only", *only]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--out", _out_of(args, model)] if args.out else []
        argv += ["--publish"] if args.publish else []
        commands[model], logs[model] = _child_command(argv), _log_file(args, model)
        logs[model].unlink(missing_ok=True)
    _log.info("each model's lines start with [model]; its whole output goes to %s", logs[models[0]].parent)
    return run_side_by_side(commands, logs, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _show_log(prefix: str = "") -> None:
    """Show kvlib's log on stderr as plain lines (what the runner and the library report: progress, notices,
    failures), each after ``prefix`` (``[rank 1 of 2] `` in a launch); other libraries (papermill, transformers)
    keep showing their warnings only. Does nothing to a root logger that is already configured (beyond letting
    kvlib's info through)."""
    logging.basicConfig(format=prefix.replace("%", "%%") + "%(message)s")
    logging.getLogger("kvlib").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
