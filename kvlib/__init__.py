"""kvlib: the KV cache of a language model as a free representation.

Embeddings, Chain-of-Embedding self-evaluation and fast/slow thinking switches read from the cache
that inference already holds. Every public name is re-exported here.
"""

from .cache import LayerKV, cache_layers, cache_length, kv_layers, masked_mean, masked_sum, output_cache
from .data import MathItem, answer_type, load_math
from .decoding import DecodeConfig, DecodeResult, DecodeState, decode
from .generation import GenerationSettings, Prompt, generate, open_store, record_array
from .grading import extract_answer, is_correct
from .pooling import kv_trajectory_extractor, select_layers, token_trajectory
from .store import CorruptStoreError, ResultStore
from .thinking import ThinkingProtocol, protocol_for, render_prompt
from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "LayerKV", "cache_layers", "cache_length", "kv_layers", "masked_mean", "masked_sum", "output_cache",
    "MathItem", "answer_type", "load_math", "extract_answer", "is_correct",
    "DecodeConfig", "DecodeResult", "DecodeState", "decode",
    "GenerationSettings", "Prompt", "generate", "open_store", "record_array",
    "kv_trajectory_extractor", "select_layers", "token_trajectory",
    "CorruptStoreError", "ResultStore",
    "ThinkingProtocol", "protocol_for", "render_prompt",
    "TINY_ARCHS", "tiny_model",
]
