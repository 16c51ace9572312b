"""A read-only view of a transformers KV cache: the one module that touches cache internals.

Everything else in kvlib sees a cache as a list of per-layer ``(keys, values)`` tensors shaped
``[batch, kv_heads, seq, head_dim]``. transformers changed its cache classes several times
(``key_cache``/``value_cache`` lists up to 4.55, ``DynamicCache.layers[i].keys`` from 4.56 on, tuple
iteration removed in 5.0); this module absorbs those changes so that a new release breaks one file.

Sliding-window layers (Gemma 3, Mistral with a window) keep only the last positions. :class:`LayerKV`
records which absolute positions such a layer still holds, so that pooling never silently mixes a
window with a full history.

The one model call of every loop (:func:`forward`, :func:`step_logits`) and the cache constructor
(:func:`new_cache`) live here too, so that a change of the cache keyword or of the cache class touches one file.
Masked pooling helpers live here as well, because every pooled feature needs the attention mask of the
positions the cache holds.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

__all__ = ["LayerKV", "output_cache", "cache_kwargs", "cache_layers", "kv_layers", "cache_length", "crop_cache",
           "rows_view", "keep_rows", "masked_mean", "masked_sum", "new_cache", "forward", "step_logits"]


@dataclass(frozen=True)
class LayerKV:
    """The cached keys and values of one attention layer.

    Attributes:
        keys: ``[batch, kv_heads, seq_held, head_dim]`` (post-RoPE keys, as the model attends to them).
        values: ``[batch, kv_heads, seq_held, head_dim]``.
        first_position: absolute cache position of ``keys[:, :, 0]``; 0 for a full-attention layer.
        sliding_window: the window size for a sliding-window layer, else ``None``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    first_position: int = 0
    sliding_window: int | None = None

    @property
    def positions(self) -> range:
        """Absolute positions held by this layer."""
        return range(self.first_position, self.first_position + self.keys.shape[-2])


class UnsupportedCacheError(TypeError):
    """Raised for a cache object kvlib does not know how to read."""


def _layer_from_new_api(layer) -> LayerKV:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise UnsupportedCacheError(
            f"cache layer {type(layer).__name__} holds no key/value tensors (is it empty, quantized or a "
            "linear-attention layer?); kvlib reads DynamicLayer, DynamicSlidingWindowLayer and StaticLayer."
        )
    window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
    first = 0
    if window is not None:
        seen = getattr(layer, "cumulative_length", None)
        if seen is None:
            raise UnsupportedCacheError(
                f"sliding-window layer {type(layer).__name__} does not report how many positions it has seen"
            )
        first = int(seen) - keys.shape[-2]
    return LayerKV(keys, values, first, window)


@functools.lru_cache(maxsize=None)
def _cache_arg_name(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that pass ``cache`` to ``model.forward``.

    The keyword is ``cache`` in new releases, else ``past_key_values``.
    """
    return {_cache_arg_name(type(model)): cache}


def new_cache(model):
    """An empty cache for ``model``: a ``DynamicCache`` built from its config (so sliding-window layers get
    their window)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache=None,
            logits_to_keep: int = 1, **kwargs):
    """The one model call of every kvlib loop: ``input_ids`` ``[batch, n]`` appended to ``cache`` (a new one
    when ``None``; ``False``: no cache at all), with the attention mask over the cache *and* the new columns
    (``[batch, cache_len + n]``) and explicit position ids ``[batch, n]`` that count real tokens only.

    Returns ``(output, cache)``: the model output (logits of the last ``logits_to_keep`` positions, plus
    whatever ``kwargs`` ask for, e.g. ``output_hidden_states=True``) and the cache after the call.
    """
    if cache is False:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=logits_to_keep, **kwargs)
        return out, None
    cache = new_cache(model) if cache is None else cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **cache_kwargs(model, cache), **kwargs)
    return out, output_cache(out)


def step_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache
                ) -> tuple[torch.Tensor, object]:
    """One decoding step (:func:`forward` keeping the last position): ``(logits [batch, vocab] in fp32, cache)``.
    Used by the decoding loop and by DEER-style trials alike."""
    out, cache = forward(model, input_ids, attention_mask, position_ids, cache)
    return out.logits[:, -1, :].float(), cache


def output_cache(output):
    """The cache carried by a model or ``generate`` output (``cache`` in transformers 5, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    return cache


def cache_layers(cache) -> list[LayerKV]:
    """Return one :class:`LayerKV` per decoder layer of ``cache``.

    Accepts a ``DynamicCache`` / ``StaticCache`` (transformers 4.56 - 5.x, ``.layers``), the older
    ``key_cache``/``value_cache`` form, a legacy tuple of ``(keys, values)`` pairs, or a list of
    :class:`LayerKV` (a :func:`rows_view`).

    Raises:
        UnsupportedCacheError: for any other object, with the type in the message.
    """
    if cache is None:
        raise UnsupportedCacheError(
            "got None instead of a cache: call the model with use_cache=True (and, for generate, "
            "return_dict_in_generate=True) so that it returns one"
        )
    if isinstance(cache, (tuple, list)) and cache and all(isinstance(layer, LayerKV) for layer in cache):
        return list(cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [_layer_from_new_api(layer) for layer in layers]
    key_cache, value_cache = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(key_cache, list) and isinstance(value_cache, list):
        return [LayerKV(k, v) for k, v in zip(key_cache, value_cache)]
    if isinstance(cache, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) >= 2 and isinstance(p[0], torch.Tensor) for p in cache
    ):
        return [LayerKV(p[0], p[1]) for p in cache]
    raise UnsupportedCacheError(
        f"kvlib cannot read a cache of type {type(cache).__module__}.{type(cache).__name__}; expected a "
        "transformers DynamicCache/StaticCache or a tuple of (keys, values) pairs"
    )


def kv_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)``, each ``[batch, kv_heads, seq_held, head_dim]``.

    For sliding-window layers ``seq_held`` is the window; use :func:`cache_layers` to learn which
    absolute positions a layer holds.
    """
    return [(layer.keys, layer.values) for layer in cache_layers(cache)]


def cache_length(cache) -> int:
    """Number of positions seen by the cache (the longest full-attention layer)."""
    layers = cache_layers(cache)
    return max(layer.first_position + layer.keys.shape[-2] for layer in layers)


def crop_cache(cache, length: int) -> None:
    """Cut ``cache`` back to its first ``length`` positions, in place (roll back a trial continuation).

    Uses ``cache.crop(-n_removed)``, which every transformers release since 4.56 reads as "remove n"
    (5.x refuses a positive length). Sliding-window layers cannot be rolled back once their window is
    full, so a cache with any is refused.
    """
    layers = cache_layers(cache)
    if any(layer.sliding_window is not None for layer in layers):
        raise ValueError("crop_cache cannot roll back sliding-window layers; use a full-attention model")
    current = cache_length(cache)
    if not 0 <= length <= current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)


def rows_view(cache, rows) -> list[LayerKV]:
    """A copy of some batch rows of ``cache`` as a list of :class:`LayerKV` (readable by every kvlib reader).

    Args:
        rows: batch indices (``[R]``); each layer's keys/values become ``[R, kv_heads, seq_held, head_dim]``.
    """
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out = []
    for layer in cache_layers(cache):
        i = idx.to(layer.keys.device)
        out.append(LayerKV(layer.keys[i], layer.values[i], layer.first_position, layer.sliding_window))
    return out


def keep_rows(cache, rows) -> None:
    """Keep only batch rows ``rows`` (in that order) of a live transformers cache, in place.

    Used to drop finished sequences from a running batch. Uses ``cache.batch_select_indices`` (4.56 - 5.x).
    """
    if not hasattr(cache, "batch_select_indices"):
        raise UnsupportedCacheError(f"cannot drop batch rows from a cache of type {type(cache).__name__}")
    layers = cache_layers(cache)
    device = layers[0].keys.device if layers else "cpu"
    cache.batch_select_indices(torch.as_tensor(list(rows), dtype=torch.long, device=device))


def _expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)} on [batch, seq]")
    m = mask.to(x.dtype)
    return m.reshape(m.shape + (1,) * (x.dim() - 2))


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions where ``mask`` is 1.

    Args:
        x: ``[batch, seq, *rest]``.
        mask: ``[batch, seq]`` of 0/1 or bool.

    Returns:
        ``[batch, *rest]``.
    """
    return (x * _expand_mask(mask, x)).sum(dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1; ``x`` is ``[batch, seq, *rest]``, result ``[batch, *rest]``.

    A row with no unmasked position gives zeros (never NaN).
    """
    m = _expand_mask(mask, x)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
