"""kvlib: the KV cache of a language model as a free representation.

Embeddings, Chain-of-Embedding self-evaluation and fast/slow thinking switches read from the cache
that inference already holds. Every public name of the library is re-exported here; the paper's experiments
(what notebooks/01-06 run: tables, captions, figures) live apart, in :mod:`kvlib.experiments`, which the
library never imports.

The re-exports are lazy (PEP 562): ``import kvlib`` loads no submodule, and so neither torch nor transformers;
the first use of a name (``kvlib.load_model``, ``from kvlib import generate``) imports the one submodule that
defines it. ``kvlib --help`` therefore answers at once. Submodules are reachable as attributes too
(``kvlib.runs.generation``).

Floor plan: the library's modules sit in groups named after the paper's concepts; a group imports itself, the
groups listed beside it (never one above it), and :mod:`kvlib.profiles`; nothing imports :mod:`kvlib.cli`
(the console script) or the experiments (tests/test_layout.py checks all of it, and that the import graph has
no circle and at most nine floors).

=========  ===============================================================================  ==================
group      modules                                                                          imports
=========  ===============================================================================  ==================
switching  thinking difficulty kv_switch early_exit answers                                 runs, core, assets
selfeval   coe scores trained_probes metrics                                                runs, core
embedding  embedders mteb_classification textsets classification_stats                      core
runs       identity writer_lock records store sharding generation replay sampling_settings  core
core       cache decoding pooling memory models tiny model_info paths phases                -
assets     data grading                                                                     -
=========  ===============================================================================  ==================
"""

import importlib as _importlib
import typing as _typing
import warnings as _warnings

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .switching.kv_switch import SwitchConfig, adaptive_generate
    from .core.cache import (LayerKV, cache_layers, cache_length, crop_cache, kv_layers, masked_mean, masked_sum,
                             output_cache)
    from .selfeval.coe import coe_scores, hidden_coe_extractor, hidden_coe_pass
    from .assets.data import MathItem, answer_type, load_math
    from .switching.difficulty import (DifficultyClassifier, FeatureSpec, TrainConfig, difficulty_label, live_features,
                                       prompt_kv_extractor, split_by_question, train_classifier)
    from .selfeval.trained_probes import answer_probes, probe_scores
    from .switching.early_exit import BudgetConfig, EarlyExitConfig, budget_generate, early_exit_generate
    from .core.decoding import DecodeConfig, DecodeResult, DecodeState, decode, prefill
    from .embedding.embedders import (
        Embedder,
        HiddenStateEmbedder,
        KVEmbedder,
        KVPooling,
        PrefillRunner,
        PrefillConfig,
        RandomEmbedder,
        SentenceTransformerEmbedder,
        embed_all,
    )
    from .runs.generation import GenerationSettings, Prompt, generate, open_store, record_array
    from .assets.grading import extract_answer, is_correct
    from .runs.identity import callable_identity, model_identity
    from .core.memory import (measure_cache_bytes, memory_estimate, parameter_count, prefill_peak, shipped_configs,
                              vram_curve)
    from .selfeval.metrics import aupr, auroc, bootstrap_auroc_ci, evaluate_score, fpr_at_tpr, paired_auroc_difference
    from .core.models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelFileError, load_model
    from .core.pooling import kv_trajectory_extractor, select_layers, token_trajectory
    from .embedding.mteb_classification import ProbeConfig, classification_scores, layer_sweep, run_probe_table
    from .selfeval.scores import kv_coe_scores, kv_probe_scores, output_scores, score_records
    from .profiles import Profile, get_profile, hardware_label
    from .runs.sampling_settings import sampling_from_generation_config
    from .runs.sharding import Shard, current_shard, local_device
    from .runs.store import CorruptStoreError, ResultStore, StoreLockedError, StoreMismatchError
    from .embedding.textsets import TextSet, load_textsets
    from .switching.thinking import ThinkingProtocol, protocol_for, render_prompt
    from .core.tiny import TINY_ARCHS, tiny_model

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
    "Embedder", "HiddenStateEmbedder", "KVEmbedder", "KVPooling", "PrefillRunner", "PrefillConfig", "RandomEmbedder",
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
    "switching.kv_switch": ("SwitchConfig", "adaptive_generate"),
    "core.cache": (
        "LayerKV",
        "cache_layers",
        "cache_length",
        "crop_cache",
        "kv_layers",
        "masked_mean",
        "masked_sum",
        "output_cache",
    ),
    "selfeval.coe": ("coe_scores", "hidden_coe_extractor", "hidden_coe_pass"),
    "assets.data": ("MathItem", "answer_type", "load_math"),
    "switching.difficulty": (
        "DifficultyClassifier",
        "FeatureSpec",
        "TrainConfig",
        "difficulty_label",
        "live_features",
        "prompt_kv_extractor",
        "split_by_question",
        "train_classifier",
    ),
    "selfeval.trained_probes": ("answer_probes", "probe_scores"),
    "switching.early_exit": ("BudgetConfig", "EarlyExitConfig", "budget_generate", "early_exit_generate"),
    "core.decoding": ("DecodeConfig", "DecodeResult", "DecodeState", "decode", "prefill"),
    "embedding.embedders": (
        "Embedder",
        "HiddenStateEmbedder",
        "KVEmbedder",
        "KVPooling",
        "PrefillRunner",
        "PrefillConfig",
        "RandomEmbedder",
        "SentenceTransformerEmbedder",
        "embed_all",
    ),
    "runs.generation": ("GenerationSettings", "Prompt", "generate", "open_store", "record_array"),
    "assets.grading": ("extract_answer", "is_correct"),
    "runs.identity": ("callable_identity", "model_identity"),
    "core.memory": (
        "measure_cache_bytes",
        "memory_estimate",
        "parameter_count",
        "prefill_peak",
        "shipped_configs",
        "vram_curve",
    ),
    "selfeval.metrics": (
        "aupr",
        "auroc",
        "bootstrap_auroc_ci",
        "evaluate_score",
        "fpr_at_tpr",
        "paired_auroc_difference",
    ),
    "core.models": ("DEFAULT_MODEL", "EMBEDDED_MODELS", "ModelFileError", "load_model"),
    "core.pooling": ("kv_trajectory_extractor", "select_layers", "token_trajectory"),
    "embedding.mteb_classification": ("ProbeConfig", "classification_scores", "layer_sweep", "run_probe_table"),
    "selfeval.scores": ("kv_coe_scores", "kv_probe_scores", "output_scores", "score_records"),
    "profiles": ("Profile", "get_profile", "hardware_label"),
    "runs.sampling_settings": ("sampling_from_generation_config",),
    "runs.sharding": ("Shard", "current_shard", "local_device"),
    "runs.store": ("CorruptStoreError", "ResultStore", "StoreLockedError", "StoreMismatchError"),
    "embedding.textsets": ("TextSet", "load_textsets"),
    "switching.thinking": ("ThinkingProtocol", "protocol_for", "render_prompt"),
    "core.tiny": ("TINY_ARCHS", "tiny_model"),
}
_WHERE = {name: module for module, names in _SUBMODULES.items() for name in names}
# renamed public names, still answered for one release with a DeprecationWarning: old name -> (submodule, new name)
_DEPRECATED: dict[str, tuple[str, str]] = {"Prefill": ("embedding.embedders", "PrefillRunner")}


def __getattr__(name: str):
    """A public name, imported from its submodule on first use; or a submodule itself (``kvlib.runs.store``)."""
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
