"""The model, its KV cache (the one reader of transformers' cache internals), one decoding loop, memory.

==============  ========  =============================================================================
module          formerly  concept
==============  ========  =============================================================================
``cache``                 a read-only view of a transformers KV cache; the one model call of every loop
``decoding``              one batched decoding loop on a live KV cache, with text injection
``pooling``               per-token KV trajectories read from a live cache
``memory``                memory of weights, KV cache and hidden states (Fig. 1)
``models``                loading embedded, local and hub models
``tiny``                  random models built in-process (tests, dry runs)
``model_info``            what a model is, without loading weights (`kvlib info`)
``paths``                 paths as a reader should see them, never a machine's absolute path
``phases``                wall-clock phases of a run (where a notebook's time goes)
==============  ========  =============================================================================
"""

import importlib as _importlib

_MODULES = ('cache', 'decoding', 'pooling', 'memory', 'models', 'tiny', 'model_info', 'paths', 'phases')


def __getattr__(name: str):
    """A submodule, imported on first use."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
