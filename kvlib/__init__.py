"""kvlib: the KV cache of a language model as a free representation.

Embeddings, Chain-of-Embedding self-evaluation and fast/slow thinking switches read from the cache
that inference already holds. Every public name of the library is re-exported here; the paper's experiments
(what notebooks/01-06 run: tables, captions, figures) live apart, in :mod:`kvlib.experiments`, which the
library never imports.

The re-exports are lazy (PEP 562): ``import kvlib`` loads no submodule, and so neither torch nor transformers;
the first use of a name (``kvlib.load_model``, ``from kvlib import generate``) imports the one submodule that
defines it. ``kvlib --help`` therefore answers at once. Submodules are reachable as attributes too
(``kvlib.generation``).
"""

import importlib as _importlib
import typing as _typing
import warnings as _warnings

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .adaptive import SwitchConfig, adaptive_generate
    from .cache import LayerKV, cache_layers, cache_length, crop_cache, kv_layers, masked_mean, masked_sum, output_cache
    from .coe import coe_scores, hidden_coe_extractor, hidden_coe_pass
    from .data import MathItem, answer_type, load_math
    from .difficulty import (DifficultyClassifier, FeatureSpec, TrainConfig, difficulty_label, live_features,
                             prompt_kv_extractor, split_by_question, train_classifier)
    from .answer_probe import answer_probes, probe_scores
    from .early_exit import BudgetConfig, EarlyExitConfig, budget_generate, early_exit_generate
    from .decoding import DecodeConfig, DecodeResult, DecodeState, decode, prefill
    from .embedding import (Embedder, HiddenStateEmbedder, KVEmbedder, KVPooling, Prefill, PrefillConfig,
                            RandomEmbedder, SentenceTransformerEmbedder, embed_all)
    from .generation import GenerationSettings, Prompt, generate, open_store, record_array
    from .grading import extract_answer, is_correct
    from .identity import callable_identity, model_identity
    from .memory import measure_cache_bytes, memory_estimate, parameter_count, prefill_peak, shipped_configs, vram_curve
    from .metrics import aupr, auroc, bootstrap_auroc_ci, evaluate_score, fpr_at_tpr, paired_auroc_difference
    from .models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelFileError, load_model
    from .pooling import kv_trajectory_extractor, select_layers, token_trajectory
    from .probe import ProbeConfig, classification_scores, layer_sweep, run_probe_table
    from .selfeval import kv_coe_scores, kv_probe_scores, output_scores, score_records
    from .profiles import Profile, get_profile, hardware_label
    from .sampling import sampling_from_generation_config
    from .sharding import Shard, current_shard, local_device
    from .store import CorruptStoreError, ResultStore, StoreLockedError, StoreMismatchError
    from .textsets import TextSet, load_textsets
    from .thinking import ThinkingProtocol, protocol_for, render_prompt
    from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "SwitchConfig", "adaptive_generate", "crop_cache",
    "DifficultyClassifier", "FeatureSpec", "TrainConfig", "difficulty_label", "live_features", "prompt_kv_extractor",
    "split_by_question", "train_classifier", "EarlyExitConfig", "budget_generate", "early_exit_generate",
    "get_profile", "Profile", "hardware_label", "sampling_from_generation_config", "BudgetConfig",
    "Shard", "current_shard", "local_device",
    "answer_probes", "probe_scores",
    "LayerKV", "cache_layers", "cache_length", "kv_layers", "masked_mean", "masked_sum", "output_cache",
    "coe_scores", "hidden_coe_extractor", "hidden_coe_pass",
    "measure_cache_bytes", "memory_estimate", "parameter_count", "prefill_peak", "shipped_configs", "vram_curve",
    "aupr", "auroc", "bootstrap_auroc_ci", "evaluate_score", "fpr_at_tpr", "paired_auroc_difference",
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "ModelFileError", "load_model",
    "kv_coe_scores", "kv_probe_scores", "output_scores", "score_records",
    "MathItem", "answer_type", "load_math", "extract_answer", "is_correct",
    "DecodeConfig", "DecodeResult", "DecodeState", "decode", "prefill",
    "Embedder", "HiddenStateEmbedder", "KVEmbedder", "KVPooling", "Prefill", "PrefillConfig", "RandomEmbedder",
    "SentenceTransformerEmbedder", "embed_all",
    "ProbeConfig", "classification_scores", "layer_sweep", "run_probe_table", "TextSet", "load_textsets",
    "GenerationSettings", "Prompt", "generate", "open_store", "record_array",
    "kv_trajectory_extractor", "select_layers", "token_trajectory",
    "CorruptStoreError", "ResultStore", "StoreLockedError", "StoreMismatchError", "callable_identity", "model_identity",
    "ThinkingProtocol", "protocol_for", "render_prompt",
    "TINY_ARCHS", "tiny_model",
]

# each submodule and the public names of __all__ it defines (kvlib.<name> imports kvlib.<submodule> on first use);
# tests/test_layout.py checks that this, __all__ and the TYPE_CHECKING imports above agree
_SUBMODULES = {
    "adaptive": ("SwitchConfig", "adaptive_generate"),
    "cache": ("LayerKV", "cache_layers", "cache_length", "crop_cache", "kv_layers", "masked_mean", "masked_sum",
        "output_cache"),
    "coe": ("coe_scores", "hidden_coe_extractor", "hidden_coe_pass"),
    "data": ("MathItem", "answer_type", "load_math"),
    "difficulty": ("DifficultyClassifier", "FeatureSpec", "TrainConfig", "difficulty_label", "live_features",
        "prompt_kv_extractor", "split_by_question", "train_classifier"),
    "answer_probe": ("answer_probes", "probe_scores"),
    "early_exit": ("BudgetConfig", "EarlyExitConfig", "budget_generate", "early_exit_generate"),
    "decoding": ("DecodeConfig", "DecodeResult", "DecodeState", "decode", "prefill"),
    "embedding": ("Embedder", "HiddenStateEmbedder", "KVEmbedder", "KVPooling", "Prefill", "PrefillConfig",
        "RandomEmbedder", "SentenceTransformerEmbedder", "embed_all"),
    "generation": ("GenerationSettings", "Prompt", "generate", "open_store", "record_array"),
    "grading": ("extract_answer", "is_correct"),
    "identity": ("callable_identity", "model_identity"),
    "memory": ("measure_cache_bytes", "memory_estimate", "parameter_count", "prefill_peak", "shipped_configs",
        "vram_curve"),
    "metrics": ("aupr", "auroc", "bootstrap_auroc_ci", "evaluate_score", "fpr_at_tpr", "paired_auroc_difference"),
    "models": ("DEFAULT_MODEL", "EMBEDDED_MODELS", "ModelFileError", "load_model"),
    "pooling": ("kv_trajectory_extractor", "select_layers", "token_trajectory"),
    "probe": ("ProbeConfig", "classification_scores", "layer_sweep", "run_probe_table"),
    "selfeval": ("kv_coe_scores", "kv_probe_scores", "output_scores", "score_records"),
    "profiles": ("Profile", "get_profile", "hardware_label"),
    "sampling": ("sampling_from_generation_config",),
    "sharding": ("Shard", "current_shard", "local_device"),
    "store": ("CorruptStoreError", "ResultStore", "StoreLockedError", "StoreMismatchError"),
    "textsets": ("TextSet", "load_textsets"),
    "thinking": ("ThinkingProtocol", "protocol_for", "render_prompt"),
    "tiny": ("TINY_ARCHS", "tiny_model"),
}
_WHERE = {name: module for module, names in _SUBMODULES.items() for name in names}
# renamed public names, still answered for one release with a DeprecationWarning: old name -> (submodule, new name)
_DEPRECATED: dict[str, tuple[str, str]] = {}


def __getattr__(name: str):
    """A public name, imported from its submodule on first use; or a submodule itself (``kvlib.store``)."""
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        _warnings.warn(f"kvlib.{name} is now kvlib.{new}; the old name goes in the next release",
                       DeprecationWarning, stacklevel=2)
        return getattr(_importlib.import_module(f".{module}", __name__), new)
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(f".{module}", __name__), name)
    elif name.isidentifier() and not name.startswith("__"):
        try:
            value = _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its own imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """What the eager package showed: the public names, the submodules and the module dunders."""
    shown = {n for n in globals() if not n.startswith("_") or n.startswith("__")} - {"__getattr__", "__dir__"}
    return sorted(shown | set(__all__) | {module.split(".")[0] for module in _SUBMODULES})
