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


def _module_table(title: str) -> list[str]:
    """Module names in the first column of the table under the README heading ``### {title}``."""
    text = README.read_text(encoding="utf-8")
    section = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, f"README.md has no section '### {title}'"
    rows = [ln for ln in section.group(1).splitlines() if ln.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([\w/]+)`", row.split("|")[1])]


def _modules(folder: Path) -> set[str]:
    """The modules of ``folder`` (``group/module`` inside its subpackages), deprecated import paths left out."""
    files = [p for p in folder.glob("*.py") if "sys.modules[__name__] = " not in p.read_text(encoding="utf-8")]
    if folder.name == "kvlib":
        files += [p for p in folder.glob("*/*.py") if p.parent.name != "experiments"]
    return {p.relative_to(folder).with_suffix("").as_posix() for p in files if p.stem != "__init__"}


def test_readme_lists_every_module_in_its_group():
    """The module table names every library module (kvlib/) and every experiment module (kvlib/experiments/),
    each once and in its own group, and nothing that does not exist."""
    package = Path(kvlib.__file__).parent
    groups = {"Library (`kvlib/`)": package, "Experiments (`kvlib/experiments/`)": package / "experiments"}
    for title, folder in groups.items():
        listed = _module_table(title)
        assert len(listed) == len(set(listed)), f"{title}: a module is listed twice: {sorted(listed)}"
        assert set(listed) == _modules(folder), (
            f"{title}: missing {sorted(_modules(folder) - set(listed))}, "
            f"not a module there {sorted(set(listed) - _modules(folder))}")


def test_every_relative_link_and_image_in_the_readme_exists():
    """A link into a run folder (``build/...``) or to a table that was never committed is broken on GitHub."""
    root = README.parent
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links no file at all"
    missing = sorted({t for t in local if t.startswith(("build/", "runs/")) or not (root / t).exists()})
    assert not missing, f"README links files that do not exist: {missing}"
