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

__all__ = ["token_trajectory", "row_trajectories", "kv_trajectory_extractor", "select_layers", "prompt_slots"]

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
    return row_trajectories(cache, [row], [slots], part, layers)[0]


_GATHER_TOKENS = 1 << 17  # tokens gathered at once by row_trajectories (bounds its temporary memory)


def row_trajectories(cache, rows: Sequence[int], slots: Sequence[Sequence[int]], part: Part = "values",
                     layers: str | Sequence[int] | None = None) -> list[torch.Tensor]:
    """:func:`token_trajectory` of several rows at once (``slots[k]`` for batch row ``rows[k]``): one gather per
    layer for all of them instead of one per row and layer; the values are the same, bit for bit.

    Returns:
        one ``[len(slots[k]), D]`` float32 tensor per row (``D`` as in :func:`token_trajectory`).
    """
    if part not in ("keys", "values", "both"):
        raise ValueError(f"part must be keys, values or both, not {part!r}")
    all_layers = cache_layers(cache)
    chosen = [all_layers[i] for i in select_layers(len(all_layers), layers)]
    if any(layer.sliding_window is not None for layer in chosen):
        raise ValueError("token trajectories need full-attention layers; exclude the sliding-window layers")
    lengths = [len(s) for s in slots]
    row_idx = torch.repeat_interleave(torch.as_tensor(list(rows), dtype=torch.long),
                                      torch.as_tensor(lengths, dtype=torch.long))
    slot_idx = torch.as_tensor([int(j) for s in slots for j in s], dtype=torch.long)
    parts = [n for n in ("keys", "values") if part in (n, "both")]
    out = chosen[0].keys.device  # layers may sit on several devices (device_map="auto"): sum on the first's
    pieces = []
    for a in range(0, max(len(slot_idx), 1), _GATHER_TOKENS):
        r, s = row_idx[a: a + _GATHER_TOKENS], slot_idx[a: a + _GATHER_TOKENS]
        acc = None
        for layer in chosen:
            dev = layer.keys.device
            ri, si = r.to(dev), s.to(dev)
            x = torch.cat([getattr(layer, n)[ri, :, si, :].flatten(1) for n in parts], dim=-1)
            x = x.float().to(out)  # [tokens, D]
            acc = x if acc is None else acc + x
        pieces.append(acc / len(chosen))
    return list(torch.cat(pieces).split(lengths))


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
        rows = range(len(state.slots))
        spans = {"traj": state.slots}  # every fed token; an item's final token never is
        if prompt:
            spans["traj_prompt"] = [prompt_slots(attention_mask[row], state.slots[row]) for row in rows]
        out = [{} for _ in rows]
        for name, slots in spans.items():
            for p in parts:  # all rows in one gather per layer, one copy to the host
                trajs = row_trajectories(state.cache, rows, slots, part=p)
                flat = torch.cat(trajs).cpu().numpy().astype(dtype)
                for arrays, x in zip(out, np.split(flat, np.cumsum([len(t) for t in trajs])[:-1])):
                    arrays[f"{name}_{p}"] = x
        return out

    return extract
