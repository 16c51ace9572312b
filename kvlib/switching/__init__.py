"""Fast/slow thinking: protocols, difficulty, KV switching, DEER-style exit and budgets, graded answers (Tables 3, 4).

==============  ==============  =============================================================
module          formerly        concept
==============  ==============  =============================================================
``thinking``                    how a model is asked to think fast or slow, and how to switch
``difficulty``                  difficulty labels, KV features and the MLP that predicts them
``kv_switch``   kvlib.adaptive  fast/slow switches driven by KV-cache difficulty
``early_exit``                  DEER-style early exit and token budgets
``answers``                     graded fast and slow answers, generated once and shared
==============  ==============  =============================================================
"""

import importlib as _importlib

_MODULES = ('thinking', 'difficulty', 'kv_switch', 'early_exit', 'answers')


def __getattr__(name: str):
    """A submodule, imported on first use."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
