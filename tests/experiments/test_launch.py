"""The notebook runner under a launcher (``torchrun``): every rank runs the notebooks with their item loops
sharded, rank 0 alone writes the run folder, a failing rank fails the launch on every rank."""

import csv
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from kvlib.experiments import pipeline
from kvlib.profiles import get_profile

ROOT = pipeline.ROOT
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(tmp_path, runs: str) -> dict:
    """This checkout's code, one CPU thread per process (as torchrun sets for more than one), its own result store
    and temporary folder, and a short shard timeout (a stuck rank fails the test instead of hanging it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]), OMP_NUM_THREADS="1",
               KVLIB_RUNS=str(tmp_path / runs), TMPDIR=str(tmp_path / "tmp"), KVLIB_SHARD_TIMEOUT="300")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def _git_status() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an unpacked sdist)


def _tables(folder: Path) -> dict[str, bytes]:
    """Every CSV table under ``folder/tables`` but the wall-clock ones (``tables/timings/``)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "tables").rglob("*.csv"))
            if "timings" not in p.relative_to(folder).parts}


@pytest.mark.slow
def test_two_processes_give_the_tables_of_one(tmp_path):
    """``torchrun --nproc_per_node 2 -m kvlib.experiments.pipeline`` on CPU: the tables are byte-identical to a
    one-process run, the item loops were shared (shard files merged away), rank 1 wrote only its own scratch
    folder (removed after), and the checkout's tracked files are untouched."""
    before = _git_status()
    args = ["-m", "kvlib.experiments.pipeline", "--profile", "smoke", "--model", "random:tiny", "--only", "03"]
    run_dir = get_profile("smoke").with_model("random:tiny").run_dir(ROOT)

    one = subprocess.run([sys.executable, *args], env=_env(tmp_path, "runs-one"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    single = _tables(run_dir)
    assert single, f"no tables under {run_dir}/tables"
    # the kernel handed its phases to the runner, summed beside the tables (apart from them: timings/)
    with (run_dir / "tables" / "timings" / "phases.csv").open(newline="") as f:
        phases = {r["phase"] for r in csv.DictReader(f) if r["notebook"] == "03_kv_coe.ipynb"}
    assert {"(notebook)", "model load", "self-evaluation", "self-evaluation/generation",
            "self-evaluation/generation/extract kv", "(outside phases)"} <= phases, phases

    two = subprocess.run([*LAUNCH, *args], env=_env(tmp_path, "runs-two"), capture_output=True, text=True)
    log = two.stdout + two.stderr
    assert two.returncode == 0, log[-3000:]
    assert _tables(run_dir) == single
    # both ranks ran the notebook; rank 1 wrote into its own scratch folder, not the run folder, and removed it
    assert "[rank 0 of 2] <== 03_kv_coe.ipynb done" in log and "[rank 1 of 2] <== 03_kv_coe.ipynb done" in log
    assert f"scratch folder {tmp_path / 'tmp'}" in log and "[rank 1 of 2] results go to" not in log
    assert not list((tmp_path / "tmp").glob("kvlib-rank*"))
    assert pipeline.read_times(run_dir / "timings.csv")[("smoke", "random:tiny", "03_kv_coe.ipynb")] > 0
    # the same stores as one process, no shard file left over: the merge by rank 0 happened
    stores = {p.relative_to(tmp_path / "runs-two") for p in (tmp_path / "runs-two").rglob("*.jsonl")}
    assert stores == {p.relative_to(tmp_path / "runs-one") for p in (tmp_path / "runs-one").rglob("*.jsonl")}
    assert stores and not [p for p in stores if ".shard-" in p.name]
    assert _git_status() == before


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("PROFILE = 'small'\nMODEL = ''\nDATA_DIR = ''\nOUT_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


def test_a_failing_rank_fails_the_launch_on_every_rank(tmp_path):
    """Rank 1's notebook raises while rank 0's is still running: rank 1 names the cell and says the launch fails;
    rank 0 is stopped promptly, says so, and publishes nothing."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "01_split.ipynb", "import os, time\n"
              "if os.environ['RANK'] == '1':\n    raise ValueError('rank one cannot go on')\ntime.sleep(300)")
    (tmp_path / "tables").mkdir()
    (tmp_path / "README.md").write_text("x\n")
    script = tmp_path / "runner.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kvlib.experiments import pipeline
        pipeline.ROOT = Path({str(tmp_path)!r})
        pipeline.notebooks = lambda root=None: sorted((pipeline.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        sys.exit(pipeline.main(["--profile", "small", "--publish"]))
    """))
    t0 = time.monotonic()
    run = subprocess.run([*LAUNCH, str(script)], env=_env(tmp_path, "runs"), capture_output=True, text=True,
                         timeout=240)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert time.monotonic() - t0 < 200, "rank 0 ran its notebook to the end instead of being stopped"
    assert "[rank 1 of 2] FAILED: 01_split.ipynb: cell 1" in log and "rank one cannot go on" in log
    assert "[rank 1 of 2] rank 1 of 2 failed, so the launch fails" in log
    assert "[rank 0 of 2] stopped by the launcher" in log and "Nothing was published" in log
    assert not list((tmp_path / "notebooks").glob("*/")) and nbformat.read(
        nbdir / "01_split.ipynb", as_version=4).cells[1].outputs == []
    assert list((tmp_path / "tables").iterdir()) == []


@pytest.mark.parametrize("visible, local, expected", [(None, "1", "1"), ("4,6", "1", "6"), ("3", "0", "3"),
                                                      (None, "2", "too many")])
def test_each_rank_shows_its_kernels_its_own_gpu(monkeypatch, visible, local, expected):
    """A profile's ``"cuda"`` is this rank's GPU: the kernels see ``CUDA_VISIBLE_DEVICES`` of ``LOCAL_RANK``'s GPU
    alone (of those the launcher showed, or of every GPU); a rank past the GPUs is refused, saying why."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", local)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if expected == "too many":
        with pytest.raises(pipeline.RunError, match="LOCAL_RANK=2 but this machine shows 2 GPU"):
            pipeline._pin_gpu()
        return
    pipeline._pin_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_a_half_set_launch_is_refused(monkeypatch, caplog):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pipeline.main(["--dry-run", "--only", "01"]) == 2
    assert any("RANK='1' but WORLD_SIZE=None" in m for m in caplog.messages)
