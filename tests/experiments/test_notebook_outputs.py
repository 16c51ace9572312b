"""Publishing a run's outputs into the source notebook: outputs only, nothing volatile, never stale code, no path of
the machine that ran it; tables shown as tables."""

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kvlib.experiments.notebook_outputs import publish_outputs
from kvlib.experiments.report import show_table
from kvlib.core.paths import hide_machine_paths, machine_paths_in, shown_path


def _source(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
                             new_code_cell("print(X)")])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path, nb


def _executed(tmp_path, nb, code_change=None):
    ex = nbformat.from_dict(nbformat.reads(nbformat.writes(nb), as_version=4))
    injected = new_code_cell("X = 2", metadata={"tags": ["injected-parameters"]})
    ex.cells.insert(2, injected)
    run = ex.cells[3]
    if code_change:
        run.source = code_change
    run.execution_count = 7
    run.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00", "duration": 1.5}
    run.outputs = [new_output("stream", name="stdout", text="2\n"),
                   new_output("stream", name="stderr", text="100%|#####| 3/3 [00:01<00:00]\n"),
                   new_output("execute_result", data={"text/plain": "2"}, execution_count=7)]
    ex.metadata["papermill"] = {"duration": 3.0}
    path = tmp_path / "executed.ipynb"
    nbformat.write(ex, path)
    return path


def test_outputs_are_copied_without_volatile_parts(tmp_path):
    src_path, nb = _source(tmp_path)
    assert publish_outputs(_executed(tmp_path, nb), src_path) == 2
    out = nbformat.read(src_path, as_version=4)
    assert [c.source for c in out.cells] == [c.source for c in nb.cells]  # code untouched, no injected cell
    cell = out.cells[2]
    assert [o.output_type for o in cell.outputs] == ["stream", "execute_result"]  # stderr (progress bars) dropped
    assert cell.execution_count == 2 and cell.outputs[1].execution_count == 2
    assert "papermill" not in cell.metadata and "papermill" not in out.metadata


def test_publishing_twice_gives_the_same_file(tmp_path):
    src_path, nb = _source(tmp_path)
    ex = _executed(tmp_path, nb)
    publish_outputs(ex, src_path)
    first = src_path.read_bytes()
    publish_outputs(ex, src_path)
    assert src_path.read_bytes() == first


def test_outputs_of_other_code_are_refused(tmp_path):
    src_path, nb = _source(tmp_path)
    before = src_path.read_bytes()
    with pytest.raises(ValueError, match="differs from the executed copy"):
        publish_outputs(_executed(tmp_path, nb, code_change="print(X + 1)"), src_path)
    assert src_path.read_bytes() == before


# --- machine paths ----------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# the numbered notebooks and the executed copies a profile keeps apart per model (notebooks/gpu/<model>/)
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("[0-9][0-9]_*.ipynb"))
MACHINE_ROOTS = ["/tmp", "/work", "/root", str(Path.home()), str(ROOT)]  # besides kvlib.core.paths.machine_roots()


def _output_texts(nb):
    """``(cell id, text)`` for every text field of every output of ``nb``."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            fields = [out.get("text", "")] + [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
            fields += [out.get("evalue", ""), "".join(out.get("traceback", []))]
            for field in fields:
                yield cell.get("id"), "".join(field) if isinstance(field, list) else field


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_shown_path_names_the_root_not_the_machine(roots):
    assert shown_path(roots / "cache" / "qwen2.5-0.5b") == "$KVLIB_CACHE/qwen2.5-0.5b"
    assert shown_path(roots / "cache") == "$KVLIB_CACHE"
    assert shown_path(roots / "runs" / "classifiers" / "m.safetensors") == "$KVLIB_RUNS/classifiers/m.safetensors"
    assert shown_path(ROOT / "tables" / "table2_kv_coe.md") == "tables/table2_kv_coe.md"
    assert shown_path(ROOT) == "."
    assert shown_path(Path.home() / "data" / "x.json") == "~/data/x.json"
    assert shown_path("tables/x.md") == "tables/x.md"  # relative: as it is
    assert shown_path(roots / "cache-other" / "x") == str(roots / "cache-other" / "x")  # a sibling, not under it


def test_hide_machine_paths_rewrites_every_root_in_a_text(roots):
    text = (f"converting m into {roots / 'cache' / 'm'} (once); saved to {roots / 'runs' / 'c' / 'x.safetensors'}\n"
            f"wrote {ROOT / 'tables' / 't.md'}, kept {roots / 'cachex'}")
    out = hide_machine_paths(text)
    assert out == ("converting m into $KVLIB_CACHE/m (once); saved to $KVLIB_RUNS/c/x.safetensors\n"
                   f"wrote tables/t.md, kept {roots / 'cachex'}")
    assert machine_paths_in(out) == [str(roots / "cachex")]  # what no root names is still found


def test_published_outputs_hold_no_machine_path_nor_widget(tmp_path, roots):
    src_path, nb = _source(tmp_path)
    ex = nbformat.read(_executed(tmp_path, nb), as_version=4)
    cell = ex.cells[3]
    model_dir, classifier = roots / "cache" / "qwen2.5-0.5b", roots / "runs" / "classifiers" / "m.safetensors"
    cell.outputs = [new_output("stream", name="stdout", text=f"kvlib: converting into {model_dir} (once)\n"),
                    new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a"},
                                                     "text/plain": "HBox(children=(...))"}),
                    new_output("execute_result", execution_count=7,
                               data={"text/plain": f"PosixPath('{classifier}')",
                                     "text/html": f"<p>{ROOT / 'tables' / 'x.md'}</p>"})]
    nbformat.write(ex, tmp_path / "executed.ipynb")
    publish_outputs(tmp_path / "executed.ipynb", src_path)
    outputs = nbformat.read(src_path, as_version=4).cells[2].outputs
    assert [o.output_type for o in outputs] == ["stream", "execute_result"]  # the progress-bar widget dropped
    assert outputs[0].text == "kvlib: converting into $KVLIB_CACHE/qwen2.5-0.5b (once)\n"
    assert outputs[1].data["text/plain"] == "PosixPath('$KVLIB_RUNS/classifiers/m.safetensors')"
    assert outputs[1].data["text/html"] == "<p>tables/x.md</p>"


def test_model_conversion_notice_shows_the_cache_by_its_variable(roots, monkeypatch, caplog):
    import logging

    from kvlib.core import models

    monkeypatch.setattr(models, "_is_current", lambda folder, spec: False)
    monkeypatch.setattr(models, "_convert", lambda spec, folder: None)
    with caplog.at_level(logging.INFO, logger="kvlib"):
        models.embedded_model_dir(next(iter(models.EMBEDDED_MODELS)))
    assert "into $KVLIB_CACHE/" in caplog.text and str(roots) not in caplog.text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_hold_no_machine_path(path):
    found = [(cid, p) for cid, text in _output_texts(nbformat.read(path, as_version=4))
             for p in machine_paths_in(text, MACHINE_ROOTS)]
    assert not found, f"{path.name}: absolute paths of a machine in cell outputs (cell id, path): {found[:5]}"


# --- tables shown as tables -------------------------------------------------------------------------------------------

_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*\|", re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_committed_output_shows_a_markdown_table_as_text(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = "".join(out.get("text", "")) or ("" if "text/html" in data else "".join(data.get("text/plain", "")))
            assert not _RULE.search(text), f"{path.name}, cell {cell.get('id')}: a Markdown table as text"
    shown = [c for c in nb.cells if "show_table(" in c.source]
    for cell in shown:  # the cells that show a table end with it: the table is the cell's rendered result
        html = [o for o in cell.outputs if "<table" in "".join(o.get("data", {}).get("text/html", ""))]
        assert html or not cell.outputs, f"{path.name}, cell {cell.get('id')} shows no HTML table"


def _markdown(frame, caption="", notes=""):
    return "\n\n".join(p for p in (caption, frame.to_markdown(index=False), notes) if p) + "\n"


def test_show_table_renders_markdown_as_an_html_table_with_caption_and_notes():
    frame = pd.DataFrame({"method": ["KV-CoE-R (V)", "MaxProb"], "AUROC [95% CI]": ["58.9 [42.7, 74.7]", "–"],
                          "n": ["12", "3"]})
    md = _markdown(frame, "Table 2. Caption <with> a tag.", "Cells: AUROC x100.")
    shown = show_table(md)
    assert shown.frame.equals(frame)  # every cell exactly as the Markdown wrote it
    assert shown.caption == "Table 2. Caption <with> a tag." and shown.notes == "Cells: AUROC x100."
    html = shown._repr_html_()
    assert html.count("<table") == 1 and html.index("Caption &lt;with&gt;") < html.index("<table")
    assert html.index("</table>") < html.index("Cells: AUROC x100.")
    assert html.count("<tr") == 3 and "<td style=\"text-align: right;\">12</td>" in html  # numbers to the right
    assert repr(shown) == md.rstrip("\n")  # the plain-text form is the Markdown of tables/
    data, _ = _formatted(shown)
    assert set(data) == {"text/html", "text/plain"}


def test_show_table_of_a_frame_and_of_text_without_a_table():
    frame = pd.DataFrame({"accuracy": [0.5, 0.25]}, index=pd.Index(["fast", "slow"], name="method"))
    html = show_table(frame, caption="Table 3.")._repr_html_()
    assert "<p>Table 3.</p>" in html and ">fast</th>" in html and "0.25" in html  # a named index is shown
    with pytest.raises(ValueError, match="no pipe table"):
        show_table("just a caption\n\nand a note\n")
    with pytest.raises(TypeError, match="DataFrame or Markdown"):
        show_table([1, 2])


def _formatted(obj):
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance().display_formatter.format(obj)
