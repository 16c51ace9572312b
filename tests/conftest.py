import os
import signal
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "KVLIB_DATA_DIR"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run many times faster on one thread than on two busy cores (OpenMP spin-waits).
torch.set_num_threads(1)


def _data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The external data folder: the files no package ships (``theoremqa_test.json``, ``amazon_counterfactual/``,
    ``financial_phrasebank_allagree.txt``; what ``kvlib reproduce --data-dir`` reads). ``$KVLIB_DATA_DIR``, else
    ``../shared/data`` beside the checkout. A test that needs it is skipped, saying so, when the folder is absent."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"needs the external data folder: {path} does not exist (set {DATA_DIR_ENV} to the folder "
                    "holding theoremqa_test.json, amazon_counterfactual/ and financial_phrasebank_allagree.txt)")
    return path


@pytest.fixture(scope="session")
def optional_data_dir() -> Path | None:
    """The external data folder of :func:`data_dir`, or ``None`` when absent: for runs that leave the optional
    sets out without it (the notebooks' ``DATA_DIR`` parameter)."""
    path = _data_dir()
    return path if path.is_dir() else None


@pytest.fixture(autouse=True)
def _python_ctrl_c():
    """Every test starts with Python's own Ctrl-C handling (SIGINT raises KeyboardInterrupt). Code that a test runs
    in this process may leave SIGINT ignored (a Jupyter kernel app sets SIG_IGN when it initialises), and every
    child process started later would inherit that and ignore a Ctrl-C the test sends it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def _static_cache_everywhere(request, monkeypatch):
    """``KVLIB_TEST_STATIC=1``: every decode whose config says ``cache="auto"`` takes the static cache (eagerly on
    the CPU), so that the whole suite exercises the GPU's cache path (CI runs the fast tests so once more). Tests
    marked ``dynamic_cache`` (rows leaving the batch, two results' caches compared after both ran, the choice of
    cache itself) are skipped then."""
    if os.environ.get("KVLIB_TEST_STATIC") == "1":
        if request.node.get_closest_marker("dynamic_cache"):
            pytest.skip("about the dynamic cache (KVLIB_TEST_STATIC=1)")
        from kvlib.core.cache import supports_static
        from kvlib.core.decoding import DecodeConfig

        original = DecodeConfig.static_for
        monkeypatch.setattr(DecodeConfig, "static_for", lambda self, model, device: supports_static(model)
                            if self.cache == "auto" else original(self, model, device))
