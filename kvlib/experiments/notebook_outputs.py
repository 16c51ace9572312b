"""Committed notebooks carry the outputs of the run that produced the committed tables.

After a successful papermill run, :func:`publish_outputs` copies each executed cell's outputs into the
matching cell (same id) of the source notebook, so a reader browsing the repository sees tables, figures
and printed results without running anything. What changes from run to run is left out, so a rerun with
the same results gives an empty or small diff:

* papermill's injected-parameters cell is not copied (the source keeps its own defaults);
* stderr streams (progress bars, warnings) and widget views (progress bars drawn by ipywidgets, which only a live
  kernel can show) are dropped; stdout, results and figures stay;
* absolute paths of the machine that ran it are shown as a reader should see them (``$KVLIB_CACHE/...``,
  ``$KVLIB_RUNS/...``, relative to the repository, ``~/...``: :func:`kvlib.core.paths.hide_machine_paths`), in
  printed text and in every text form of a result (plain, HTML, Markdown);
* execution counts are renumbered 1, 2, ... over the code cells; per-cell papermill metadata (start and end
  times, duration, status) and notebook-level papermill metadata are not copied.

Only the outputs change: the source cells' code, ids and metadata are never touched.
"""

from __future__ import annotations

from pathlib import Path

from ..core.paths import hide_machine_paths

__all__ = ["publish_outputs", "clean_outputs"]

_INJECTED = "injected-parameters"
_WIDGET = "application/vnd.jupyter.widget-view+json"


def _text(value):
    """A text field of an output (a string or nbformat's list of lines) with machine paths hidden."""
    if isinstance(value, list):
        return hide_machine_paths("".join(value)).splitlines(keepends=True)
    return hide_machine_paths(value) if isinstance(value, str) else value


def clean_outputs(outputs: list) -> list:
    """``outputs`` (a list of output dicts) without stderr streams and widget views, and with the machine's
    absolute paths in printed text and in text results (``text/*`` data) shown relative to their roots."""
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            continue
        if _WIDGET in out.get("data", {}):
            continue
        out = dict(out)
        if "text" in out:
            out["text"] = _text(out["text"])
        if "data" in out:
            out["data"] = {mime: _text(v) if mime.startswith("text/") else v for mime, v in out["data"].items()}
        kept.append(out)
    return kept


def publish_outputs(executed: str | Path, source: str | Path) -> int:
    """Copy the outputs of ``executed`` (a papermill output) into ``source`` in place; return the number of
    code cells that received outputs. Raises ``ValueError`` when the two notebooks do not share cell ids
    (the source changed since it was executed: run it again)."""
    import nbformat

    ex = nbformat.read(executed, as_version=4)
    src = nbformat.read(source, as_version=4)
    by_id = {c.get("id"): c for c in ex.cells
             if c.cell_type == "code" and _INJECTED not in c.get("metadata", {}).get("tags", [])}
    code = [c for c in src.cells if c.cell_type == "code"]
    missing = [c.get("id") for c in code if c.get("id") not in by_id]
    if missing:
        raise ValueError(f"{executed} has no cells {missing[:3]} of {source}: the notebook changed since it ran; "
                         "run it again before publishing its outputs")
    for n, cell in enumerate(code, start=1):
        run = by_id[cell.get("id")]
        if run.source != cell.source:
            raise ValueError(f"cell {cell.get('id')} of {source} differs from the executed copy {executed}: "
                             "run the notebook again before publishing its outputs")
        cell.outputs = [nbformat.from_dict(o) for o in clean_outputs([dict(o) for o in run.get("outputs", [])])]
        for o in cell.outputs:
            if "execution_count" in o:
                o["execution_count"] = n
        cell.execution_count = n
    nbformat.validate(src)
    text = nbformat.writes(src)
    Path(source).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return len(code)
