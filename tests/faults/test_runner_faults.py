"""Findings 3, 4 (the runner's message), 5, 8, 9 and 11 (README markers) on the notebook runner, with a throwaway
source checkout (a git repository holding pyproject.toml, notebooks/, tables/, figures/ and a README) whose
notebooks write through :meth:`kvlib.profiles.Profile.output_dirs` as the real ones do."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from kvlib.experiments import pipeline

from .conftest import REPO

WRITE_TABLE = """
from pathlib import Path
from kvlib.profiles import get_profile
profile = get_profile(PROFILE).with_model(MODEL)
TABLES, FIGURES = profile.output_dirs(OUT_DIR or ROOT)
(TABLES / "t1.md").write_text(f"table of {profile.name} {profile.model}\\n")
(FIGURES / "f1.png").write_bytes(b"png of " + profile.model.encode())
print("wrote", TABLES)
"""


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('PROFILE = "small"\nMODEL = ""\nDATA_DIR = ""\nROOT = ".."\nOUT_DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


@pytest.fixture
def checkout(tmp_path, monkeypatch, kernel_sees_this_checkout):
    """A committed checkout: README with a table marker, tables/t1.md, figures/f1.png, two notebooks."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "tables").mkdir()
    (root / "figures").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / ".gitignore").write_text("build/\n")
    (root / "README.md").write_text("# x\n<!-- table: t1 -->\ncommitted\n<!-- /table -->\n")
    (root / "tables" / "t1.md").write_text("committed\n")
    (root / "figures" / "f1.png").write_bytes(b"committed")
    _notebook(root / "notebooks" / "01_write.ipynb", WRITE_TABLE)
    _notebook(root / "notebooks" / "02_more.ipynb", "x = 1\nprint(x)")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(git + ["-C", str(root), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(root), "commit", "-qm", "committed results"], check=True)
    monkeypatch.setattr(pipeline, "ROOT", root)
    monkeypatch.setattr(pipeline, "notebooks", lambda r=root: sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    return root


def _status(root) -> str:
    return subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                          check=True).stdout


def test_f03_a_scratch_run_leaves_git_status_clean(checkout):
    assert pipeline.main(["--profile", "smoke", "--model", "random:tiny"]) == 0
    assert _status(checkout) == ""
    run = checkout / "build" / "smoke" / "random_tiny"
    assert (run / "tables" / "t1.md").read_text() == "table of smoke random:tiny\n"
    assert (run / "notebooks" / "01_write.ipynb").exists() and (run / "timings.csv").exists()
    # the profile of the committed results with another model, or without --publish, is a scratch run too
    assert pipeline.main(["--profile", "small", "--model", "random:tiny"]) == 0
    assert pipeline.main(["--profile", "small"]) == 0
    assert _status(checkout) == ""


def test_f03_a_notebook_run_by_hand_in_a_checkout_writes_under_build(checkout):
    from kvlib.profiles import get_profile

    tables, _ = get_profile("small").with_model("random:tiny").output_dirs(checkout)
    assert tables == checkout / "build" / "small" / "random_tiny" / "tables"
    assert get_profile("small").output_dirs(checkout)[0] == checkout / "tables"  # the committed pair
    assert get_profile("dryrun").output_dirs(checkout)[0].is_relative_to(checkout / "build")


def test_f03_publish_changes_readme_and_tables_together(checkout):
    assert pipeline.main(["--profile", "small", "--publish"]) == 0
    assert (checkout / "tables" / "t1.md").read_text() == "table of small qwen2.5-0.5b\n"
    assert "table of small qwen2.5-0.5b" in (checkout / "README.md").read_text()
    assert nbformat.read(checkout / "notebooks" / "01_write.ipynb", as_version=4).cells[1].outputs


def test_f03_publish_is_all_or_nothing(checkout):
    _notebook(checkout / "notebooks" / "02_more.ipynb", "raise RuntimeError('late failure')")
    subprocess.run(["git", "-C", str(checkout), "commit", "-qam", "a failing notebook"], check=True)
    assert pipeline.main(["--profile", "small", "--publish"]) == 1
    assert _status(checkout) == ""  # 01 succeeded, but nothing of it was copied


def test_f03_publish_of_a_scratch_pair_is_refused(checkout, caplog):
    assert pipeline.main(["--profile", "smoke", "--model", "random:tiny", "--publish"]) == 2
    assert "did not produce the committed results" in caplog.text and _status(checkout) == ""


def test_f04_the_runner_names_the_failing_line_not_the_cells_first_line(checkout, caplog):
    _notebook(checkout / "notebooks" / "02_more.ipynb", "x = 1\ny = x + 1\nint('not a number')\nz = 3")
    assert pipeline.main(["--profile", "smoke", "--only", "02"]) == 1
    assert "line 3: \"int('not a number')\" failed with ValueError" in caplog.text


def test_f05_a_missing_data_dir_unknown_profile_and_unknown_model_fail_before_any_notebook(checkout, caplog):
    assert pipeline.main(["--data-dir", "/does/not/exist"]) == 2
    assert "--data-dir /does/not/exist: no such folder" in caplog.text
    assert pipeline.main(["--profile", "nope"]) == 2
    assert "unknown profile 'nope'; choose one of" in caplog.text
    assert pipeline.main(["--profile", "smoke", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in caplog.text
    assert not (checkout / "build").exists()  # no notebook ran
    assert "Traceback" not in caplog.text


@pytest.mark.skipif(not os.path.exists("/usr/bin/make") and not os.path.exists("/bin/make"), reason="no make")
@pytest.mark.parametrize("args, says", [(["DATA_DIR=/does/not/exist", "PROFILE=smoke"], "no such folder"),
                                        (["PROFILE=nope"], "unknown profile 'nope'")])
def test_f05_make_reproduce_fails_on_bad_input(args, says):
    venv = os.path.dirname(os.path.dirname(sys.executable))
    proc = subprocess.run(["make", "-s", "-o", f"{venv}/.base", "reproduce", f"VENV={venv}", "MODEL=random:tiny",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_f08_ctrl_c_says_a_rerun_resumes_in_one_line(checkout):
    _notebook(checkout / "notebooks" / "02_more.ipynb", "print('started', flush=True)\nimport time\ntime.sleep(120)")
    code = ("import sys\nfrom pathlib import Path\nfrom kvlib.experiments import pipeline\nroot = Path(sys.argv[1])\n"
            "pipeline.ROOT = root\npipeline.notebooks = lambda r=root: sorted((root / 'notebooks').glob('0*.ipynb'))\n"
            "sys.exit(pipeline.main(['--profile', 'smoke', '--only', '02']))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(checkout)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in proc.stdout:  # the cell's output, as the runner logs it: the kernel is busy in time.sleep
        if "started" in line:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "run the same command again to resume" in err
    assert "Traceback" not in err, err


def test_f08_a_killed_kernel_leaves_an_executed_copy_without_completed_cells_after_it(tmp_path):
    path = tmp_path / "04_oom.ipynb"
    _notebook(path, "x = 1", "import os\nos.kill(os.getpid(), 9)", "y = 2", "z = 3")
    with pytest.raises(pipeline.KernelDiedError) as err:
        pipeline.run_notebook(path, tmp_path / "out", {"PROFILE": "small"})
    cells = nbformat.read(err.value.executed, as_version=4).cells
    status = [c.metadata.get("papermill", {}).get("status") for c in cells if "os.kill" in c.source or
              c.source in ("y = 2", "z = 3")]
    assert status == ["failed", "pending", "pending"]


@contextlib.contextmanager
def _lock_held_elsewhere(lock, folder, before: str = ""):
    """Another process that creates ``folder``, runs ``before`` there (``folder`` is ``f``), takes ``lock`` as a
    writer of it and holds it until the block ends; yields that process."""
    code = ("import sys\nfrom pathlib import Path\nfrom kvlib.runs.writer_lock import acquire\n"
            "f = Path(sys.argv[1]); f.mkdir(parents=True, exist_ok=True)\n"
            f"{before}\nacquire(Path(sys.argv[2]), f); print('held', flush=True); sys.stdin.readline()")
    other = subprocess.Popen([sys.executable, "-c", code, str(folder), str(lock)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline().strip() == "held"
        yield other
    finally:
        other.stdin.close()
        other.wait(timeout=30)


def test_f09_two_runs_at_once_do_not_write_the_same_executed_copy(checkout, caplog):
    out = checkout / "build" / "smoke" / "random_tiny" / "notebooks"
    with _lock_held_elsewhere(out / ".kvlib-run.lock", out) as other:
        assert pipeline.main(["--profile", "smoke", "--model", "random:tiny"]) == 2
    assert f"pid {other.pid}" in caplog.text and "another --out" in caplog.text
    assert not (out / "01_write.ipynb").exists()


def test_f09_a_second_publishing_run_keeps_the_first_ones_stage(checkout, caplog):
    stage = checkout / "build" / "publish" / "small" / "qwen2.5-0.5b"
    lock = stage.parent / f".{stage.name}.lock"
    with _lock_held_elsewhere(lock, stage, before="(f / 'half.md').write_text('being written')") as other:
        assert pipeline.main(["--profile", "small", "--publish", "--only", "02"]) == 2
        assert (stage / "half.md").read_text() == "being written"  # the first run's stage is untouched
    assert f"pid {other.pid}" in caplog.text and "--only 03 04" in caplog.text and _status(checkout) == ""
    assert pipeline.main(["--profile", "small", "--publish"]) == 0  # the lock went with its process


def test_f11_readme_table_markers_stay_inside_tables(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "secret.md").write_text("outside\n")
    (tmp_path / "tables" / "link.md").symlink_to(tmp_path / "secret.md")
    text = ("<!-- table: ../secret -->\nkeep1\n<!-- /table -->\n<!-- table: link -->\nkeep2\n<!-- /table -->\n"
            "<!-- table: a/../../secret -->\nkeep3\n<!-- /table -->\n")
    (tmp_path / "README.md").write_text(text)
    assert pipeline.update_readme(tmp_path) == []
    assert (tmp_path / "README.md").read_text() == text


@pytest.mark.slow
def test_f03_the_real_kv_coe_notebook_on_a_random_model_leaves_a_copy_of_this_repository_clean(tmp_path):
    """``kvlib reproduce --profile smoke --model random:tiny --only 03`` in a committed copy of this checkout:
    its tables, figures and executed notebook land in build/, and ``git status`` stays clean."""
    copy = tmp_path / "repo"
    copy.mkdir()
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", str(tmp_path / "a.tar")], input=files,
                   check=True)
    subprocess.run(["tar", "-C", str(copy), "-xf", str(tmp_path / "a.tar")], check=True)
    git = ["git", "-C", str(copy), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], check=True)
    env = {**os.environ, "PYTHONPATH": str(copy), "KVLIB_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", "kvlib.cli", "reproduce", "--profile", "smoke", "--model",
                           "random:tiny", "--only", "03"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _status(copy) == ""
    run = copy / "build" / "smoke" / "random_tiny"
    assert (run / "tables" / "table2_kv_coe.md").exists() and (run / "notebooks" / "03_kv_coe.ipynb").exists()
