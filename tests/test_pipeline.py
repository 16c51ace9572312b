"""The papermill runner names the notebook and the cell that failed, and exits non-zero."""

import nbformat
import pytest

from kvlib import pipeline


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("PROFILE = 'small'\nMODEL = ''\nDATA_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_failing_cell_is_named(tmp_path, monkeypatch, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", ["x = 1"])
    _notebook(nbdir / "02_bad.ipynb", ["y = 2", "raise ValueError('boom in cell')"])
    with pytest.raises(RuntimeError, match=r"02_bad.ipynb: cell \d+ .*ValueError: boom in cell"):
        pipeline.run_notebook(nbdir / "02_bad.ipynb", tmp_path / "out", {"PROFILE": "small"})
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "notebooks", lambda root=tmp_path: sorted(nbdir.glob("[0-9][0-9]_*.ipynb")))
    assert pipeline.main(["--out", str(tmp_path / "out")]) == 1
    assert "FAILED: 02_bad.ipynb" in capsys.readouterr().err
    assert (tmp_path / "out" / "01_ok.ipynb").exists()


def test_readme_tables_are_copied_from_generated_files(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t1.md").write_text("caption\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "README.md").write_text("x\n<!-- table: t1 -->\nold\n<!-- /table -->\n<!-- table: missing -->\nkeep\n<!-- /table -->\n")
    assert pipeline.update_readme(tmp_path) == ["t1"]
    text = (tmp_path / "README.md").read_text()
    assert "| 1 |" in text and "old" not in text and "keep" in text
    pipeline.update_readme(tmp_path)
    assert (tmp_path / "README.md").read_text() == text  # idempotent
