"""The papermill runner names the notebook and the cell that failed (numbered as in the source notebook), says
when the kernel died and what to try, and exits non-zero."""

import logging

import nbformat
import pytest

from kvlib.experiments import pipeline


def _notebook(path, cells, parameters=True):
    """A notebook: a parameters cell (unless ``parameters=False``), then ``cells``; a string starting with
    ``# md`` is a markdown cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("PROFILE = 'small'\nMODEL = ''\nDATA_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = ([params] if parameters else []) + [
        nbformat.v4.new_markdown_cell(c) if c.startswith("# md") else nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return nb


@pytest.mark.slow
def test_failing_cell_is_named(tmp_path, monkeypatch, caplog):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", ["x = 1"])
    _notebook(nbdir / "02_bad.ipynb", ["y = 2", "raise ValueError('boom in cell')"])
    with pytest.raises(RuntimeError, match=r"02_bad.ipynb: cell \d+ .*ValueError: boom in cell"):
        pipeline.run_notebook(nbdir / "02_bad.ipynb", tmp_path / "out", {"PROFILE": "small"})
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "notebooks", lambda root=tmp_path: sorted(nbdir.glob("[0-9][0-9]_*.ipynb")))
    assert pipeline.main(["--out", str(tmp_path / "out")]) == 1
    failed = [r for r in caplog.records if r.getMessage().startswith("FAILED: 02_bad.ipynb")]
    assert [r.levelno for r in failed] == [logging.ERROR]
    assert (tmp_path / "out" / "01_ok.ipynb").exists()
    # the notebook that finished is timed, in the scratch run's folder (not the committed timings)
    recorded = pipeline.read_times(tmp_path / "build" / "small" / "qwen2.5-0.5b" / "timings.csv")
    assert list(recorded) == [("small", "qwen2.5-0.5b", "01_ok.ipynb")]
    assert not (tmp_path / pipeline.NOTEBOOK_TIMES).exists()
    assert any("02_bad.ipynb" in m and "time left" in m for m in caplog.messages)


def test_time_left_comes_from_the_last_recorded_runs(tmp_path):
    path = tmp_path / "t.csv"
    assert pipeline.time_left({}, "small", "m", ["01.ipynb"]).startswith("unknown")
    pipeline.record_time(path, "small", "m", "01.ipynb", 100.0)
    pipeline.record_time(path, "small", "m", "02.ipynb", 500.0)
    pipeline.record_time(path, "small", "m", "01.ipynb", 80.0)  # the latest run wins
    pipeline.record_time(path, "gpu", "m", "02.ipynb", 9.0)
    times = pipeline.read_times(path)
    assert times[("small", "m", "01.ipynb")] == 80.0 and len(times) == 3
    assert pipeline.time_left(times, "small", "m", ["01.ipynb", "02.ipynb"]) == "about 10 min"
    assert "1 of 2 notebooks" in pipeline.time_left(times, "gpu", "m", ["01.ipynb", "02.ipynb"])


def test_readme_tables_are_copied_from_generated_files(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t1.md").write_text("caption\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "tables" / "timings").mkdir()
    (tmp_path / "tables" / "timings" / "t1.md").write_text("caption\n\n| seconds |\n|---|\n| 2.5 |\n")
    (tmp_path / "README.md").write_text("x\n<!-- table: t1 -->\nold\n<!-- /table -->\n<!-- table: missing -->\nkeep\n"
                                        "<!-- /table -->\n<!-- table: timings/t1 -->\nold time\n<!-- /table -->\n")
    assert pipeline.update_readme(tmp_path) == ["t1", "timings/t1"]
    text = (tmp_path / "README.md").read_text()
    assert "| 1 |" in text and "old" not in text and "keep" in text and "| 2.5 |" in text
    pipeline.update_readme(tmp_path)
    assert (tmp_path / "README.md").read_text() == text  # idempotent


@pytest.mark.parametrize("parameters", [True, False], ids=["with-parameters-cell", "without"])
def test_failing_cell_number_is_the_source_index(tmp_path, parameters):
    """papermill injects a parameters cell (after the tagged one, or first): the number reported is the
    failing cell's index in the source notebook all the same."""
    path = tmp_path / "03_bad.ipynb"
    nb = _notebook(path, ["# md A heading", "y = 2", "raise KeyError('no such set')", "z = 3"], parameters)
    bad = next(i for i, c in enumerate(nb.cells) if "KeyError" in c.source)
    with pytest.raises(pipeline.NotebookError) as err:
        pipeline.run_notebook(path, tmp_path / "out", {"PROFILE": "small"})
    assert err.value.cell == bad
    msg = str(err.value)
    assert msg.startswith(f"03_bad.ipynb: cell {bad} ") and "KeyError" in msg and "no such set" in msg
    assert "raise KeyError" in msg  # the cell's first line, to find it without counting
    assert str(tmp_path / "out" / "03_bad.ipynb") in msg and err.value.executed.exists()


def test_dead_kernel_names_notebook_cause_and_executed_copy(tmp_path):
    """A kernel killed mid-cell (as the system does on running out of memory) gives one clear message, not a
    traceback: the notebook, the cell, memory as the likely cause with what to try, the executed copy."""
    path = tmp_path / "04_oom.ipynb"
    _notebook(path, ["x = 1", "# md Now the kernel dies", "import os\nos.kill(os.getpid(), 9)", "y = 2"])
    with pytest.raises(pipeline.KernelDiedError) as err:
        pipeline.run_notebook(path, tmp_path / "out", {"PROFILE": "small"})
    msg = str(err.value)
    assert msg.startswith("04_oom.ipynb: the kernel died while running cell 3 ")
    assert "memory" in msg and "smaller PROFILE" in msg and "batch_size" in msg
    assert str(tmp_path / "out" / "04_oom.ipynb") in msg
    assert err.value.cell == 3 and err.value.__cause__ is None and err.value.__suppress_context__
    assert "Traceback" not in msg


def test_publish_copies_outputs_into_the_source_notebook(tmp_path, monkeypatch):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from kvlib.experiments import pipeline

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    nb = new_notebook(cells=[new_code_cell("PROFILE = 'x'", metadata={"tags": ["parameters"]}),
                             new_code_cell("print('hello', PROFILE)")])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, nb_dir / "01_t.ipynb")
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "notebooks", lambda root=tmp_path: sorted(nb_dir.glob("*.ipynb")))
    monkeypatch.setattr(pipeline, "update_readme", lambda root=tmp_path: [])
    assert pipeline.main(["--profile", "small", "--out", str(tmp_path / "ex")]) == 0
    assert nbformat.read(nb_dir / "01_t.ipynb", as_version=4).cells[1].outputs == []  # not without --publish
    assert pipeline.main(["--profile", "small", "--out", str(tmp_path / "ex"), "--publish"]) == 0
    out = nbformat.read(nb_dir / "01_t.ipynb", as_version=4).cells[1].outputs
    assert [o.get("text") for o in out] == ["hello small\n"]
    # the notebook's phase table is published with the other timings (a notebook without phases: its total alone)
    phases = (tmp_path / "tables" / "timings" / "phases.csv").read_text().splitlines()
    assert phases[0] == "profile,model,notebook,phase,calls,seconds,share" and len(phases) == 3
    assert phases[1].startswith("small,qwen2.5-0.5b,01_t.ipynb,(notebook),1,")


def test_the_runner_shows_its_progress_when_run_as_a_program():
    """``python -m kvlib.experiments.pipeline`` (what ``make reproduce`` runs) shows kvlib's info lines: the
    module's logger must not be ``__main__``, which no kvlib log setting reaches."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kvlib.experiments.pipeline", "--dry-run", "--only", "01"],
                         capture_output=True, text=True, check=True)
    assert "1 notebook(s) to run (01_vram.ipynb)" in out.stderr and "took last time" in out.stderr


def test_phases_are_summed_per_notebook_into_the_timings_folder(tmp_path):
    """A notebook's ``$KVLIB_PHASES`` lines become rows of ``timings/phases.csv`` (calls and seconds summed per
    path, in tree order, the share of the notebook, the rest outside every phase); a rerun of one notebook replaces its
    rows only."""
    import json

    import pandas as pd

    def lines(path, records):
        path.write_text("".join(json.dumps({"phase": p, "seconds": s, "calls": n}) + "\n" for p, s, n in records))
        return path

    first = lines(tmp_path / "03.jsonl", [("model load", 2.0, 1), ("self-evaluation", 5.0, 1),
                                          ("self-evaluation/generation", 4.0, 1), ("self-evaluation", 1.0, 1),
                                          ("model load/verify", 0.5, 1)])  # a child seen late: under its parent
    tables = tmp_path / "tables" / "gpu" / "m"
    written = pipeline.record_phases(tables, "gpu", "m", "03_kv_coe.ipynb", 10.0, first)
    assert written == [tables / "timings" / "phases.csv", tables / "timings" / "phases.md"]
    pipeline.record_phases(tables, "gpu", "m", "01_vram.ipynb", 4.0, tmp_path / "none.jsonl")  # no phase at all
    df = pd.read_csv(written[0], keep_default_na=False)
    nb3 = df[df.notebook == "03_kv_coe.ipynb"].set_index("phase")
    assert nb3.index.tolist() == ["(notebook)", "model load", "model load/verify", "self-evaluation",
                                  "self-evaluation/generation", "(outside phases)"]
    assert nb3.loc["self-evaluation", "seconds"] == 6.0 and nb3.loc["self-evaluation", "calls"] == "2"
    assert nb3.loc["(outside phases)", "seconds"] == 2.0  # 10 s less the top-level phases (2 + 6)
    assert nb3.loc["self-evaluation/generation", "share"] == "40.0%"
    assert df[df.notebook == "01_vram.ipynb"].phase.tolist() == ["(notebook)", "(outside phases)"]
    assert df.notebook.tolist() == sorted(df.notebook)  # notebooks in order, each notebook's phases as recorded
    again = lines(tmp_path / "03b.jsonl", [("model load", 1.0, 1)])
    pipeline.record_phases(tables, "gpu", "m", "03_kv_coe.ipynb", 3.0, again)
    df = pd.read_csv(written[0], keep_default_na=False)
    assert df[df.notebook == "03_kv_coe.ipynb"].phase.tolist() == ["(notebook)", "model load", "(outside phases)"]
    assert len(df[df.notebook == "01_vram.ipynb"]) == 2
    md = written[1].read_text()
    assert "profile gpu, model m" in md and "vary from run to run" in md and "| model load" in md
