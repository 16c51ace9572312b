"""The notebooks in a real JupyterLab, in headless Chromium: the JupyterLab that `make lab` starts
(scripts/lab.py), on a free localhost port with a token, serving copies of notebooks/ from a temporary folder.

* every committed notebook renders its committed outputs: each HTML table as a <table>, each figure as an image,
  no error and no Markdown table left as text;
* one notebook runs on a tiny random model (SMOKE parameters, MODEL=random:tiny) through the browser's
  Run > Run All Cells, and no cell errs.

A screenshot of each notebook goes to build/browser/. Needs Debian's chromium and chromium-driver
(``apt-get install -y chromium chromium-driver``), selenium (the test extra) and JupyterLab (the lab extra); without
one of them the tests skip and say which (with ``KVLIB_REQUIRE_BROWSER=1``, as CI sets where chromium installed,
they fail instead).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SHOTS = ROOT / "build" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
RUN_ALL = "01_vram.ipynb"  # the cheapest notebook at smoke scale (~30 s on 2 cores)
RUN_PARAMETERS = {"SMOKE": True, "MODEL": "random:tiny"}
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'  # errors and warnings
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*\|", re.M)  # a Markdown table's |---|---| line



def _missing() -> str:
    """Why the browser test cannot run here ('' when it can)."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        return (f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER} not found): "
                "apt-get install -y chromium chromium-driver")
    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (the test extra): pip install -e '.[test]'"
    if importlib.util.find_spec("jupyterlab") is None:
        return "needs JupyterLab (the lab extra, as `make lab` installs it): pip install -e '.[lab]'"
    return ""


@pytest.fixture(scope="module")
def _browser_available():
    reason = _missing()
    if reason and os.environ.get("KVLIB_REQUIRE_BROWSER"):
        pytest.fail(f"KVLIB_REQUIRE_BROWSER is set but the browser test {reason}")
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """JupyterLab settings for a test: every cell kept in the page (no windowing), no news pop-up."""
    for name, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                         "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        path = folder / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _run_copy(source: Path, folder: Path, out: Path) -> Path:
    """``source`` with its parameters cell set to a tiny smoke run that writes under ``out``."""
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {**RUN_PARAMETERS, "ROOT": str(ROOT), "OUT_DIR": str(out)}
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    path = folder / f"run_{source.name}"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def lab(_browser_available, tmp_path_factory):
    """``(base URL, token, served folder)`` of a JupyterLab started by scripts/lab.py (what `make lab` runs)."""
    if shutil.which("make"):
        make = subprocess.run(["make", "-n", "lab", "VENV=" + str(Path(sys.prefix))], cwd=ROOT, capture_output=True,
                              text=True)
        assert "scripts/lab.py" in make.stdout, f"`make lab` no longer runs scripts/lab.py:\n{make.stdout}{make.stderr}"
    tmp = tmp_path_factory.mktemp("lab")
    served = tmp / "notebooks"
    served.mkdir()
    for nb in NOTEBOOKS:
        shutil.copy(nb, served / nb.name)
    _run_copy(ROOT / "notebooks" / RUN_ALL, served, tmp / "out")
    _settings(tmp / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "KVLIB_RUNS": str(tmp / "runs"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "lab.py"), "--ip", "127.0.0.1", "--port", str(port), "--token", token,
         "--notebook-dir", str(served), "--", f"--LabApp.user_settings_dir={tmp / 'settings'}",
         f"--LabApp.workspaces_dir={tmp / 'workspaces'}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"JupyterLab did not start (rc {proc.poll()}):\n{(tmp / 'lab.log').read_text()[-3000:]}")
            time.sleep(1)
        printed = (tmp / "lab.log").read_text()
        assert f"{base.replace('127.0.0.1', 'localhost')}/lab?token={token}" in printed, printed[:2000]
        yield base, token, served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _wait(what: str, predicate, timeout: float, interval: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _open(driver, lab, name: str):
    """Open notebook ``name`` in a workspace of its own; return its panel once every cell is in the page."""
    from selenium.webdriver.common.by import By

    base, token, served = lab
    n_cells = len(nbformat.read(served / name, as_version=4).cells)
    driver.get(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?token={token}")

    def panel():
        panels = [p for p in driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel") if p.is_displayed()]
        return panels and len(panels[0].find_elements(By.CSS_SELECTOR, ".jp-Cell")) == n_cells and panels[0]

    return _wait(f"{name} to show its {n_cells} cells", panel, 120)


def _expected(nb) -> tuple[int, int]:
    """``(HTML tables, images)`` among the outputs of ``nb`` (the mime type a viewer prefers: HTML over text,
    PNG over text)."""
    tables = images = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html = data.get("text/html", "")
            tables += ("".join(html) if isinstance(html, list) else html).count("<table")
            images += "image/png" in data
    return tables, images


def _shot(driver, element, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    if element is not None:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
        time.sleep(0.3)
    driver.save_screenshot(str(SHOTS / f"{Path(name).stem}.png"))


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_renders_its_committed_outputs(lab, browser, path):
    from selenium.webdriver.common.by import By

    nb = nbformat.read(path, as_version=4)
    errors = [c.get("id") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed outputs hold errors in cells {errors}"
    tables, images = _expected(nb)
    panel = _open(browser, lab, path.name)

    def rendered():
        found = (len(panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output table")),
                 len(panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")))
        return found if found == (tables, images) else None

    deadline = time.time() + 60
    while rendered() is None and time.time() < deadline:
        time.sleep(0.5)
    found = (len(panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output table")),
             len(panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")))
    first = next(iter(panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output table")), None)
    _shot(browser, first, path.name)
    assert found == (tables, images), (
        f"{path.name}: JupyterLab shows {found[0]} tables and {found[1]} images, the file holds {tables} and {images}")
    assert (tables, images) != (0, 0), f"{path.name} shows neither a table nor a figure"
    for img in panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"):
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 0, f"{path.name}: an image is empty"
    stderr = panel.find_elements(By.CSS_SELECTOR, STDERR)
    assert not stderr, f"{path.name}: error output shown: {stderr[0].text[:500]}"
    texts = [e.text for e in panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .jp-RenderedText")]
    as_text = [t for t in texts if _RULE.search(t)]
    assert not as_text, f"{path.name}: a Markdown table shown as text: {as_text[0][:300]}"


@pytest.mark.browser
@pytest.mark.slow
def test_run_all_on_a_tiny_model_in_the_browser(lab, browser):
    from selenium.webdriver.common.by import By

    name = f"run_{RUN_ALL}"
    _, _, served = lab
    panel = _open(browser, lab, name)
    n_code = sum(c.cell_type == "code" for c in nbformat.read(served / name, as_version=4).cells)
    menu = _wait("the Run menu", lambda: next((m for m in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                                              if m.text.strip() == "Run"), None), 30)
    menu.click()
    _wait("Run > Run All Cells", lambda: next((i for i in browser.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                                               if i.text.split("\n")[0].strip() == "Run All Cells"), None), 30).click()

    def prompts():
        return [p.text.strip() for p in panel.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]

    def finished():
        shown = prompts()
        errs = panel.find_elements(By.CSS_SELECTOR, STDERR)
        errs = [e.text for e in errs if "Traceback" in e.text or re.search(r"^\w+Error\b", e.text, re.M)]
        if errs:
            return ("error", errs[0])
        if len(shown) == n_code and all(re.fullmatch(r"\[\d+\]:", p) for p in shown):
            return ("done", shown)
        return None

    state, detail = _wait(f"Run All of {name} to finish", finished, 600, interval=2)
    _shot(browser, None, name)
    assert state == "done", f"{name}: a cell failed in JupyterLab:\n{detail[:3000]}"
    numbers = [int(p[1:-2]) for p in detail]
    assert numbers == sorted(numbers) and len(set(numbers)) == n_code, f"cells ran out of order: {detail}"
    assert panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output table"), f"{name} ran but shows no table"
    assert panel.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), f"{name} ran but shows no figure"


# --- the launcher itself (no browser needed) --------------------------------------------------------------------------

def _launcher():
    spec = importlib.util.spec_from_file_location("kvlib_lab_launcher", ROOT / "scripts" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("uid", [0, 1000])
def test_lab_command_binds_to_localhost_opens_no_browser_and_allows_root_only_as_root(monkeypatch, uid):
    lab = _launcher()
    monkeypatch.setattr(lab.os, "geteuid", lambda: uid)
    cmd = lab.lab_command(ROOT / "notebooks", token="t0k")
    assert cmd[1:3] == ["-m", "jupyterlab"]
    assert {"--ServerApp.ip=localhost", "--ServerApp.port=8888", "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False", "--IdentityProvider.token=t0k",
            f"--ServerApp.root_dir={ROOT / 'notebooks'}"} <= set(cmd)
    assert ("--allow-root" in cmd) == (uid == 0)


def test_lab_refuses_a_port_in_use_and_names_another(capsys):
    lab = _launcher()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert lab.main(["--ip", "127.0.0.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port}" in err and f"LAB_PORT={port + 1}" in err

