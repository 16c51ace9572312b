"""Grouped decode attention (kvlib.core.attention): the same decoding as transformers' sdpa, key/value heads
read once per decode step instead of copied per query head."""

import copy

import pytest
import torch

from kvlib import tiny_model
from kvlib.core import attention
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.core.pooling import token_trajectory

PROMPTS = ["hello there, what is 3+4?", "hi", "a much longer prompt with many characters in it, really", "ok"]


def _grouped(model):
    twin = copy.deepcopy(model)
    assert attention.use_grouped_decode(twin) and twin.config._attn_implementation == attention.NAME
    return twin


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_grouped_decode_equals_sdpa(arch, cache, monkeypatch):
    """Tokens, statistics and the cache's KV trajectories equal sdpa's, and only one-token steps take the grouped
    path (the prefill goes to transformers' own function)."""
    model, tok = tiny_model(arch, seed=3)
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # shared key/value heads
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=20, stop_token_ids=(-1,), cache=cache)
    ref = decode(model, enc.input_ids, enc.attention_mask, cfg)
    calls = {"grouped": 0, "other": 0}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    kv_heads = model.config.num_key_value_heads

    def spy(q, k, v, **kw):  # grouped: the query has the key/value heads, and the query heads as positions
        calls["grouped" if q.shape[1] == kv_heads and k.shape[1] == kv_heads else "other"] += 1
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = decode(_grouped(model), enc.input_ids, enc.attention_mask, cfg)
    layers = model.config.num_hidden_layers
    assert calls == {"grouped": 19 * layers, "other": layers}  # 19 steps after the prefill's token; the prefill
    assert got.tokens == ref.tokens
    for x, y in zip(got.max_prob + got.entropy, ref.max_prob + ref.entropy):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    for j in range(len(PROMPTS)):
        a = token_trajectory(got.state.cache, j, got.state.slots[j], part="both")
        b = token_trajectory(ref.state.cache, j, ref.state.slots[j], part="both")
        assert torch.allclose(a, b, atol=1e-5)


def test_models_without_shared_heads_or_sdpa_are_left_alone(monkeypatch):
    model, _ = tiny_model("qwen2", seed=3)
    monkeypatch.setenv("KVLIB_GROUPED_DECODE", "0")
    off = copy.deepcopy(model)
    assert attention.use_grouped_decode(off) is False and off.config._attn_implementation == "sdpa"
    monkeypatch.delenv("KVLIB_GROUPED_DECODE")
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    assert attention.use_grouped_decode(eager) is False and eager.config._attn_implementation == "eager"
    mha = copy.deepcopy(model)
    mha.config.num_key_value_heads = mha.config.num_attention_heads
    assert attention.use_grouped_decode(mha) is False and mha.config._attn_implementation == "sdpa"


def test_grouped_attention_traces_under_the_compiler():
    """The compiled step (dynamo, symbolic shapes; ``aot_eager`` stands in for inductor) with grouped attention
    decodes the eager sdpa tokens."""
    from kvlib.core.cache import StaticKV, _step_stats

    model, tok = tiny_model("qwen2", seed=3)
    twin = _grouped(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = decode(model, enc.input_ids, enc.attention_mask,
                 DecodeConfig(max_new_tokens=8, stop_token_ids=(-1,), cache="static", compile=False))
    torch._dynamo.reset()
    try:
        step = torch.compile(_step_stats, backend="aot_eager", dynamic=True, fullgraph=True)
        from kvlib.core import cache as cache_mod

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cache_mod, "_compiled_step_stats", lambda dynamic=True: step)
            got = decode(twin, enc.input_ids, enc.attention_mask,
                         DecodeConfig(max_new_tokens=8, stop_token_ids=(-1,), cache="static", compile=True))
    finally:
        torch._dynamo.reset()
    assert isinstance(got.state.cache, StaticKV) and got.tokens == ref.tokens
