"""End-to-end smoke run of every numbered notebook through papermill (SMOKE=True: tiny sizes, smallest model).

Outputs go to build/smoke/ (never over the committed tables and figures); the generation store goes to a
temporary folder. Each notebook must run top to bottom and write at least one table (CSV) and a figure or a
Markdown table; its outputs show no table as Markdown text and, as published, no path of this machine.
"""

import re
import time
from pathlib import Path

import nbformat
import pytest

from kvlib.experiments.notebook_outputs import clean_outputs
from kvlib.experiments.pipeline import notebooks, run_notebook
from kvlib.core.paths import machine_paths_in

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = notebooks(ROOT)
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*\|", re.M)  # a Markdown table's |---|---| line


def output_problems(executed: Path, roots=()) -> list[str]:
    """What a reader would trip over in the outputs of ``executed``: a Markdown table printed as text, an error, or
    (in the published form, :func:`clean_outputs`) an absolute path of this machine or under ``roots``."""
    problems = []
    for cell in nbformat.read(executed, as_version=4).cells:
        outputs = cell.get("outputs", [])
        for out in outputs:
            if out.get("output_type") == "error":
                problems.append(f"cell {cell.get('id')}: {out.get('ename')}")
            if out.get("output_type") == "stream" and out.get("name") == "stdout" and _RULE.search(out.get("text", "")):
                problems.append(f"cell {cell.get('id')}: a Markdown table printed as text")
        for out in clean_outputs([dict(o) for o in outputs]):
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                problems += [f"cell {cell.get('id')}: path {p}" for p in machine_paths_in(text, roots)]
    return problems


def test_the_runner_finds_every_documented_notebook_and_each_takes_the_parameters_it_is_given():
    """The runner's notebooks are numbered 01, 02, ... without gap or repeat, are exactly those the experiments
    package documents (one module each), and each has one ``parameters`` cell assigning every name that
    ``kvlib reproduce`` and the smoke runs pass (papermill overrides what that cell assigns)."""
    import ast
    import re

    import nbformat

    import kvlib.experiments

    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(1, len(numbers) + 1)], numbers
    documented = set(re.findall(r"^``\w+``\s+(\d\d): ", kvlib.experiments.__doc__, flags=re.M))
    assert documented == set(numbers), f"documented {sorted(documented)}, found {numbers}"
    passed = {"PROFILE", "MODEL", "DATA_DIR", "SMOKE", "OUT_DIR"}
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells
                 if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged parameters"
        assigned = {t.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        assert passed <= assigned, f"{path.name}'s parameters cell lacks {sorted(passed - assigned)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke(path, tmp_path, monkeypatch, optional_data_dir):
    monkeypatch.setenv("KVLIB_RUNS", str(tmp_path / "runs"))
    start = time.time() - 1
    params = {"SMOKE": True, "DATA_DIR": str(optional_data_dir or "")}
    executed = run_notebook(path, tmp_path / "executed", params)
    assert not output_problems(executed, [tmp_path]), output_problems(executed, [tmp_path])
    smoke = ROOT / "build" / "smoke"
    fresh = [p for p in smoke.rglob("*") if p.is_file() and p.stat().st_mtime >= start]
    assert any(p.suffix == ".csv" for p in fresh), f"{path.name} wrote no table under build/smoke/"
    assert any(p.suffix in (".png", ".md") for p in fresh), f"{path.name} wrote no figure or table under build/smoke/"


@pytest.mark.slow
def test_dryrun_profile_runs_every_notebook_on_a_random_thinking_model(tmp_path, monkeypatch):
    """The dry-run profile (on a GPU: random weights at Qwen3-8B's shape) end to end through the runner, here at
    the tiny shape on the CPU: every notebook on a thinking model whose answers are all wrong, results and
    timings under build/dryrun/ only."""
    import subprocess
    import sys

    monkeypatch.setenv("KVLIB_RUNS", str(tmp_path / "runs"))
    start = time.time() - 1
    proc = subprocess.run([sys.executable, "-m", "kvlib.experiments.pipeline", "--profile", "dryrun", "--model",
                           "random:tiny", "--out", str(tmp_path / "executed")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 6 notebooks done" in proc.stderr or "all 6 notebooks done" in proc.stdout
    out = ROOT / "build" / "dryrun"
    fresh = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= start}
    assert fresh == {"tables", "figures", "timings.csv"}
    changed = [p for p in (ROOT / "tables").rglob("*") if p.is_file() and p.stat().st_mtime >= start]
    assert not changed, f"a scratch profile wrote committed results: {changed}"
