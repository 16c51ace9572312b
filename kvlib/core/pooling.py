"""Reading per-token KV vectors back out of a live cache.

After :func:`kvlib.core.decoding.decode`, ``state.slots[row]`` lists the cache slot of every token of that
row that went through the model (the final token of an item never does). :func:`token_trajectory`
turns those slots into a ``[T, kv_heads * head_dim]`` trajectory, one point per token, averaged over
the chosen layers: the paper's equation (6) with keys, values or both.

The prompt's tokens sit in the first ``input_ids.shape[1]`` cache slots (left-padded; the filler slots are
masked): :func:`prompt_slots` lists a row's real ones, so that :func:`kv_trajectory_extractor` also stores the
prompt's trajectory (``traj_prompt_<part>``) and the prompt + answer trajectory is the two concatenated
(:func:`kvlib.selfeval.scores.kv_coe_scores`). Positions come from the attention mask, so left padding moves a row's
slots but not its vectors: a row's trajectory is the same alone or in a padded batch.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from .cache import cache_layers

__all__ = ["token_trajectory", "kv_trajectory_extractor", "select_layers", "prompt_slots"]

Part = Literal["keys", "values", "both"]


def select_layers(n_layers: int, which: str | Sequence[int] | None) -> list[int]:
    """Layer indices for a named choice: ``None``/"all", "first"/"middle"/"last" quarter, "last4", or explicit ints."""
    if which is None or which == "all":
        return list(range(n_layers))
    if isinstance(which, str):
        q = max(1, n_layers // 4)
        named = {
            "first": list(range(q)),
            "middle": list(range((n_layers - q) // 2, (n_layers - q) // 2 + q)),
            "last": list(range(n_layers - q, n_layers)),
        }
        if which in named:
            return named[which]
        if which.startswith("last") and which[4:].isdigit():
            k = int(which[4:])
            return list(range(max(0, n_layers - k), n_layers))
        raise ValueError(f"unknown layer choice {which!r}: use all, first, middle, last, lastN or a list of ints")
    out = [int(i) % n_layers for i in which]
    if not out:
        raise ValueError("empty layer selection")
    return out


def token_trajectory(cache, row: int, slots: Sequence[int], part: Part = "values",
                     layers: str | Sequence[int] | None = None) -> torch.Tensor:
    """Per-token layer-averaged KV vectors of ``row`` at cache ``slots``.

    Args:
        cache: a transformers cache (read through :func:`kvlib.core.cache.cache_layers`).
        row: batch row.
        slots: cache slots, one per token, in order.
        part: ``"values"`` (the paper's KV-CoE experiments), ``"keys"`` or ``"both"`` (concatenated).
        layers: layer choice (see :func:`select_layers`); full-attention layers only.

    Returns:
        ``[len(slots), kv_heads * head_dim]`` (twice that for ``"both"``), float32.
    """
    all_layers = cache_layers(cache)
    chosen = [all_layers[i] for i in select_layers(len(all_layers), layers)]
    if any(layer.sliding_window is not None for layer in chosen):
        raise ValueError("token trajectories need full-attention layers; exclude the sliding-window layers")
    slots = torch.as_tensor(list(slots), dtype=torch.long)
    out = chosen[0].keys.device  # layers may sit on several devices (device_map="auto"): sum on the first's
    acc = None
    for layer in chosen:
        idx = slots.to(layer.keys.device)
        pieces = []
        if part in ("keys", "both"):
            pieces.append(layer.keys[row, :, idx, :])  # [kv_heads, T, head_dim]
        if part in ("values", "both"):
            pieces.append(layer.values[row, :, idx, :])
        if not pieces:
            raise ValueError(f"part must be keys, values or both, not {part!r}")
        x = torch.cat([p.permute(1, 0, 2).reshape(len(slots), -1) for p in pieces], dim=-1).float().to(out)
        acc = x if acc is None else acc + x
    return acc / len(chosen)


def prompt_slots(attention_mask: torch.Tensor, fed: Sequence[int] = ()) -> list[int]:
    """Cache slots of one row's real prompt tokens, in order.

    Args:
        attention_mask: ``[W]`` the row's input attention mask (1 = real token, 0 = left filler); the input
            fills cache slots ``0 .. W - 1``.
        fed: the row's answer slots (``state.slots[row]``). A resumed row (``decode(..., history=...)``)
            carries earlier answer tokens at the end of its input: those are answer, not prompt, and are left out.
    """
    answer = set(int(j) for j in fed)
    real = torch.as_tensor(attention_mask).reshape(-1).nonzero().reshape(-1).tolist()
    return [j for j in real if j not in answer]


def kv_trajectory_extractor(parts: Sequence[Part] = ("keys", "values"), dtype=np.float16, prompt: bool = True):
    """An :data:`kvlib.runs.generation.Extractor` storing, per row and part, the answer's and the prompt's trajectories.

    Arrays per row: ``traj_<part>`` ``[T_fed, D]`` (``T_fed = n_tokens - 1`` for plain decoding: every answer
    token fed to the model) and, with ``prompt=True``, ``traj_prompt_<part>`` ``[P, D]`` (the ``P`` real prompt
    tokens, see :func:`prompt_slots`); ``D = kv_heads * head_dim``, every layer averaged, stored as ``dtype``.
    The prompt adds ``P / T_fed`` to the answer's bytes (a math prompt of ~100-250 tokens beside answers of up
    to several hundred).
    """

    def extract(model, result, input_ids, attention_mask) -> list[dict[str, np.ndarray]]:
        state = result.state
        out = []
        for row, slots in enumerate(state.slots):  # every fed token; an item's final token never is
            arrays = {f"traj_{p}": token_trajectory(state.cache, row, slots, part=p).cpu().numpy().astype(dtype)
                      for p in parts}
            if prompt:
                where = prompt_slots(attention_mask[row], slots)
                arrays.update({f"traj_prompt_{p}": token_trajectory(state.cache, row, where, part=p).cpu().numpy()
                               .astype(dtype) for p in parts})
            out.append(arrays)
        return out

    return extract
