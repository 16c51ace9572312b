"""Decode attention that reads each key/value head once (grouped-query attention without ``repeat_kv``).

transformers' ``sdpa`` attention copies every key/value head ``num_key_value_groups`` times (``repeat_kv``)
whenever it is given a mask and is not allowed GQA inside the kernel, and under ``torch.compile`` it always does:
for a decode step that is ``groups`` times the cache's size written and read again per layer (the 0.5B/1.5B models
have 14/12 query heads on 2 key/value heads: 7x/6x; Qwen3-8B 4x), most of the step's memory traffic at large
batches. With one query token per row the copy is not needed: the ``groups`` query heads that share a key/value
head become ``groups`` query positions of that head, ``[batch, heads, 1, dim] -> [batch, kv_heads, groups, dim]``,
and the mask, shared by all heads, broadcasts over them. Same attention, each cached key and value read once.

:func:`use_grouped_decode` switches a model that runs on ``sdpa`` to it (registered as ``"kvlib_sdpa"``);
every other call (a prefill, several tokens, per-head masks, position biases, soft-capping) goes to transformers'
own ``sdpa`` function unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "kvlib_sdpa"

__all__ = ["NAME", "grouped_sdpa_forward", "use_grouped_decode"]


def grouped_sdpa_forward(module, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                         attention_mask: "torch.Tensor | None", dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> "tuple[torch.Tensor, None]":
    """transformers' attention-function signature: ``query [batch, heads, q, dim]``, ``key``/``value``
    ``[batch, kv_heads, kv, dim]``, ``attention_mask`` ``[batch, 1, q, kv]`` (bool or additive) or ``None``;
    returns ``([batch, q, heads, dim], None)``. One query token per row with grouped heads and a mask shared by
    the heads: grouped as the module docstring says; anything else: transformers' ``sdpa_attention_forward``."""
    import torch  # kvlib imports no torch at import time (tests/test_layout.py)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                             and attention_mask.shape[2] == 1)
    if (q_len != 1 or groups <= 1 or not shared_mask or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.reshape(batch, heads // groups, groups, dim)  # query head h reads key/value head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_sdpa_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks sdpa gets


def use_grouped_decode(model) -> bool:
    """Run ``model``'s decode steps on :func:`grouped_sdpa_forward` if it attends with ``sdpa`` and shares
    key/value heads; returns whether it now does (a model on another attention is left alone, and every model
    when ``$KVLIB_GROUPED_DECODE=0``)."""
    import os

    config = model.config
    if os.environ.get("KVLIB_GROUPED_DECODE", "1").strip() == "0":
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not kv_heads or heads == kv_heads:
        return False
    _register()
    config._attn_implementation = NAME
    return True
