"""Decoding on a preallocated static cache (the GPU fast path) equals decoding on a dynamic cache.

On the CPU the static path runs eagerly (``compile=False``): same cache layout, same masks, same positions as
the compiled CUDA-graph step, so these tests pin down everything but the capture itself. The capture is
checked token for token against the eager step by the ``gpu`` tests at the end (skipped without CUDA).
"""

import pytest
import torch

from kvlib import TINY_ARCHS, tiny_model
from kvlib.core.cache import StaticKV, cache_layers, cache_length, crop_cache, forward, keep_rows, supports_static
from kvlib.core.decoding import DecodeConfig, decode, prefill_positions
from kvlib.core.pooling import token_trajectory

PROMPTS = ["hello there, what is 3+4?", "hi", "a much longer prompt with many characters in it, really",
           "what is 12 times 12?", "x", "tell me a story about a cat", "2+2=", "the quick brown fox"]
STATIC_ARCHS = [a for a in TINY_ARCHS if supports_static(tiny_model(a)[0])]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stop_token(model, tok, enc, n):
    """The token whose first occurrences end the rows at the most different steps (some rows never)."""
    free = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=n, stop_token_ids=(-1,),
                                                                         cache="dynamic"))
    firsts = lambda t: {toks.index(t) if t in toks else n for toks in free.tokens}  # noqa: E731
    return max({t for toks in free.tokens for t in toks}, key=lambda t: len(firsts(t)))


def _same(a, b, atol=1e-5):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason and a.switches == b.switches
    assert a.sampled_mask == b.sampled_mask and a.state.withdrawn == b.state.withdrawn
    for x, y in zip(a.max_prob + a.entropy, b.max_prob + b.entropy):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=atol * 10)


@pytest.mark.dynamic_cache
def test_which_models_get_a_static_cache():
    assert {"llama", "qwen2", "qwen3"} <= set(STATIC_ARCHS)
    assert "gemma3" not in STATIC_ARCHS  # sliding-window layers: dynamic cache
    model, _ = tiny_model("gemma3")
    with pytest.raises(ValueError, match="dynamic cache"):
        StaticKV(model, 32)
    assert DecodeConfig().static_for(model, "cuda") is False
    assert DecodeConfig().static_for(tiny_model("llama")[0], "cpu") is False  # auto: CUDA only
    assert DecodeConfig(cache="static").static_for(tiny_model("llama")[0], "cpu") is True
    with pytest.raises(ValueError, match="static"):
        DecodeConfig(cache="dynamic", compile=True)
    with pytest.raises(ValueError, match="cache must be"):
        DecodeConfig(cache="paged")


@pytest.mark.parametrize("arch", STATIC_ARCHS)
def test_static_equals_dynamic_with_stops_injection_withdrawal_and_rows_handed_over(arch):
    """Same tokens, statistics, slots and KV trajectories; every row handed to on_finish once, with its own
    cache rows."""
    model, tok = tiny_model(arch, seed=3)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    stop = _stop_token(model, tok, enc, 40)
    long_text = tok(" and then".join(["x"] * 12), add_special_tokens=False).input_ids[:24]

    def controller(state):
        if state.step == 2:
            return {1: (long_text, "long")}  # 24 tokens: more than the 16 spare columns
        if state.step == 5:
            return {i: (long_text[:3], "cut", 2) for i in range(0, 8, 3)
                    if not state.done[i] and len(state.tokens[i]) >= 2}
        return {}

    runs = {}
    for mode in ("dynamic", "static"):
        cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=(stop,), cache=mode)
        parts = []
        res = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=controller, on_finish=parts.append)
        runs[mode] = (res, parts)
    (dyn, dparts), (sta, sparts) = runs["dynamic"], runs["static"]
    assert isinstance(sta.state.cache, StaticKV)
    assert any(sta.switches) and any(sta.state.withdrawn) and len({len(t) for t in sta.tokens}) >= 3
    _same(sta, dyn)
    assert sta.state.slots == dyn.state.slots
    assert sorted(r for p in sparts for r in p.rows) == list(range(len(PROMPTS)))
    ref = {r: (p, j) for p in dparts for j, r in enumerate(p.rows)}
    for part in sparts:
        for j, row in enumerate(part.rows):
            p, k = ref[row]
            assert part.tokens[j] == p.tokens[k] and part.state.slots[j] == p.state.slots[k]
            if not part.state.slots[j]:
                continue  # stopped at its first token: nothing fed
            mine = token_trajectory(part.state.cache, j, part.state.slots[j], part="both")
            theirs = token_trajectory(p.state.cache, k, p.state.slots[k], part="both")
            assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5)


def test_sampling_on_a_static_cache_is_the_dynamic_sample():
    model, tok = tiny_model("qwen2", seed=2)
    enc = tok(PROMPTS[:4], return_tensors="pt", padding=True)
    cfgs = [DecodeConfig(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=50, cache=m)
            for m in ("dynamic", "static")]
    out = [decode(model, enc.input_ids, enc.attention_mask, c, seeds=[1, 2, 3, 4]) for c in cfgs]
    _same(*out)


def test_static_cache_reads_crops_and_refuses_row_drops():
    """Readers see the held positions only; a crop rolls back a trial exactly as on a dynamic cache."""
    model, tok = tiny_model("llama", seed=1)
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    mask = enc.attention_mask
    pos = prefill_positions(mask)
    sta = StaticKV(model, 4)  # too small: grows on the first forward
    _, sta = forward(model, enc.input_ids, mask, pos, sta)
    _, dyn = forward(model, enc.input_ids, mask, pos, None)
    assert cache_length(sta) == cache_length(dyn) == mask.shape[1] and sta.capacity >= mask.shape[1]
    for a, b in zip(cache_layers(sta), cache_layers(dyn)):
        assert torch.allclose(a.keys, b.keys, atol=1e-6) and torch.allclose(a.values, b.values, atol=1e-6)
    nxt = torch.tensor([[5], [6], [7]])
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    step_pos = mask.sum(-1, keepdim=True)
    first, _ = forward(model, nxt, step_mask, step_pos, sta)
    crop_cache(sta, mask.shape[1])
    crop_cache(dyn, mask.shape[1])
    again, _ = forward(model, nxt, step_mask, step_pos, sta)
    ref, _ = forward(model, nxt, step_mask, step_pos, dyn)
    assert torch.allclose(first.logits, again.logits, atol=1e-5) and torch.allclose(again.logits, ref.logits, atol=1e-5)
    with pytest.raises(ValueError, match="attention mask covers"):
        forward(model, nxt, mask, step_pos, sta)
    with pytest.raises(TypeError, match="cannot drop batch rows"):
        keep_rows(sta, [0])
    # a cache made inside the decoding loop (inference tensors) crops and grows outside it too
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=4, cache="static"))
    crop_cache(res.state.cache, mask.shape[1] + 1)
    res.state.cache.ensure(res.state.cache.capacity + 1)
    assert cache_length(res.state.cache) == mask.shape[1] + 1


def test_a_lent_cache_is_reused_and_a_stale_one_refuses_to_be_read():
    model, tok = tiny_model("llama", seed=1)
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=6, cache="static")
    first = decode(model, enc.input_ids, enc.attention_mask, cfg)
    keys = cache_layers(first.state.cache)[0].keys.clone()
    second = decode(model, enc.input_ids[:, 1:], enc.attention_mask[:, 1:], cfg)
    assert second.state.cache.cache is first.state.cache.cache  # the same memory, lent again
    with pytest.raises(RuntimeError, match="lent to a later decode call"):
        cache_layers(first.state.cache)
    with pytest.raises(RuntimeError, match="lent to a later decode call"):
        crop_cache(first.state.cache, 1)
    assert not torch.equal(cache_layers(second.state.cache)[0].keys, keys[:, :, 1:])  # it really was overwritten
    third = decode(model, enc.input_ids[:2], enc.attention_mask[:2], cfg)  # another batch size: new memory
    assert third.state.cache.cache is not second.state.cache.cache
    grown = StaticKV.lend(model, 2, 4096)  # more room than the pool holds: new memory
    assert grown.capacity == 4096 and grown.cache is not third.state.cache.cache
    from kvlib.core.cache import _POOL, release_static

    release_static(model)
    assert model not in _POOL


def test_deer_trials_on_a_static_cache_equal_the_dynamic_run():
    from kvlib.switching.early_exit import EarlyExitConfig, EarlyExitController
    from kvlib.switching.thinking import protocol_for, render_prompt

    from test_early_exit import CONFIDENT, QS, scripted

    model, tok = tiny_model("qwen3", seed=0)
    texts = [render_prompt(tok, q, "slow") for _, q in QS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for mode in ("dynamic", "static"):
        ctl = EarlyExitController(tok, protocol_for(tok), EarlyExitConfig(think_ratio=1.0), 2, {-1}, 40)
        with scripted(model, tok, "\nOk Wait", CONFIDENT, rows={0}):
            res = decode(model, enc.input_ids, enc.attention_mask,
                         DecodeConfig(max_new_tokens=40, stop_token_ids=(-1,), cache=mode), controller=ctl)
        out[mode] = (res, ctl.trials)
    assert out["static"][1] == out["dynamic"][1] and out["static"][1][0]  # the same trials, at least one
    _same(out["static"][0], out["dynamic"][0])


# --- the captured step on a GPU -------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_step_equals_eager_token_for_token_on_cuda(arch):
    """CUDA graphs (torch.compile, reduce-overhead) against the eager static and dynamic paths, fp32, with stops
    and an injection (the injection chunk runs eagerly between replays of the captured step)."""
    model, tok = tiny_model(arch, seed=3)
    model = model.to("cuda")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    stop = _stop_token(model, tok, enc, 24)
    inject = tok("ok then", add_special_tokens=False).input_ids

    def controller(state):
        return {2: (inject, "to_fast")} if state.step == 4 and not state.done[2] else {}

    runs = [decode(model, enc.input_ids, enc.attention_mask,
                   DecodeConfig(max_new_tokens=24, stop_token_ids=(stop,), cache=cache, compile=comp),
                   controller=controller)
            for cache, comp in (("dynamic", None), ("static", False), ("static", True))]
    assert runs[2].state.cache.length == runs[1].state.cache.length
    _same(runs[2], runs[1], atol=1e-4)
    _same(runs[2], runs[0], atol=1e-4)
    again = decode(model, enc.input_ids, enc.attention_mask,
                   DecodeConfig(max_new_tokens=24, stop_token_ids=(stop,), cache="static", compile=True),
                   controller=controller)  # the second batch replays the captured graph
    _same(again, runs[2], atol=1e-6)


@gpu
@pytest.mark.gpu
def test_auto_is_static_on_cuda_and_matches_generate():
    model, tok = tiny_model("qwen2", seed=1)
    model = model.to("cuda")
    enc = tok(PROMPTS[:1], return_tensors="pt").to("cuda")
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=16, stop_token_ids=(-1,)))
    assert isinstance(res.state.cache, StaticKV)
    ref = model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, enc.input_ids.shape[1]:]
    assert res.tokens[0] == ref.tolist()


def test_compile_default_reads_kvlib_compile(monkeypatch):
    """The step is captured on a GPU unless ``KVLIB_COMPILE=0``, never on a CPU; a bad value says what to set."""
    from kvlib.core.decoding import compile_default

    monkeypatch.delenv("KVLIB_COMPILE", raising=False)
    assert compile_default("cuda") is True and compile_default("cpu") is False
    for value, on_gpu in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("", True)):
        monkeypatch.setenv("KVLIB_COMPILE", value)
        assert compile_default("cuda") is on_gpu, value
        assert compile_default(torch.device("cpu")) is False, value
    monkeypatch.setenv("KVLIB_COMPILE", "yes please")
    with pytest.raises(ValueError, match="KVLIB_COMPILE='yes please': set it to 1"):
        compile_default("cuda")


def test_static_loop_follows_kvlib_compile(monkeypatch):
    """A decode with ``compile=None`` takes its step from :func:`compile_default`: eager on a CPU whatever is set."""
    from kvlib.core.cache import _step_stats
    from kvlib.core.decoding import DecodeLoop

    model, _ = tiny_model("llama")
    monkeypatch.setenv("KVLIB_COMPILE", "1")
    loop = DecodeLoop(model, DecodeConfig(max_new_tokens=2, cache="static"), static=True)
    assert loop.fast_step.fn is _step_stats and loop.fast_step.warm is None


@pytest.mark.slow
@pytest.mark.parametrize("setting, compiles", [("1", 2), ("static", 4)])
def test_captured_step_compiles_twice_for_every_shape_unless_static(setting, compiles, monkeypatch):
    """With symbolic shapes (the default) two compiles (the first shape's, then a symbolic one) serve every batch
    size and cache capacity, with the eager step's tokens; ``KVLIB_COMPILE=static`` compiles once per shape.
    (The graph is traced by dynamo as on a GPU;
    the ``aot_eager`` backend stands in for inductor and its CUDA graphs, which need a GPU and a C compiler.)"""
    from torch._dynamo.utils import counters

    from kvlib.core import cache

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real(fn, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setenv("KVLIB_COMPILE", setting)
    cache._compiled_step_stats.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    try:
        model, tok = tiny_model("qwen2", seed=3)
        for rows, new in ((2, 6), (3, 6), (4, 6), (2, 300)):  # three batch sizes; the last grows the capacity
            enc = tok(PROMPTS[:rows], return_tensors="pt", padding=True)
            cfg = DecodeConfig(max_new_tokens=new, stop_token_ids=(-1,), cache="static")
            got = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(**{**cfg.__dict__, "compile": True}))
            ref = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(**{**cfg.__dict__, "compile": False}))
            assert got.tokens == ref.tokens
        assert got.state.cache.capacity > 256
        assert counters["frames"]["ok"] == compiles
    finally:
        cache._compiled_step_stats.cache_clear()
        torch._dynamo.reset()
