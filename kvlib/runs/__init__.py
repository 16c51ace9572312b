"""Batched, resumable, sharded runs: generation, replay, result stores and what identifies them.

=====================  ==============  =======================================================
module                 formerly        concept
=====================  ==============  =======================================================
``identity``                           what a stored result was computed from
``writer_lock``                        one writer per result file
``records``                            the keys of generation records and graded answers
``store``                              the append-only, resumable result store
``sharding``                           item loops over launched processes
``generation``                         batched, resumable generation over a data set
``replay``                             a controlled run replayed over a stored greedy answer
``sampling_settings``  kvlib.sampling  sampling settings read from a model's generation config
=====================  ==============  =======================================================
"""

import importlib as _importlib

_MODULES = ('identity', 'writer_lock', 'records', 'store', 'sharding', 'generation', 'replay', 'sampling_settings')


def __getattr__(name: str):
    """A submodule, imported on first use."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
