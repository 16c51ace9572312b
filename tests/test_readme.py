"""The README's library example runs as printed (on a tiny model instead of the downloaded one)."""

import re
from pathlib import Path

import numpy as np

import kvlib

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README.md has no python example"
    monkeypatch.setattr(kvlib, "load_model", lambda name, **kw: kvlib.tiny_model("qwen2"))
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert np.asarray(scope["emb"]).shape[0] == 1
    assert set(scope["scores"]) == {"R", "C"}
    assert scope["layers"][0][0].dim() == 4 and scope["sizes"]["kv_cache"] > 0
