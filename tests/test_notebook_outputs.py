"""Publishing a run's outputs into the source notebook: outputs only, nothing volatile, never stale code."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kvlib.experiments.notebook_outputs import publish_outputs


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
