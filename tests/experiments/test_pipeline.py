"""The papermill runner names the notebook and the cell that failed (numbered as in the source notebook), says
when the kernel died and what to try, and exits non-zero."""

import logging
import os
import sys
import textwrap

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


def test_the_timing_record_names_what_ran_each_notebook(tmp_path, monkeypatch):
    import csv
    import subprocess

    path = tmp_path / "t.csv"
    path.write_text("profile,model,notebook,seconds\nsmall,m,01.ipynb,12.5\n")  # a record from before devices
    pipeline.record_time(path, "gpu", "m", "03.ipynb", 519.84, "NVIDIA H100 80GB HBM3")
    with path.open(newline="") as f:
        rows = {r["notebook"]: r for r in csv.DictReader(f)}
    assert rows["01.ipynb"]["device"] == "" and rows["01.ipynb"]["seconds"] == "12.5"
    assert rows["03.ipynb"]["device"] == "NVIDIA H100 80GB HBM3" and rows["03.ipynb"]["seconds"] == "519.8"
    assert pipeline.read_times(path)[("gpu", "m", "03.ipynb")] == 519.8

    def smi(cmd, **kw):
        assert cmd[0] == "nvidia-smi"
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H200\nNVIDIA H200\n", stderr="")

    monkeypatch.setattr(subprocess, "run", smi)
    assert pipeline.device_name("cuda") == "NVIDIA H200 x 2"
    assert pipeline.device_name("cpu") == f"CPU ({os.cpu_count()} cores)"

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    assert pipeline.device_name("cuda:1") == "cuda"


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


def _two_model_checkout(root):
    """A checkout holding results of a profile with ``results_dir`` ``sbs`` for models a and b, and a README."""
    for model in ("a", "b"):
        (root / "tables" / "sbs" / model).mkdir(parents=True)
        (root / "tables" / "sbs" / model / "t.csv").write_text(f"x\nold {model}\n")
        (root / "tables" / "sbs" / model / "t.md").write_text(f"| {model} |\n|---|\n| old |\n")
    (root / "figures" / "sbs").mkdir(parents=True)
    (root / "figures" / "sbs" / "lineup.png").write_bytes(b"old lineup")
    (root / "README.md").write_text("<!-- table: sbs/a/t -->\n<!-- /table -->\n<!-- table: sbs/b/t -->\n"
                                    "<!-- /table -->\n")


def test_runs_started_from_one_snapshot_publish_only_what_each_changed(tmp_path, monkeypatch):
    """Two runs of one profile start from the same committed results and publish one after the other: both land,
    and the second does not put back the first model's old files (a file a run left as it found it is never
    copied back, even where the checkout's copy changed since)."""
    from dataclasses import replace

    from kvlib.profiles import get_profile

    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    _two_model_checkout(tmp_path)
    profile = replace(get_profile("smoke"), name="sbs", results_dir="sbs")
    stages = {m: pipeline._staging(profile.with_model(m), tmp_path / "build" / "publish" / m) for m in "ab"}
    for m, stage in stages.items():  # each run rewrites its own model's tables, one of them unchanged
        (stage / "tables" / "sbs" / m / "t.csv").write_text(f"x\nnew {m}\n")
        (stage / "tables" / "sbs" / m / "t.md").write_text((tmp_path / "tables" / "sbs" / m / "t.md").read_text())
    (stages["b"] / "figures" / "sbs" / "new.png").write_bytes(b"a figure b made")
    (tmp_path / "figures" / "sbs" / "lineup.png").write_bytes(b"changed in the checkout meanwhile")
    (tmp_path / "tables" / "sbs" / "b" / "t.md").write_text("| b |\n|---|\n| newer |\n")

    pipeline.publish(stages["a"], [], {("sbs", "a", "01_t.ipynb"): 1.0}, root=tmp_path)
    pipeline.publish(stages["b"], [], {("sbs", "b", "01_t.ipynb"): 2.0}, root=tmp_path)
    tables = tmp_path / "tables" / "sbs"
    assert (tables / "a" / "t.csv").read_text() == "x\nnew a\n"  # not put back by b's run
    assert (tables / "b" / "t.csv").read_text() == "x\nnew b\n"
    assert (tables / "b" / "t.md").read_text() == "| b |\n|---|\n| newer |\n"  # untouched by b's run: kept
    assert (tmp_path / "figures" / "sbs" / "lineup.png").read_bytes() == b"changed in the checkout meanwhile"
    assert (tmp_path / "figures" / "sbs" / "new.png").read_bytes() == b"a figure b made"
    # the README comes from the checkout's tables after the copy, the timings of both runs are kept
    readme = (tmp_path / "README.md").read_text()
    assert "| old |" in readme and "| newer |" in readme
    assert set(pipeline.read_times(tmp_path / pipeline.NOTEBOOK_TIMES)) == {("sbs", "a", "01_t.ipynb"),
                                                                            ("sbs", "b", "01_t.ipynb")}


def test_publish_writes_nothing_when_a_notebook_cannot_be_published(tmp_path, monkeypatch):
    """All or nothing: an executed notebook whose cells do not match its source stops the publishing before any
    table is copied."""
    from dataclasses import replace

    from kvlib.profiles import get_profile

    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    _two_model_checkout(tmp_path)
    stage = pipeline._staging(replace(get_profile("smoke"), name="sbs", results_dir="sbs").with_model("a"),
                              tmp_path / "build" / "publish" / "a")
    (stage / "tables" / "sbs" / "a" / "t.csv").write_text("x\nnew a\n")
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "01_t.ipynb", ["x = 1"])
    _notebook(stage / "01_t.ipynb", ["x = 1", "y = 2"])  # another notebook's cells
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "build" not in p.parts}
    with pytest.raises(ValueError, match="differs from the executed copy|has no cells"):
        pipeline.publish(stage, [(stage / "01_t.ipynb", tmp_path / "notebooks" / "01_t.ipynb")], {}, root=tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "build" not in p.parts} == before


@pytest.fixture
def sbs_profile(monkeypatch):
    """A profile ``sbs`` with ``results_dir`` (its tables apart per model, as ``gpu``) whose results from models
    ``random:a`` and ``random:b`` are the committed ones (so they publish)."""
    from dataclasses import replace

    from kvlib import profiles

    monkeypatch.setitem(profiles.PROFILES, "sbs", replace(profiles.PROFILES["smoke"], name="sbs", results_dir="sbs"))
    monkeypatch.setitem(profiles.COMMITTED, "sbs", ("random:a", "random:b"))
    return profiles.PROFILES["sbs"]


def _fake_runs(monkeypatch, codes: dict):
    """Replace one model's run (in this process and side by side) by a record of what was asked:
    ``(model, notebooks, side by side?)``; a model's exit status comes from ``codes`` (0 if not named)."""
    calls = []

    def one(args, launch=None):
        calls.append((args.model, tuple(args.only), False))
        return codes.get(args.model, 0)

    def side(args, models, only):
        calls.extend((m, tuple(only), True) for m in models)
        return {m: codes.get(m, 0) for m in models}

    monkeypatch.setattr(pipeline, "_main", one)
    monkeypatch.setattr(pipeline, "_side_by_side", side)
    return calls


@pytest.mark.parametrize("side", [False, True], ids=["one-after-another", "side-by-side"])
def test_several_models_line_up_once_after_every_model(sbs_profile, monkeypatch, side):
    calls = _fake_runs(monkeypatch, {})
    argv = ["--profile", "sbs", "--model", "random:a", "random:b", "--publish"] + (["--side-by-side"] * side)
    assert pipeline.main(argv) == 0
    each = tuple(p.name[:2] for p in pipeline.notebooks() if p.name[:2] not in pipeline.ACROSS_MODELS)
    assert calls == [("random:a", each, side), ("random:b", each, side), ("random:b", ("06",), False)]
    # a profile without results_dir keeps each model's notebooks together (06 reads that model's tables alone)
    calls.clear()
    assert pipeline.main(["--profile", "smoke", "--model", "random:a", "random:b", "--only", "03", "06"]
                         + (["--side-by-side"] * side)) == 0
    assert calls == [("random:a", ("03", "06"), side), ("random:b", ("03", "06"), side)]


@pytest.mark.parametrize("side", [False, True], ids=["one-after-another", "side-by-side"])
def test_a_failed_model_stops_neither_the_others_nor_goes_unsaid(sbs_profile, monkeypatch, caplog, side):
    calls = _fake_runs(monkeypatch, {"random:a": 1})
    argv = ["--profile", "sbs", "--model", "random:a", "random:b", "--only", "03", "06"] + (["--side-by-side"] * side)
    assert pipeline.main(argv) == 1
    assert calls == [("random:a", ("03",), side), ("random:b", ("03",), side)]  # b ran, 06 did not
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("FAILED: model random:a (exit status 1)") for m in errors)
    assert any("06 not run" in m and "random:a failed" in m for m in errors)


def test_several_models_are_checked_before_anything_runs(sbs_profile, monkeypatch, caplog):
    calls = _fake_runs(monkeypatch, {})
    assert pipeline.main(["--profile", "sbs", "--model", "random:a", "random:a"]) == 2
    assert pipeline.main(["--profile", "sbs", "--model", "random:a", "random:c", "--publish"]) == 2
    assert any("--publish: profile sbs with model random:c" in m for m in caplog.messages)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pipeline.main(["--profile", "sbs", "--model", "random:a", "random:b", "--side-by-side"]) == 2
    assert any("--side-by-side" in m and "torchrun" in m for m in caplog.messages)
    assert calls == []


@pytest.mark.slow
def test_two_models_side_by_side_publish_both(tmp_path, sbs_profile, monkeypatch):
    """Two models of a profile with ``results_dir`` side by side, each a child runner publishing on its own: both
    models' tables and notebooks land, their notebooks ran at the same time (each waits for the other's start),
    then the line-up notebook ran once, as the last model's, and saw both models' published tables."""
    code = pipeline.ROOT
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    meet = tmp_path / "meet"
    meet.mkdir()
    _notebook(nb_dir / "01_t.ipynb", [
        "import time\nfrom pathlib import Path\nslug = MODEL.replace(':', '_')\n"
        f"meet = Path({str(meet)!r})\n(meet / slug).touch()\n"
        "for _ in range(1200):\n    if len(list(meet.iterdir())) == 2:\n        break\n    time.sleep(0.05)\n"
        "else:\n    raise RuntimeError('the other model did not start')",
        "d = Path(OUT_DIR) / 'tables' / 'sbs' / slug\nd.mkdir(parents=True, exist_ok=True)\n"
        "(d / 't.csv').write_text(f'x\\n{MODEL}\\n')"])
    _notebook(nb_dir / "06_lineup.ipynb", [
        "from pathlib import Path\nroot = Path(OUT_DIR) / 'tables' / 'sbs'\n"
        "(root / 'lineup.csv').write_text(''.join(sorted(p.read_text() for p in root.glob('*/t.csv'))))"])
    for nb in nb_dir.glob("*.ipynb"):  # the runner passes OUT_DIR too
        source = nbformat.read(nb, as_version=4)
        source.cells[0].source += "\nOUT_DIR = ''"
        nbformat.write(source, nb)
    (tmp_path / "README.md").write_text("<!-- table: sbs/lineup -->\n<!-- /table -->\n")
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import sys
        from dataclasses import replace
        from pathlib import Path
        from kvlib import profiles
        from kvlib.experiments import pipeline
        root = Path({str(tmp_path)!r})
        profiles.PROFILES["sbs"] = replace(profiles.PROFILES["smoke"], name="sbs", results_dir="sbs")
        profiles.COMMITTED["sbs"] = ("random:a", "random:b")
        pipeline.ROOT = root
        pipeline.notebooks = lambda root=root: sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        sys.exit(pipeline.main(sys.argv[1:]))
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "notebooks", lambda root=tmp_path: sorted(nb_dir.glob("[0-9][0-9]_*.ipynb")))
    monkeypatch.setattr(pipeline, "_child_command", lambda argv: [sys.executable, str(child), *argv])
    assert pipeline.main(["--profile", "sbs", "--model", "random:a", "random:b", "--side-by-side",
                          "--publish"]) == 0
    tables = tmp_path / "tables" / "sbs"
    assert (tables / "random_a" / "t.csv").read_text() == "x\nrandom:a\n"
    assert (tables / "random_b" / "t.csv").read_text() == "x\nrandom:b\n"
    assert (tables / "lineup.csv").read_text() == "x\nrandom:a\nx\nrandom:b\n"
    published = sorted(p.relative_to(nb_dir).as_posix() for p in (nb_dir / "sbs").rglob("*.ipynb"))
    assert published == ["sbs/random_a/01_t.ipynb", "sbs/random_b/01_t.ipynb", "sbs/random_b/06_lineup.ipynb"]
    assert set(pipeline.read_times(tmp_path / pipeline.NOTEBOOK_TIMES)) == {
        ("sbs", "random:a", "01_t.ipynb"), ("sbs", "random:b", "01_t.ipynb"), ("sbs", "random:b", "06_lineup.ipynb")}
    log = (tmp_path / "build" / "logs" / "sbs" / "random_a.log").read_text()
    assert "<== 01_t.ipynb done" in log and "published into" in log
