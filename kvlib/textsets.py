"""Deprecated import path: this module is now :mod:`kvlib.embedding.textsets`.

The old path answers for one release, with a DeprecationWarning; it goes in the next.
"""

import importlib
import sys
import warnings

warnings.warn("kvlib.textsets is now kvlib.embedding.textsets: import it from there "
              "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("kvlib.embedding.textsets")
