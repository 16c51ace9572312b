"""kvlib: the KV cache of a language model as a free representation.

Embeddings, Chain-of-Embedding self-evaluation and fast/slow thinking switches read from the cache
that inference already holds. Every public name of the library is re-exported here; the paper's experiments
(what notebooks/01-06 run: tables, captions, figures) live apart, in :mod:`kvlib.experiments`, which the
library never imports.
"""

from .adaptive import SwitchConfig, adaptive_generate
from .cache import LayerKV, cache_layers, cache_length, crop_cache, kv_layers, masked_mean, masked_sum, output_cache
from .coe import coe_scores, hidden_coe_extractor, hidden_coe_pass
from .data import MathItem, answer_type, load_math
from .difficulty import (DifficultyClassifier, FeatureSpec, TrainConfig, difficulty_label, live_features,
                         prompt_kv_extractor, split_by_question, train_classifier)
from .answer_probe import answer_probes, probe_scores
from .early_exit import BudgetConfig, EarlyExitConfig, budget_generate, early_exit_generate
from .decoding import DecodeConfig, DecodeResult, DecodeState, decode, prefill
from .embedding import (Embedder, HiddenStateEmbedder, KVEmbedder, KVPooling, Prefill, PrefillConfig, RandomEmbedder,
                        SentenceTransformerEmbedder, embed_all)
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
from .store import CorruptStoreError, ResultStore, StoreLockedError, StoreMismatchError
from .textsets import TextSet, load_textsets
from .thinking import ThinkingProtocol, protocol_for, render_prompt
from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "SwitchConfig", "adaptive_generate", "crop_cache",
    "DifficultyClassifier", "FeatureSpec", "TrainConfig", "difficulty_label", "live_features", "prompt_kv_extractor",
    "split_by_question", "train_classifier", "EarlyExitConfig", "budget_generate", "early_exit_generate",
    "get_profile", "Profile", "hardware_label", "sampling_from_generation_config", "BudgetConfig",
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
