"""The KV cache as a sentence embedding, the MTEB classification protocol, the text sets (Table 1).

========================  =================  ===============================================================
module                    formerly           concept
========================  =================  ===============================================================
``embedders``             kvlib.embedding    sentence embeddings read from the KV cache of one prefill, and
                                             baselines
``mteb_classification``   kvlib.probe        the MTEB classification protocol and the layer sweep
``textsets``                                 text classification sets, from local files
``classification_stats``  kvlib.probe_stats  accuracy and macro-F1 of a classifier, with bootstrap intervals
========================  =================  ===============================================================

The former module ``kvlib.embedding`` is ``kvlib.embedding.embedders``; its names answer
here too, with a DeprecationWarning, for one release.
"""

import importlib as _importlib
import warnings as _warnings

_MODULES = ('embedders', 'mteb_classification', 'textsets', 'classification_stats')
# the former module kvlib.embedding is now kvlib.embedding.embedders: its names still answer here for one release
_FORMER = "embedders"


def __getattr__(name: str):
    """A submodule, imported on first use; or a name of the former module (deprecated)."""
    if name in _MODULES:
        value = _importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        former = _importlib.import_module(f".{_FORMER}", __name__)
        if hasattr(former, name):
            _warnings.warn(f"kvlib.embedding.{name} is now kvlib.embedding.embedders.{name} (kvlib.embedding "
                           "became a package; the old path goes in the next release)",
                           DeprecationWarning, stacklevel=2)
            return getattr(former, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
