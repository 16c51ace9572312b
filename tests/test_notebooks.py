"""End-to-end smoke run of every numbered notebook through papermill (SMOKE=True: tiny sizes, smallest model).

Outputs go to build/smoke/ (never over the committed tables and figures); the generation store goes to a
temporary folder. Each notebook must run top to bottom and write at least one table (CSV) and a figure or a
Markdown table.
"""

import time
from pathlib import Path

import pytest

from kvlib.experiments.pipeline import notebooks, run_notebook

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
NOTEBOOKS = notebooks(ROOT)


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == sorted({p.name[:2] for p in NOTEBOOKS})
    assert len(NOTEBOOKS) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIB_RUNS", str(tmp_path / "runs"))
    start = time.time() - 1
    params = {"SMOKE": True, "DATA_DIR": str(SHARED_DATA) if SHARED_DATA.exists() else ""}
    run_notebook(path, tmp_path / "executed", params)
    smoke = ROOT / "build" / "smoke"
    fresh = [p for p in smoke.rglob("*") if p.is_file() and p.stat().st_mtime >= start]
    assert any(p.suffix == ".csv" for p in fresh), f"{path.name} wrote no table under build/smoke/"
    assert any(p.suffix in (".png", ".md") for p in fresh), f"{path.name} wrote no figure or table under build/smoke/"
