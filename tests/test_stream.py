"""Continuous batching (decode_stream): waiting items join the running batch as rows finish, and every item's
output, statistics and cache features equal decoding it alone, on the dynamic and on the static cache."""

from dataclasses import replace

import pytest
import torch

from kvlib import tiny_model
from kvlib.core.cache import cache_layers
from kvlib.core.decoding import DecodeConfig, decode, decode_stream
from kvlib.switching.difficulty import last_n_sums
from kvlib.core.pooling import token_trajectory

PROMPTS = ["x", "hi", "2+2=", "what is 12 times 12?", "the quick brown fox", "tell me a story about a cat",
           "hello there, what is 3+4?", "a much longer prompt with many characters in it, really", "ok then",
           "a prompt that is longer than every earlier one by quite a lot of characters, to shift the cache"]


def _stop(model, tok, n):
    """A token whose first occurrence ends the items at the most different steps (some never)."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    free = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=n, stop_token_ids=(-1,),
                                                                         cache="dynamic"))
    firsts = lambda t: {toks.index(t) if t in toks else n for toks in free.tokens}  # noqa: E731
    return max({t for toks in free.tokens for t in toks}, key=lambda t: len(firsts(t)))


def _alone(model, tok, text, cfg):
    one = tok([text], return_tensors="pt")  # on a dynamic cache: a static one is lent again by the next call
    return one, decode(model, one.input_ids, one.attention_mask, replace(cfg, cache="dynamic"))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_joined_rows_equal_one_at_a_time_with_their_features(arch, cache):
    model, tok = tiny_model(arch, seed=3)
    stop = _stop(model, tok, 24)
    cfg = DecodeConfig(max_new_tokens=24, stop_token_ids=(stop,), cache=cache)
    items = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]
    parts, running = [], []
    res = decode_stream(model, items, parts.append, cfg, batch_size=3, on_step=running.append)
    assert sorted(r for p in parts for r in p.rows) == list(range(len(PROMPTS)))  # each item handed over once
    assert max(running) <= 3
    alone = [_alone(model, tok, t, cfg) for t in PROMPTS]
    fixed_steps = sum(max(len(alone[i][1].tokens[0]) for i in range(s, min(s + 3, len(PROMPTS))))
                      for s in range(0, len(PROMPTS), 3))
    assert len(running) < fixed_steps  # rows joined instead of the batches draining to their longest row
    for i, (_, single) in enumerate(alone):
        assert res.tokens[i] == single.tokens[0] and res.finish_reason[i] == single.finish_reason[0]
        assert torch.allclose(torch.tensor(res.max_prob[i]), torch.tensor(single.max_prob[0]), atol=1e-5)
        assert torch.allclose(torch.tensor(res.entropy[i]), torch.tensor(single.entropy[0]), atol=1e-4)
    assert len({p.prompt_ids.shape[1] for p in parts}) > 1  # joined rows sit at other columns than the first batch
    layers = list(range(len(cache_layers(alone[0][1].state.cache))))
    for part in parts:
        sums = last_n_sums(part.state.cache, part.prompt_mask, (2, 4), layers)
        for j, i in enumerate(part.rows):
            one, single = alone[i]
            assert part.tokens[j] == single.tokens[0]
            assert part.prompt_ids[j][part.prompt_mask[j].bool()].tolist() == one.input_ids[0].tolist()
            mine = token_trajectory(part.state.cache, j, part.state.slots[j], part="both")
            ref = token_trajectory(single.state.cache, 0, single.state.slots[0], part="both")
            assert mine.shape == ref.shape and torch.allclose(mine, ref, atol=1e-5)
            ref_sums = last_n_sums(single.state.cache, one.attention_mask, (2, 4), layers)[0]
            assert torch.allclose(sums[j], ref_sums, atol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sampled_rows_join_with_their_own_seeds(cache):
    model, tok = tiny_model("qwen3", seed=2)
    cfg = DecodeConfig(max_new_tokens=10, do_sample=True, temperature=1.3, stop_token_ids=(_stop(model, tok, 10),),
                       cache=cache)
    items = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]
    seeds = [5 * i + 1 for i in range(len(PROMPTS))]
    res = decode_stream(model, items, lambda part: None, cfg, batch_size=4, seeds=seeds)
    for i, text in enumerate(PROMPTS):
        one = tok([text], return_tensors="pt")
        assert res.tokens[i] == decode(model, one.input_ids, one.attention_mask, cfg, seeds=[seeds[i]]).tokens[0]


def test_a_joined_row_equals_generate_and_a_budget_of_one_works():
    model, tok = tiny_model("llama", seed=1)
    items = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]
    res = decode_stream(model, items, lambda part: None, DecodeConfig(max_new_tokens=12), batch_size=2)
    for i in (0, len(PROMPTS) - 1):
        ids = torch.tensor([items[i]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        eos = tok.eos_token_id
        assert res.tokens[i] == (ref[: ref.index(eos) + 1] if eos in ref else ref)
    one = decode_stream(model, items, lambda part: None, DecodeConfig(max_new_tokens=1), batch_size=3)
    assert [len(t) for t in one.tokens] == [1] * len(PROMPTS)


def test_clear_errors():
    model, tok = tiny_model("gemma3")
    with pytest.raises(ValueError, match="sliding-window"):
        decode_stream(model, [[1, 2]], lambda part: None)
    with pytest.raises(ValueError, match="at least one item"):
        decode_stream(tiny_model("llama")[0], [], lambda part: None)


def _plain_and_stream(model, enc, items, cfg):
    """``decode`` of the padded batch and ``decode_stream`` of the items (batch 4, items joining), with the attention
    masks of every handed-over part and the KV trajectory of every row handed over."""
    parts = []
    plain = decode(model, enc.input_ids, enc.attention_mask, cfg, on_finish=parts.append)
    stream = decode_stream(model, items, parts.append, cfg, batch_size=4)
    trajs = [token_trajectory(p.state.cache, j, p.state.slots[j], part="both") for p in parts
             for j in range(len(p.rows))]
    return plain, stream, [p.state.attention_mask for p in parts], trajs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_launching_the_next_step_early_changes_nothing(cache, monkeypatch):
    """The GPU launches step t+1 before the host reads step t (DecodeLoop.lookahead, on CUDA by default): the
    tokens, statistics, slots, masks and handed-over caches equal those of the step-by-step loop."""
    from kvlib.core.decoding import DecodeLoop

    model, tok = tiny_model("qwen2", seed=3)
    cfg = DecodeConfig(max_new_tokens=24, stop_token_ids=(_stop(model, tok, 24),), cache=cache)
    items = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    runs = {}
    for ahead in (False, True):
        monkeypatch.setattr(DecodeLoop, "lookahead", ahead)
        runs[ahead] = _plain_and_stream(model, enc, items, cfg)
    for a, b in zip(runs[False][:2], runs[True][:2]):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason and a.state.slots == b.state.slots
        assert all(torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-6) for x, y in zip(a.max_prob, b.max_prob))
    assert all(torch.equal(x, y) for x, y in zip(runs[False][2], runs[True][2]))
    assert all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5) for x, y in zip(runs[False][3], runs[True][3]))


def test_filler_rows_bucket_the_batch_and_change_no_item():
    """A static batch holding every item (fewer than batch_size) is padded with idle rows to the next power of two
    (one compiled step for sets of nearby sizes): the cache has that many rows, every item equals decoding it alone
    with its features, and no idle row is handed over or returned."""
    from kvlib.core.decoding import filler_rows

    assert [filler_rows(n, 512) for n in (1, 3, 4, 5, 400, 493, 512)] == [0, 1, 0, 3, 112, 19, 0]
    assert filler_rows(300, 256) == 0 and filler_rows(200, 256) == 56 and filler_rows(5, 6) == 1  # capped
    model, tok = tiny_model("qwen2", seed=3)
    stop = _stop(model, tok, 16)
    cfg = DecodeConfig(max_new_tokens=16, stop_token_ids=(stop,), cache="static")
    texts = PROMPTS[:5]
    items = [tok(t, add_special_tokens=False).input_ids for t in texts]
    parts = []
    res = decode_stream(model, items, parts.append, cfg, batch_size=16)
    assert len(res.tokens) == len(texts) and "filler" not in res.finish_reason
    assert res.state.attention_mask.shape[0] == 8  # 5 items, 3 idle rows
    assert sorted(r for p in parts for r in p.rows) == list(range(len(texts)))
    for i, text in enumerate(texts):
        one, single = _alone(model, tok, text, cfg)
        assert res.tokens[i] == single.tokens[0] and res.finish_reason[i] == single.finish_reason[0]
        assert torch.allclose(torch.tensor(res.max_prob[i]), torch.tensor(single.max_prob[0]), atol=1e-5)
    for part in parts:
        for j, i in enumerate(part.rows):
            _, single = _alone(model, tok, texts[i], cfg)
            mine = token_trajectory(part.state.cache, j, part.state.slots[j], part="both")
            ref = token_trajectory(single.state.cache, 0, single.state.slots[0], part="both")
            assert mine.shape == ref.shape and torch.allclose(mine, ref, atol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_in_column_chunks_changes_nothing(cache):
    """A batch of prompts prefilled in chunks of a few columns (DecodeConfig.prefill_tokens), at the start and when
    items join, gives the tokens, statistics, slots, masks and KV trajectories of the one-forward prefill; chunks
    of one column leave the first chunks of the shorter (left-padded) rows all padding, which must not poison them."""
    model, tok = tiny_model("qwen2", seed=3)
    stop = _stop(model, tok, 24)
    items = [tok(t, add_special_tokens=False).input_ids for t in PROMPTS]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc.attention_mask.sum(-1).min() < enc.input_ids.shape[1] // 2  # some rows mostly padding
    runs = {}
    for budget in (None, 4, 3 * len(PROMPTS)):
        cfg = DecodeConfig(max_new_tokens=24, stop_token_ids=(stop,), cache=cache, prefill_tokens=budget)
        runs[budget] = _plain_and_stream(model, enc, items, cfg)
    ref = runs[None]
    for budget in (4, 3 * len(PROMPTS)):
        got = runs[budget]
        for a, b in zip(ref[:2], got[:2]):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason and a.state.slots == b.state.slots
            assert all(torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
                       for x, y in zip(a.max_prob, b.max_prob))
        assert all(torch.equal(x, y) for x, y in zip(ref[2], got[2]))
        assert all(x.shape == y.shape and torch.allclose(x, y, atol=1e-4) for x, y in zip(ref[3], got[3]))
        assert all(torch.isfinite(t).all() for t in got[3])


def test_prefill_tokens_must_be_positive():
    with pytest.raises(ValueError, match="prefill_tokens must be a positive number"):
        DecodeConfig(prefill_tokens=0)
