"""Memory of long-context inference: weights, KV cache, and the hidden states an embedding method keeps (Fig. 1).

The paper's point: the KV cache is already in memory during inference, while methods that read hidden states
must keep ``(L + 1) x T x hidden`` extra numbers (all layers, embedding output included). This module counts
those bytes from a model config alone, so the figure needs no weights and no download.

Design choices:

* A config is normalised to a plain dict (the text config of a multimodal model). A dict that names a
  ``model_type`` goes through ``transformers.AutoConfig.for_model`` when transformers is importable, so the
  library's defaults apply (Mistral's 4096-token window, Qwen2's ``use_sliding_window``, derived ``head_dim``);
  without transformers the raw dict is used. Shipped configs of the paper's models live in ``kvlib/configs/``.
* Parameters are counted with a closed formula for the dense decoder families kvlib uses (Llama, Mistral,
  Qwen2, Qwen3, Gemma 2/3: GQA, q/k norms, attention and MLP biases, tied embeddings counted once). Any other
  architecture (mixture of experts, linear attention, ...) is counted exactly by building it on the ``meta``
  device.
* KV cache: ``2 x batch x kv_heads x head_dim x positions held x bytes`` per attention layer. A sliding-window
  (or chunked) layer holds ``min(T, window - 1)`` positions after a prefill, as transformers'
  ``DynamicSlidingWindowLayer`` keeps; layers with no attention (recurrent, MLP-only) hold none.
* ``activations`` is the transient working set of a prefill with ``logits_to_keep=1`` (the gap between the GPU
  peak and weights + cache, checked on an H200 at the Qwen3-32B shape): the last decoder layer's gated MLP
  (``3 x T x intermediate``: gate output, its activation, up output / product) plus four ``T x hidden``
  residual-stream tensors (embedding output, layer input, residual, normed input). When hidden states are kept,
  the embedding output and layer input are among them and the final norm output does not exist yet at the
  peak, so the extra is ``3 x T x intermediate + T x hidden``: :func:`prefill_peak` puts this together.

Every byte count assumes one element size ``dtype`` for weights, cache and activations.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .cache import cache_layers, forward
from .phases import phase

__all__ = [
    "CONFIG_DIR", "shipped_configs", "load_config", "hf_config", "attention_layer_types", "parameter_count",
    "memory_estimate", "prefill_peak", "vram_curve", "measure_cache_bytes",
]

CONFIG_DIR = Path(__file__).resolve().parent.with_name("configs")
_NO_KV_LAYERS = {"linear_attention", "mamba", "conv", "dummy", "moe", "mlp", "recurrent"}
_WINDOW_KEY = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
_FORMULA_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def shipped_configs() -> dict[str, Path]:
    """Names (file stems, e.g. ``"Qwen3-32B"``) of the configs shipped in ``kvlib/configs/``."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _shipped_path(name: str) -> Path | None:
    key = name.strip().lower()
    for stem, path in shipped_configs().items():
        hub_id = json.loads(path.read_text()).get("_name_or_path", "")
        if key in (stem.lower(), hub_id.lower()) or key.split("/")[-1] == stem.lower():
            return path
    return None


def _read_named(name: str) -> dict:
    path = _shipped_path(name)
    if path is None:
        p = Path(name).expanduser()
        path = p / "config.json" if p.is_dir() else p
        if not (path.is_file() and path.suffix == ".json"):
            raise ValueError(
                f"unknown config {name!r}: not a shipped config ({', '.join(shipped_configs())}), "
                "a config.json file, or a model directory holding one. Pass a transformers config or a dict instead."
            )
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=64)
def _with_library_defaults(frozen: str) -> dict:
    raw = json.loads(frozen)
    try:
        from transformers import AutoConfig

        kwargs = {k: v for k, v in raw.items() if k != "model_type"}
        return AutoConfig.for_model(raw["model_type"], **kwargs).to_dict()
    except Exception:  # transformers missing or an unknown model_type: the raw dict is all we have
        return raw


def load_config(config) -> dict:
    """Normalise ``config`` (transformers config, dict, shipped name, or path) to a plain dict of its text model."""
    if isinstance(config, str | Path):
        config = _read_named(str(config))
    if hasattr(config, "to_dict"):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return text.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a transformers config, a dict or a config name, got {type(config).__name__}")
    cfg = dict(config)
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = dict(cfg["text_config"])
    if "model_type" in cfg:
        cfg = dict(_with_library_defaults(json.dumps(cfg, sort_keys=True, default=str)))
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if cfg.get(key) is None:
            raise ValueError(f"config lacks {key!r}; memory_estimate needs a decoder-only language-model config")
    return cfg


def hf_config(config):
    """A ``transformers`` config object for ``config`` (anything :func:`load_config` accepts)."""
    from transformers import AutoConfig

    cfg = load_config(config)
    return AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})


def _dims(cfg: dict) -> tuple[int, int, int, int, int]:
    """``(layers, hidden, heads, kv_heads, head_dim)`` of a normalised config."""
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), heads, kv_heads, head_dim


def attention_layer_types(config) -> list[str]:
    """Per-layer attention type (``"full_attention"``, ``"sliding_attention"``, ...) as transformers' cache sees it."""
    cfg = load_config(config)
    n = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        first = int(cfg.get("max_window_layers") or 0) if "use_sliding_window" in cfg else 0
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if cfg.get("attention_chunk_size"):
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def _formula_parameters(cfg: dict) -> int:
    n_layers, hidden, heads, kv_heads, head_dim = _dims(cfg)
    vocab, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
    mtype = cfg.get("model_type", "llama")
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden
    if mtype == "qwen2":
        attn += q + 2 * kv  # q/k/v biases, no o bias
    elif cfg.get("attention_bias"):
        attn += q + 2 * kv + hidden
    if mtype in ("qwen3", "gemma3", "gemma3_text"):
        attn += 2 * head_dim  # q_norm, k_norm
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if cfg.get("mlp_bias") else 0)
    norms = (4 if mtype.startswith("gemma") else 2) * hidden
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return n_layers * (attn + mlp + norms) + hidden + embed


@functools.lru_cache(maxsize=16)
def _meta_parameters(frozen: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(json.loads(frozen)))
    return sum(p.numel() for p in model.parameters())


def parameter_count(config) -> int:
    """Number of distinct parameters (tied embeddings once) of the causal LM described by ``config``."""
    cfg = load_config(config)
    if cfg.get("model_type", "llama") in _FORMULA_TYPES and not any(cfg.get(k) for k in _MOE_KEYS):
        return _formula_parameters(cfg)
    return _meta_parameters(json.dumps(cfg, sort_keys=True, default=str))


def _element_size(dtype) -> int:
    if isinstance(dtype, str):
        short = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = short.get(dtype) or getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def memory_estimate(config, context_length: int, dtype=torch.bfloat16, batch_size: int = 1) -> dict:
    """Bytes needed to hold a model and a ``context_length``-token context.

    Args:
        config: a transformers config, a dict, a shipped name (``"Qwen3-32B"``) or a path to a config.json.
        context_length: tokens ``T`` held per sequence.
        dtype: element type of weights, cache and hidden states (a ``torch.dtype`` or its name).
        batch_size: sequences ``B``.

    Returns:
        dict with byte counts ``weights``, ``kv_cache`` (all layers, sliding windows honoured),
        ``hidden_states`` (``(L + 1) x B x T x hidden``, as ``output_hidden_states`` returns) and
        ``activations`` (prefill working set, see the module notes), plus ``parameters``,
        ``context_length``, ``batch_size`` and ``bytes_per_element``.
    """
    if context_length < 0 or batch_size < 1:
        raise ValueError(f"need context_length >= 0 and batch_size >= 1, got {context_length}, {batch_size}")
    cfg = load_config(config)
    size = _element_size(dtype)
    n_layers, hidden, _, kv_heads, head_dim = _dims(cfg)
    held = 0
    for kind in attention_layer_types(cfg):
        if kind in _NO_KV_LAYERS:
            continue
        window = cfg.get(_WINDOW_KEY.get(kind, ""), None)
        held += min(context_length, int(window) - 1) if window else context_length
    params = parameter_count(cfg)
    tokens = batch_size * context_length
    return {
        "weights": params * size,
        "kv_cache": 2 * batch_size * kv_heads * head_dim * held * size,
        "hidden_states": (n_layers + 1) * tokens * hidden * size,
        "activations": tokens * (3 * int(cfg["intermediate_size"]) + 4 * hidden) * size,
        "parameters": params,
        "context_length": int(context_length),
        "batch_size": int(batch_size),
        "bytes_per_element": size,
    }


def prefill_peak(config, context_length: int, dtype=torch.bfloat16, batch_size: int = 1,
                 hidden_states: bool = False) -> int:
    """Predicted peak bytes of one prefill (``logits_to_keep=1``), with or without ``output_hidden_states``."""
    est = memory_estimate(config, context_length, dtype, batch_size)
    cfg = load_config(config)
    base = est["weights"] + est["kv_cache"]
    if not hidden_states:
        return base + est["activations"]
    tokens, size = batch_size * context_length, est["bytes_per_element"]
    working = tokens * (3 * int(cfg["intermediate_size"]) + int(cfg["hidden_size"])) * size
    return base + est["hidden_states"] + working


def vram_curve(config, lengths: Sequence[int], dtype=torch.bfloat16, batch_size: int = 1):
    """A pandas DataFrame of :func:`memory_estimate` over ``lengths`` with the two totals of Fig. 1, in bytes."""
    import pandas as pd

    rows = [memory_estimate(config, t, dtype, batch_size) for t in lengths]
    df = pd.DataFrame(rows)
    df["model_kv"] = df["weights"] + df["kv_cache"]
    df["model_kv_hidden"] = df["model_kv"] + df["hidden_states"]
    return df


def _prompt_ids(tokenizer, length: int, batch_size: int, vocab: int, seed: int) -> torch.Tensor:
    if tokenizer is not None:
        text = (
            "The key and value vectors that a transformer caches while reading a document are a summary "
            "of everything it has seen so far. "
        )
        ids = tokenizer(text * 8, add_special_tokens=False, return_tensors="pt").input_ids[0]
        row = ids.repeat(length // len(ids) + 1)[:length]
        return row.unsqueeze(0).repeat(batch_size, 1)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, length), generator=gen)


@phase("cache measurement")
def measure_cache_bytes(model, tokenizer=None, lengths: Sequence[int] = (256, 512, 1024, 2048),
                        batch_size: int = 1, seed: int = 0) -> list[dict]:
    """Prefill ``model`` at each length and count the real bytes of its cache and hidden states.

    Runs one forward pass per length with ``use_cache=True, output_hidden_states=True, logits_to_keep=1``
    on a repeated passage (or random ids without a tokenizer) and compares the tensors' ``nbytes`` with
    :func:`memory_estimate` for the model's own config and dtype.

    Returns:
        one dict per length: ``context_length``, ``batch_size``, ``dtype``, ``seconds`` and, for each of
        ``weights``, ``kv_cache``, ``hidden_states``, a ``*_measured`` and a ``*_estimate`` byte count.
    """
    device = next(model.parameters()).device
    weights = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    rows = []
    for length in lengths:
        ids = _prompt_ids(tokenizer, int(length), batch_size, int(model.config.vocab_size), seed).to(device)
        start = time.perf_counter()
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            out, cache = forward(model, ids, mask, torch.arange(ids.shape[1], device=device).expand_as(ids),
                                 output_hidden_states=True)  # no padding: positions 0 .. length-1
        seconds = time.perf_counter() - start
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache_layers(cache))
        hidden = sum(h.nbytes for h in out.hidden_states)
        est = memory_estimate(model.config, int(length), model.dtype, batch_size)
        rows.append({
            "context_length": int(length), "batch_size": batch_size, "dtype": str(model.dtype).replace("torch.", ""),
            "seconds": round(seconds, 3),
            "weights_measured": weights, "weights_estimate": est["weights"],
            "kv_cache_measured": kv, "kv_cache_estimate": est["kv_cache"],
            "hidden_states_measured": hidden, "hidden_states_estimate": est["hidden_states"],
        })
        del out
    return rows
