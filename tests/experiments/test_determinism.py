"""Two cold runs with one seed write byte-identical result tables; wall-clock numbers live in timings/ files.

Notebooks 03 and 04 run twice through papermill on a tiny random model saved to a temporary folder, each run
with its own empty generation store (KVLIB_RUNS) and its own output folder (OUT_DIR).
"""

import filecmp
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvlib.experiments.pipeline import run_notebook
from kvlib.experiments.report import TIMINGS_DIR, timing_columns
from kvlib.core.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = [ROOT / "notebooks" / "03_kv_coe.ipynb", ROOT / "notebooks" / "04_switching.ipynb"]


def _tables(out: Path) -> dict[str, Path]:
    """Result tables under ``out/tables`` (timings excluded), by path relative to it."""
    base = out / "tables"
    return {str(p.relative_to(base)): p for p in sorted(base.rglob("*"))
            if p.is_file() and TIMINGS_DIR not in p.relative_to(base).parts}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """kvlib's tiny random Llama with 8 layers (the difficulty grid reads up to the last 8), saved as a folder."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    model, tok = tiny_model("llama", seed=0)
    config = model.config
    config.num_hidden_layers = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_two_cold_runs_write_identical_tables(tiny_dir, tmp_path, monkeypatch):
    outs = []
    for run in ("a", "b"):
        monkeypatch.setenv("KVLIB_RUNS", str(tmp_path / run / "runs"))
        out = tmp_path / run / "out"
        params = {"SMOKE": True, "MODEL": str(tiny_dir), "DATA_DIR": "", "SEED": 0, "OUT_DIR": str(out)}
        for nb in NOTEBOOKS:
            run_notebook(nb, tmp_path / run / "executed", params)
        outs.append(out)
    a, b = (_tables(o) for o in outs)
    for stem in ("table2_kv_coe", "table2_differences", "coe_cost", "table3_switching", "table3_pareto_points"):
        assert f"{stem}.csv" in a and f"{stem}.md" in a, f"no {stem} table under {outs[0] / 'tables'}"
    assert sorted(a) == sorted(b)
    differ = [name for name in a if not filecmp.cmp(a[name], b[name], shallow=False)]
    assert not differ, f"tables differ between two runs with one seed: {differ}"
    for name, path in a.items():  # no wall-clock column is left in a result table
        if path.suffix == ".csv":
            assert not timing_columns(pd.read_csv(path, nrows=1)), f"{name} holds timings"
    timings = pd.read_csv(outs[0] / "tables" / TIMINGS_DIR / "coe_cost.csv")
    assert {"set", "gen_seconds", "kv_coe_seconds"} <= set(timings.columns)
    # the optional set without DATA_DIR is named in the caption, not only printed
    assert "Skipped: TheoremQA (needs DATA_DIR" in (outs[0] / "tables" / "table2_kv_coe.md").read_text()
