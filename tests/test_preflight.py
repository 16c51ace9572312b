"""scripts/preflight.py: the checks `make` runs with the system Python before it installs anything.

Every check is a function of the conditions it reads (version, modules found, free bytes per filesystem), so
these tests fake the conditions instead of needing an old Python or a full disk.
"""

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "preflight.py"
GB = 1e9

_spec = importlib.util.spec_from_file_location("preflight", SCRIPT)
pf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pf)


def test_requires_python_is_read_as_tomllib_reads_it():
    text = (ROOT / "pyproject.toml").read_text()
    assert pf.parse_requires_python(text) == tomllib.loads(text)["project"]["requires-python"]
    assert pf.version_satisfies(tuple(sys.version_info[:3]), pf.parse_requires_python(text))


@pytest.mark.parametrize("version, spec, ok", [
    ((3, 10, 12), ">=3.11", False), ((3, 11, 0), ">=3.11", True), ((3, 13, 1), ">=3.11", True),
    ((3, 13, 1), ">=3.11,<3.13", False), ((3, 12, 9), ">=3.11, <3.13", True), ((3, 11, 4), "==3.11.*", True),
    ((3, 12, 0), "==3.11.*", False), ((3, 11, 2), "~=3.11", True), ((4, 0, 0), "~=3.11", False),
    ((3, 9, 0), "", True),
])
def test_version_satisfies(version, spec, ok):
    assert pf.version_satisfies(version, spec) is ok


def test_unreadable_specifier_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="requires-python"):
        pf.version_satisfies((3, 11, 0), ">=3.11-beta")


def _no_candidates():
    raise AssertionError("PATH is searched only when the running Python does not fit")


def test_fitting_python_passes_without_searching_path():
    assert pf.check_python((3, 11, 7), ">=3.11", "/usr/bin/python3", "debian", _no_candidates) == []


def test_old_python_names_the_package_to_install_and_the_make_variable():
    (msg,) = pf.check_python((3, 10, 12), ">=3.11", "/usr/bin/python3", "ubuntu debian", lambda: [], "test")
    assert "Python 3.10.12 (/usr/bin/python3) is too old" in msg and ">=3.11" in msg
    assert "sudo apt install python3.11 python3.11-venv" in msg
    assert "conda env create -f environment.yml" in msg and "make test PYTHON=python3.11" in msg
    (msg,) = pf.check_python((3, 9, 0), ">=3.11", "python3", "fedora", lambda: [])
    assert "sudo dnf install python3.11" in msg


def test_old_python_points_at_a_newer_interpreter_already_on_path():
    found = [("/usr/bin/python3.10", (3, 10, 4)), ("/opt/py/bin/python3.12", (3, 12, 3))]
    (msg,) = pf.check_python((3, 10, 4), ">=3.11", "/usr/bin/python3", "ubuntu", lambda: found)
    assert "PYTHON=/opt/py/bin/python3.12" in msg and "apt install" not in msg


def test_missing_ensurepip_names_the_venv_package():
    def find_spec(name):
        return None if name == "ensurepip" else object()

    (msg,) = pf.check_venv_module((3, 11, 2), find_spec, "debian")
    assert "lacks ensurepip" in msg and "sudo apt install python3.11-venv" in msg
    assert pf.check_venv_module((3, 11, 2), lambda name: object(), "debian") == []
    (msg,) = pf.check_venv_module((3, 12, 0), lambda name: None, "arch")
    assert "venv and ensurepip" in msg and "apt" not in msg


@pytest.mark.parametrize("goals, model, comps, models", [
    ([], "", ["torch", "deps", "assets"], []),
    (["venv"], "", ["torch", "deps", "assets"], []),
    (["test"], "", ["torch", "deps", "assets", "test"], ["smollm2-135m"]),
    (["venv-test"], "", ["torch", "deps", "assets", "test"], []),
    (["reproduce"], "", ["torch", "deps", "assets"], ["qwen2.5-0.5b"]),
    (["reproduce"], "qwen2.5-1.5b", ["torch", "deps", "assets", "assets-extra"], ["qwen2.5-1.5b"]),
    (["reproduce"], "Qwen/Qwen3-8B", ["torch", "deps", "assets"], []),
    (["reproduce"], "qwen2.5-0.5b qwen2.5-1.5b", ["torch", "deps", "assets", "assets-extra"],
     ["qwen2.5-0.5b", "qwen2.5-1.5b"]),
    (["lab"], "", ["torch", "deps", "assets", "lab"], []),
    (["extra"], "", ["torch", "deps", "assets", "assets-extra"], []),
])
def test_what_each_goal_installs_and_converts(goals, model, comps, models):
    assert pf.components_for(goals, model) == (comps, models)


def test_parts_in_place_count_zero(tmp_path):
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    env = {"KVLIB_CACHE": str(cache), "PIP_NO_CACHE_DIR": "1"}
    fresh = pf.needs(["test"], "", str(venv), env)
    assert {(p, role) for p, role, _, _ in fresh} == {(str(venv), "venv"), (str(cache), "models")}
    total = sum(size for _, _, size, _ in fresh)
    assert 2.5 * GB < total < 4 * GB  # venv with test extras (~2.8 GB) + SmolLM2 in fp32 (~0.5 GB)
    (venv / "lib" / "python3.11" / "site-packages" / "torch").mkdir(parents=True)
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "kvlib-source.json").write_text("{}")
    left = pf.needs(["test"], "", str(venv), env)
    assert not any("torch" in what or "smollm2" in what for _, _, _, what in left)
    assert sum(size for _, _, size, _ in left) == pytest.approx(total - pf.COMPONENTS["torch"][2] -
                                                            pf.CONVERTED["smollm2-135m"][0])


def test_pip_cache_and_model_cache_follow_the_environment(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert pf.cache_root(env) == str(tmp_path / "xdg" / "kvlib")
    assert pf.cache_root({"KVLIB_CACHE": "/big/kv", **env}) == "/big/kv"
    needs = pf.needs(["venv"], "", str(tmp_path / "v"), {"PIP_CACHE_DIR": str(tmp_path / "pip")})
    assert (str(tmp_path / "pip"), "pip", pf.COMPONENTS["torch"][1], "torch") in needs


def test_disk_needs_on_one_filesystem_add_up():
    needs = [("/a/venv", "venv", 2 * GB, "torch"), ("/a/cache", "models", 2 * GB, "qwen2.5-0.5b in fp32")]
    same = lambda path: 1  # noqa: E731
    apart = lambda path: hash(path.split("/")[2])  # noqa: E731
    assert pf.check_disk(needs, "test", free_bytes=lambda p: 3 * GB, device_of=apart) == []
    (msg,) = pf.check_disk(needs, "test", free_bytes=lambda p: 3 * GB, device_of=same)
    assert "3.0 GB free, about 4.7 GB needed" in msg  # 4 GB x 1.1 + 0.3 GB headroom
    assert "/a/venv (the virtual environment): torch 2.00 GB" in msg
    assert "/a/cache (converted models, written on first load): qwen2.5-0.5b in fp32 2.00 GB" in msg
    assert "Free 1.7 GB there" in msg
    assert "make test VENV=" in msg and "export KVLIB_CACHE=" in msg and "PIP_CACHE_DIR" not in msg
    assert pf.check_disk(needs, "test", free_bytes=lambda p: 5 * GB, device_of=same) == []


def test_main_fails_with_the_disk_message_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pf, "_free", lambda path: 0.5 * GB)
    assert pf.main(["--goals", "reproduce", "--venv", str(tmp_path / "venv")]) == 1
    err = capsys.readouterr().err
    assert "preflight for `make reproduce` failed" in err and "qwen2.5-0.5b in fp32" in err
    monkeypatch.setattr(pf, "_free", lambda path: 100 * GB)
    assert pf.main(["--goals", "reproduce", "--venv", str(tmp_path / "venv")]) == 0
    assert "preflight: Python" in capsys.readouterr().out


def test_runs_on_the_bare_standard_library(tmp_path):
    """No site-packages at all (-S -I): the script must not need anything the venv would bring."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KVLIB_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT), "--goals", "venv", "--venv", str(tmp_path / "v")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("preflight: Python")
    say = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT), "--announce", "torch", "torch==2.13.0"],
                         capture_output=True, text=True, env=env)
    assert say.stdout.strip().startswith("installing torch==2.13.0 (CPU build") and "MB to download" in say.stdout


def test_source_stays_readable_by_old_pythons():
    """An old interpreter must get as far as printing "too old": no f-strings, annotations or newer syntax."""
    source = SCRIPT.read_text()
    tree = ast.parse(source, feature_version=(3, 6))
    newer = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.JoinedStr, ast.AnnAssign, ast.NamedExpr))]
    newer += ["annotation" for n in ast.walk(tree) if isinstance(n, ast.arg) and n.annotation is not None]
    newer += ["return annotation" for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
    assert not newer, newer
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_unknown_announcement_is_refused(capsys):
    assert pf.main(["--announce", "everything"]) == 2
    assert "needs one of" in capsys.readouterr().err


def test_announcement_says_when_a_part_is_already_there(tmp_path):
    (tmp_path / "lib" / "python3.11" / "site-packages" / "mteb").mkdir(parents=True)
    assert pf.announce("test", present=pf.installed(str(tmp_path), "test")).startswith("checking the test extras")
    assert "~150 MB to download" in pf.announce("test", present=pf.installed(str(tmp_path / "no"), "test"))


def test_model_sizes_match_the_library():
    """The disk asked for each embedded model is what kvlib writes: fp32 weights of the GGUF's real shape."""
    from kvlib import cli
    from kvlib.core.memory import memory_estimate
    from kvlib.core.models import EMBEDDED_MODELS

    assert set(pf.CONVERTED) == set(EMBEDDED_MODELS)
    checked = 0
    for name, spec in EMBEDDED_MODELS.items():
        folder, staging = pf.CONVERTED[name]
        assert staging == (0 if len(spec.files) == 1 else pytest.approx(spec.size, rel=0.02)), name
        files = cli._package_files(spec)
        if None in files:
            continue  # the 1.5B packages come with `make extra` only
        weights = memory_estimate(cli.gguf_config(files), 0, "fp32")["weights"]
        assert folder == pytest.approx(weights, rel=0.03), f"{name}: converted size {weights / GB:.2f} GB"
        checked += 1
    assert checked >= 2  # SmolLM2 and Qwen2.5-0.5B ship with the base environment
