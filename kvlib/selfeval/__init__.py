"""Chain-of-Embedding and every self-evaluation score of an answer, trained probes, metrics (Table 2).

==================  ==================  ==============================================================
module              formerly            concept
==================  ==================  ==============================================================
``coe``                                 Chain-of-Embedding scores of a trajectory
``scores``          kvlib.selfeval      every self-evaluation score of every answer
``trained_probes``  kvlib.answer_probe  trained self-evaluation probes (output statistics vs KV cache)
``metrics``                             AUROC, FPR95, AUPR and a bootstrap interval
==================  ==================  ==============================================================

The former module ``kvlib.selfeval`` is ``kvlib.selfeval.scores``; its names answer
here too, with a DeprecationWarning, for one release.
"""

import importlib as _importlib
import warnings as _warnings

_MODULES = ('coe', 'scores', 'trained_probes', 'metrics')
# the former module kvlib.selfeval is now kvlib.selfeval.scores: its names still answer here for one release
_FORMER = "scores"


def __getattr__(name: str):
    """A submodule, imported on first use; or a name of the former module (deprecated)."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        former = _importlib.import_module(f".{_FORMER}", __name__)
        if hasattr(former, name):
            _warnings.warn(f"kvlib.selfeval.{name} is now kvlib.selfeval.scores.{name} (kvlib.selfeval "
                           "became a package; the old path goes in the next release)",
                           DeprecationWarning, stacklevel=2)
            return getattr(former, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
