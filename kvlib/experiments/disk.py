"""How much disk a profile's result stores need, estimated before anything runs (the runner prints it).

An upper bound from the model's shape and the profile's sizes, with every answer at its token budget:

* an answer record (:func:`kvlib.switching.answers.answer_records`) holds, per generated token, the layer-averaged keys
  and values (fp16, ``2 x kv_heads x head_dim`` values) and its id, max probability and entropy; per prompt token
  the same keys and values (the prompt's trajectory; :data:`PROMPT_TOKENS` of them unless told); per record the
  pooled prompt KV sums (fp32, ``3 x 8 x 2 x kv_heads x head_dim``) and the prompt. Arrays are raw bytes in the
  store's binary sidecar.
* a hidden-state CoE record (notebook 03's sets) holds every layer's mean hidden state (fp32, ``(L + 1) x hidden``).
* a live-method record (switching, DEER-style exit, budgets) holds the tokens, their statistics and the prompt.

Measured check (tested on a tiny model): the estimate of a run is at least the bytes its store takes and
within twice of them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RecordBytes", "record_bytes", "estimate_disk", "describe"]

REF = 120  # bytes of JSON per stored array: its sidecar offset, dtype, shape and checksum
TOKEN_STATS = 36  # bytes of JSON per token: its id, max_prob and entropy (6 decimals each)
PROMPT = 1500  # bytes of a rendered prompt and a record's fixed JSON keys
PROMPT_TOKENS = 384  # tokens of a rendered prompt, for an estimate made before any prompt is rendered


@dataclass(frozen=True)
class RecordBytes:
    """Bytes of one stored record: ``fixed`` + ``per_token`` x generated tokens + ``per_prompt_token`` x prompt
    tokens."""

    fixed: float
    per_token: float
    per_prompt_token: float = 0.0

    def __call__(self, tokens: int, prompt_tokens: int = PROMPT_TOKENS) -> float:
        return self.fixed + self.per_token * tokens + self.per_prompt_token * prompt_tokens


def record_bytes(config) -> dict[str, RecordBytes]:
    """``{"answer", "hidden_coe", "method"}``: the size model of each kind of record for a model config
    (a transformers config or a dict with its usual keys)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    heads = int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads") or heads) * int(get("head_dim") or int(get("hidden_size")) // heads)
    layers, hidden = int(get("num_hidden_layers")), int(get("hidden_size"))
    answer = RecordBytes(PROMPT + 10 * REF + 3 * min(8, layers) * 2 * kv * 4, TOKEN_STATS + 2 * kv * 2, 2 * kv * 2)
    return {"answer": answer, "hidden_coe": RecordBytes(PROMPT + 2 * REF + (layers + 1) * hidden * 4, 0.0),
            "method": RecordBytes(PROMPT, TOKEN_STATS)}


def _count(sizes, split: str) -> int:
    from ..assets.data import load_math

    total = 0
    for name, n in sizes.items():
        if n in (None, "all"):
            try:
                n = len(load_math(name, split))
            except (FileNotFoundError, ValueError):
                try:
                    n = len(load_math(name, "test"))
                except (FileNotFoundError, ValueError):
                    n = 1000  # a set read from DATA_DIR: a round guess
        total += int(n)
    return total


def estimate_disk(profile, config) -> dict[str, float]:
    """Upper bound of the bytes each part of ``profile``'s stores takes, for a model ``config``:
    ``{"answers (03-05)", "hidden-state CoE (03)", "live methods (04-05)", "total"}``."""
    size = record_bytes(config)
    coe = _count(profile.coe_sets, "test")
    test = _count(profile.switch_test_sets, "test")
    train = _count(profile.switch_train_sets, "train")
    # slow answers: 03's sets and the switching sets (overlapping items counted twice: an upper bound)
    own = list(getattr(profile, "set_tokens", {}).values())  # a set's own budget may exceed the profile's
    longest, fast = max([profile.slow_tokens, *own]), max([profile.fast_tokens, *own])
    answers = (coe + test + train) * size["answer"](longest) + (test + train) * size["answer"](fast)
    live_items = min(test, profile.live_items * max(1, len(profile.switch_test_sets))) if profile.live_items \
        else test
    from .switching import SwitchingPlan

    # Table 3's live rows (KV-Generative sweep, DEER, fixed budgets, the budget curve's levels) + Table 4's grid
    runs = len(profile.generative_sweep) + 1 + len(profile.budgets) + SwitchingPlan.curve_levels + 4
    live = live_items * runs * size["method"](longest)
    parts = {"answers (03-05)": answers, "hidden-state CoE (03)": coe * size["hidden_coe"](0),
             "live methods (04-05)": live}
    return {**parts, "total": sum(parts.values())}


def describe(estimate: dict[str, float]) -> str:
    """``"about 0.1 GB (answers 0.1, ...)"`` for the runner's log."""
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in estimate.items() if k != "total")
    return f"at most {estimate['total'] / 1e9:.2f} GB of result stores ({parts} GB)"
