import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run many times faster on one thread than on two busy cores (OpenMP spin-waits).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _static_cache_everywhere(request, monkeypatch):
    """``KVLIB_TEST_STATIC=1``: every decode whose config says ``cache="auto"`` takes the static cache (eagerly on
    the CPU), so that the whole suite exercises the GPU's cache path (CI runs the fast tests so once more). Tests
    marked ``dynamic_cache`` (rows leaving the batch, two results' caches compared after both ran, the choice of
    cache itself) are skipped then."""
    if os.environ.get("KVLIB_TEST_STATIC") == "1":
        if request.node.get_closest_marker("dynamic_cache"):
            pytest.skip("about the dynamic cache (KVLIB_TEST_STATIC=1)")
        from kvlib.cache import supports_static
        from kvlib.decoding import DecodeConfig

        original = DecodeConfig.static_for
        monkeypatch.setattr(DecodeConfig, "static_for", lambda self, model, device: supports_static(model)
                            if self.cache == "auto" else original(self, model, device))
