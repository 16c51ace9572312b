"""The math data sets and answer grading.

===========  ========  ======================================================================
module       formerly  concept
===========  ========  ======================================================================
``data``               GSM8K, MATH, MATH-500, SVAMP, ASDiv, MAWPS, TheoremQA as one item type
``grading``            answer extraction and grading (math-verify)
===========  ========  ======================================================================
"""

import importlib as _importlib

_MODULES = ('data', 'grading')


def __getattr__(name: str):
    """A submodule, imported on first use."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
