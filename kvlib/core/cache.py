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
import math
import weakref
from dataclasses import dataclass

import torch

__all__ = ["LayerKV", "StaticKV", "CompiledStep", "output_cache", "cache_kwargs", "cache_layers", "kv_layers",
           "cache_length", "crop_cache", "rows_view", "keep_rows", "masked_mean", "masked_sum", "new_cache", "forward",
           "step_logits", "supports_static", "release_static", "token_stats", "bucket", "move_columns", "write_rows",
           "merge_rows"]


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
    """An empty ``DynamicCache`` for ``model``, built from its config (so sliding-window layers get their window);
    the decoding loop's static cache comes from :meth:`StaticKV.lend`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def supports_static(model) -> bool:
    """Whether :class:`StaticKV` can hold ``model``'s cache: every layer full attention (a sliding window or a
    linear-attention layer needs transformers' own bookkeeping, so such models decode on a dynamic cache)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False


class StaticKV:
    """A transformers ``StaticCache`` preallocated for ``capacity`` positions, plus how many it holds.

    Decoding on preallocated tensors is what lets a decode step be captured once and replayed (CUDA graphs):
    every step has the same shapes and writes into the same memory. kvlib, not the cache, owns the length
    (``length``): the positions a forward writes are ``[length, length + n)`` of every row (left-padded rows
    and masked filler columns included, exactly as in a ``DynamicCache``), and readers see the first
    ``length`` positions only (:func:`cache_layers`). The attention mask a caller passes covers those
    ``length + n`` columns; :func:`forward` pads it with zeros to ``capacity``. Running out of room grows the
    tensors (a copy; a compiled step then compiles once more for the new size).

    A captured step is specialised to the cache's memory, so the decoding loop borrows its cache from a
    one-per-model pool (:meth:`lend`), as ``generate`` keeps its own: the next loan of the same memory
    ends the previous one, and reading a cache whose loan ended raises instead of returning another batch's
    keys. The pooled memory lives as long as the model, or until :func:`release_static`.

    Attributes:
        cache: the transformers ``StaticCache``; its layers hold ``[batch, kv_heads, capacity, head_dim]``.
        length: positions written so far.
    """

    def __init__(self, model, capacity: int):
        from transformers import StaticCache

        if not supports_static(model):
            raise ValueError(f"{type(model).__name__} has sliding-window or non-attention layers: decode it on a "
                             "dynamic cache (DecodeConfig(cache='dynamic'))")
        self.cache = StaticCache(config=model.config, max_cache_len=int(capacity))
        self.cache._kvlib_capacity = int(capacity)
        self.cache._kvlib_owner = self
        self.length = 0

    @classmethod
    def lend(cls, model, batch: int, capacity: int) -> "StaticKV":
        """An empty cache for ``batch`` rows and at least ``capacity`` positions, on the memory of the last
        loan for this model when it is large enough (else new memory, which replaces it in the pool)."""
        pooled = _POOL.get(model)
        if pooled is not None and pooled._kvlib_capacity >= capacity and _batch_of(pooled) in (batch, None):
            kv = cls.__new__(cls)
            kv.cache, kv.length = pooled, 0
            pooled._kvlib_owner = kv
            kv.sync()
            return kv
        _POOL.pop(model, None)  # free the old memory before taking new
        kv = cls(model, capacity)
        _POOL[model] = kv.cache
        return kv

    @property
    def capacity(self) -> int:
        return self.cache._kvlib_capacity

    @property
    def layers(self):
        if self.cache._kvlib_owner is not self:
            raise RuntimeError("this static cache was lent to a later decode call, which overwrote it: read "
                               "features before decoding the next batch (or decode with cache='dynamic')")
        return self.cache.layers

    def ensure(self, needed: int) -> None:
        """Make room for ``needed`` positions (grows by at least half of the capacity)."""
        if needed > self.capacity:
            self.resize(max(needed, self.capacity + self.capacity // 2))

    def resize(self, capacity: int) -> None:
        """Grow or shrink the tensors to ``capacity`` positions (a copy of the first ``length``; a compiled step
        compiles once per capacity, so callers pick capacities from a few :func:`bucket` sizes)."""
        if capacity < self.length:
            raise ValueError(f"cannot shrink a static cache holding {self.length} positions to {capacity}")
        if capacity == self.capacity:
            return
        for layer in self.layers:
            if isinstance(getattr(layer, "keys", None), torch.Tensor):
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    with torch.inference_mode(old.is_inference()):  # the new memory is of the old one's kind
                        new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
                        new[:, :, : self.length] = old[:, :, : self.length]
                    setattr(layer, name, new)
                    if not torch.compiler.is_compiling():
                        torch._dynamo.mark_static_address(new)
            layer.max_cache_len = capacity
        self.cache._kvlib_capacity = capacity
        if hasattr(self.cache, "max_cache_len") and not isinstance(getattr(type(self.cache), "max_cache_len", None),
                                                                   property):
            self.cache.max_cache_len = capacity

    def sync(self) -> None:
        """Tell the transformers layers the length kvlib holds, after a crop (releases whose layers count
        positions themselves advance that count in every forward, so it needs no sync then)."""
        for layer in self.layers:
            seen = getattr(layer, "cumulative_length", None)
            if isinstance(seen, torch.Tensor):
                with torch.inference_mode(seen.is_inference()):  # e.g. made inside the decoding loop
                    seen.fill_(self.length)
            elif isinstance(seen, int):
                layer.cumulative_length = self.length

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (they are overwritten by the next forward)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length
        self.sync()

    def padded_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, capacity]``: ``attention_mask`` (``[batch, <= capacity]``) followed by zeros."""
        return torch.nn.functional.pad(attention_mask, (0, self.capacity - attention_mask.shape[1]))


_POOL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the StaticCache last lent for it


def bucket(n: int, step: int = 256) -> int:
    """``n`` rounded up to a multiple of ``step``: the static cache's capacities, so that batches of nearby
    lengths share one captured step."""
    return -(-int(n) // step) * step


def _kv_tensors(cache):
    """The ``(layer, keys, values)`` of every attention layer of a StaticKV or a dynamic cache (``.layers``)."""
    layers = cache.layers if isinstance(cache, StaticKV) else getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedCacheError(f"cannot realign the columns of a cache of type {type(cache).__name__}")
    out = []
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise UnsupportedCacheError("rows cannot join a cache with sliding-window layers")
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            out.append((layer, layer.keys, layer.values))
    return out


def move_columns(kv: StaticKV, start: int, dest: int) -> None:
    """Move the held columns ``[start, length)`` of every row of ``kv`` to ``[dest, ...)``, in place: a compaction
    (``dest < start``, forgetting columns no row attends to any more) or room on the left (``dest > start``) for a
    longer prompt joining the batch. ``kv.length`` becomes ``dest + length - start``."""
    n = kv.length - start
    if not (0 <= start <= kv.length and dest >= 0):
        raise ValueError(f"cannot move columns from {start} to {dest} in a cache of {kv.length} positions")
    kv.ensure(dest + n)
    if n and dest != start:
        for _, keys, values in _kv_tensors(kv):
            for t in (keys, values):
                t[:, :, dest: dest + n] = t[:, :, start: start + n].clone()
    kv.length = dest + n
    kv.sync()


def write_rows(kv: StaticKV, rows, other, end: int) -> None:
    """Copy every position of ``other`` (a cache of ``len(rows)`` rows and ``w`` positions) into rows ``rows`` of
    ``kv``, columns ``[end - w, end)`` (``end <= kv.length``): the prefilled prompts of rows joining the batch."""
    idx = None
    for (_, keys, values), layer in zip(_kv_tensors(kv), cache_layers(other)):
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=keys.device) if idx is None else idx
        w = layer.keys.shape[-2]
        if not w <= end <= kv.length:
            raise ValueError(f"{w} joining positions do not end at column {end} of a cache of {kv.length}")
        keys[idx, :, end - w: end] = layer.keys.to(keys.dtype)
        values[idx, :, end - w: end] = layer.values.to(values.dtype)


def merge_rows(cache, start: int, other, width: int) -> None:
    """Dynamic cache: keep columns ``[start, ...)`` of ``cache``, append the rows of ``other`` after them, both
    right-aligned to ``width`` columns (zeros on the left, which the attention mask covers), in place."""
    mine = _kv_tensors(cache)
    for (layer, keys, values), theirs in zip(mine, cache_layers(other)):
        parts = []
        for t, o in ((keys, theirs.keys), (values, theirs.values)):
            t = t[:, :, start:]
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))  # noqa: E731
            parts.append(torch.cat([pad(t), pad(o.to(t.dtype))], dim=0))
        layer.keys, layer.values = parts


def release_static(model) -> None:
    """Free the static cache kept for ``model`` by the decoding loop (it lives as long as the model otherwise)."""
    _POOL.pop(model, None)


def _batch_of(cache) -> int | None:
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.shape[0]
    return None


@functools.lru_cache(maxsize=None)
def _takes_cache_position(model_type: type) -> bool:
    return "cache_position" in inspect.signature(model_type.forward).parameters


def _static_kwargs(model, cache: StaticKV, attention_mask: torch.Tensor, n: int) -> dict:
    """The cache keywords of a forward writing ``n`` positions into ``cache`` (mask padded to its capacity)."""
    cache.ensure(cache.length + n)
    if attention_mask.shape[1] != cache.length + n:
        raise ValueError(f"the attention mask covers {attention_mask.shape[1]} positions; a static cache of "
                         f"{cache.length} positions fed {n} more needs {cache.length + n}")
    kw = {"attention_mask": cache.padded_mask(attention_mask), **cache_kwargs(model, cache.cache)}
    if _takes_cache_position(type(model)):
        kw["cache_position"] = torch.arange(cache.length, cache.length + n, device=attention_mask.device)
    return kw


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
    if isinstance(cache, StaticKV):
        n = input_ids.shape[1]
        kw = _static_kwargs(model, cache, attention_mask, n)
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=logits_to_keep,
                    **kw, **kwargs)
        cache.length += n
        return out, cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **cache_kwargs(model, cache), **kwargs)
    return out, output_cache(out)


def step_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache
                ) -> tuple[torch.Tensor, object]:
    """One decoding step (:func:`forward` keeping the last position): ``(logits [batch, vocab] in fp32, cache)``.
    Used by the decoding loop and by DEER-style trials alike."""
    out, cache = forward(model, input_ids, attention_mask, position_ids, cache)
    return out.logits[:, -1, :].float(), cache


def token_stats(logits: torch.Tensor) -> torch.Tensor:
    """``[3, batch]`` from ``[batch, vocab]`` fp32 logits: max probability, entropy in bits, greedy token id (ids
    below 2**24 are exact in fp32), stacked so that one device-to-host copy brings a step's statistics."""
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp.max(-1).values.exp(), -(logp.exp() * logp).sum(-1) / math.log(2.0),
                        logits.argmax(-1).to(logits.dtype)])


def _step_stats(model, input_ids, attention_mask, position_ids, kw):
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **kw)
    logits = out.logits[:, -1, :].float()
    return logits, token_stats(logits)


@functools.cache
def _compiled_step_stats(dynamic: bool = True):
    """One compiled step function per process (and shape policy): torch.compile guards on its own wrapper, so a
    new wrapper per decode call would compile again.

    ``dynamic=True`` lets batch size and cache capacity be symbolic: the first shape compiles specialised, the
    second once more with both symbolic (the cache's tensors are attributes, which the compiler specialises at
    first), and every later shape costs only its CUDA-graph capture (one extra step), not a compile (about 40 s
    a shape for the 0.5B/1.5B models on an H100). ``dynamic=False`` specialises, and so compiles, once per
    (model, batch, capacity); its limit of 8 recompiles is raised so that a notebook's batches of varying size
    never fall back to eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(_step_stats, mode="reduce-overhead", fullgraph=False, dynamic=dynamic)


class CompiledStep:
    """The common decode step, one token per row on a :class:`StaticKV`, compiled once and replayed.

    ``torch.compile(mode="reduce-overhead")`` captures the step (model forward, the softmax statistics and
    the greedy pick) in a CUDA graph: every step then costs one graph launch instead of hundreds of kernel
    launches from Python. The graph is compiled once with symbolic batch size and capacity (``dynamic=True``;
    ``False`` compiles once per batch and capacity) and captured once per shape. With ``compile=False`` the same
    function runs eagerly (the CPU, and the reference of the token-for-token tests).
    """

    def __init__(self, model, compile: bool, dynamic: bool = True):
        self.model = model
        self.fn = _compiled_step_stats(dynamic) if compile else _step_stats

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: StaticKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``input_ids`` ``[batch, 1]``; returns ``(logits [batch, vocab] fp32, stats [3, batch])`` with
        stats = (max probability, entropy in bits, greedy token id). Both are overwritten by the next call
        when compiled: copy what must outlive it."""
        kw = _static_kwargs(self.model, cache, attention_mask, input_ids.shape[1])
        logits, stats = self.fn(self.model, input_ids, kw.pop("attention_mask"), position_ids, kw)
        cache.length += input_ids.shape[1]
        return logits, stats


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
    if isinstance(cache, StaticKV):
        n = cache.length
        return [LayerKV(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in cache.layers
                if getattr(layer, "keys", None) is not None]
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
    if isinstance(cache, StaticKV):
        cache.crop(length)
        return
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
    if isinstance(cache, StaticKV) or not hasattr(cache, "batch_select_indices"):
        raise UnsupportedCacheError(f"cannot drop batch rows from a cache of type {type(cache).__name__}")
    layers = cache_layers(cache)
    device = layers[0].keys.device if layers else "cpu"
    cache.batch_select_indices(torch.as_tensor(list(rows), dtype=torch.long, device=device))


def _expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)} on [batch, seq]")
    m = mask.to(device=x.device, dtype=x.dtype)
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
