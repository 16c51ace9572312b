"""Fault injection: each test keeps one finding of a careful user's fault run (bad input, damaged files, killed
processes, concurrent writers, full disks) as a check. Numbering ``f01``...``f11`` follows those findings."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kernel_sees_this_checkout(monkeypatch):
    """Notebook kernels (subprocesses) import kvlib from this checkout, not from wherever it is installed."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
