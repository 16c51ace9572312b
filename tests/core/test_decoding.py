"""The decoding loop: equality with greedy generate, batch independence, budgets, injection."""

import pytest
import torch

from kvlib import TINY_ARCHS, tiny_model
from kvlib.core.decoding import DecodeConfig, decode

PROMPTS = ["hello there, what is 3+4?", "hi", "a much longer prompt with many characters in it, really"]


def _reference(model, tok, text, n):
    enc = tok([text], return_tensors="pt")
    out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=n,
                         do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_equals_generate_and_batched_equals_single(arch):
    model, tok = tiny_model(arch, seed=1)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    batched = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=16))
    for i, text in enumerate(PROMPTS):
        assert batched.tokens[i] == _reference(model, tok, text, 16)
        one = tok([text], return_tensors="pt")
        single = decode(model, one.input_ids, one.attention_mask, DecodeConfig(max_new_tokens=16))
        assert single.tokens[0] == batched.tokens[i]
        assert single.state.slots[0] != [] and len(single.state.slots[0]) == len(single.tokens[0]) - 1
        assert torch.allclose(torch.tensor(single.max_prob[0]), torch.tensor(batched.max_prob[i]), atol=1e-5)
        assert torch.allclose(torch.tensor(single.entropy[0]), torch.tensor(batched.entropy[i]), atol=1e-4)


def test_stats_are_probabilities_and_entropies():
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=8))
    vocab_bits = torch.log2(torch.tensor(float(model.config.vocab_size)))
    for mp, ent in zip(res.max_prob, res.entropy):
        assert all(0 < p <= 1 for p in mp)
        assert all(0 <= h <= vocab_bits + 1e-4 for h in ent)
        assert len(mp) == len(ent) == 8


def test_stop_token_ends_an_item_and_cuts_its_statistics():
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    free = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=10))
    stop_tok = free.tokens[0][3]
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=10, stop_token_ids=(stop_tok,)))
    k = free.tokens[0].index(stop_tok)
    assert res.tokens[0] == free.tokens[0][: k + 1]
    assert res.finish_reason == ["stop"] and len(res.max_prob[0]) == k + 1
    assert free.finish_reason == ["length"]


def test_sampling_is_seeded_per_item():
    model, tok = tiny_model("qwen2")
    cfg = DecodeConfig(max_new_tokens=12, do_sample=True, temperature=1.5)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    a = decode(model, enc.input_ids, enc.attention_mask, cfg, seeds=[1, 2, 3])
    one = tok([PROMPTS[1]], return_tensors="pt")
    b = decode(model, one.input_ids, one.attention_mask, cfg, seeds=[2])
    c = decode(model, one.input_ids, one.attention_mask, cfg, seeds=[7])
    assert a.tokens[1] == b.tokens[0]
    assert a.tokens[1] != c.tokens[0]


def test_injection_continues_on_the_same_cache_and_counts_tokens():
    """Injecting text into one row equals decoding that row alone with the text appended by hand."""
    model, tok = tiny_model("qwen3", seed=2)
    inject = tok("</think>", add_special_tokens=False).input_ids + tok("ok", add_special_tokens=False).input_ids

    def controller(state):
        return {0: (inject, "to_fast")} if state.step == 3 else {}

    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=14), controller=controller)
    assert res.switches[0] == [(4, "to_fast")] and res.switches[1] == []
    assert res.tokens[0][4 : 4 + len(inject)] == inject
    assert res.sampled_mask[0].count(False) == len(inject)
    assert len(res.tokens[0]) == 14  # the budget counts injected tokens
    # row 1 is unaffected by row 0's injection
    plain = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=14))
    assert res.tokens[1] == plain.tokens[1]
    # row 0 equals a fresh decode of prompt + its first 4 tokens + injected text
    prefix = plain.tokens[0][:4] + inject
    ids = torch.cat([tok([PROMPTS[0]], return_tensors="pt").input_ids, torch.tensor([prefix])], dim=1)
    fresh = decode(model, ids, torch.ones_like(ids), DecodeConfig(max_new_tokens=14 - len(prefix)))
    assert res.tokens[0][len(prefix):] == fresh.tokens[0]
    # the cache grew in place: every fed token of row 0 has a distinct increasing slot
    slots = res.state.slots[0]
    assert slots == sorted(set(slots)) and len(slots) == len(res.tokens[0]) - 1


def test_clear_errors():
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=10_000))
    tok.padding_side = "right"
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="left-padded"):
        decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeConfig(max_new_tokens=0)


MANY = PROMPTS + ["what is 12 times 12?", "x", "tell me a story about a cat", "2+2=", "the quick brown fox"]


def _staggered_stop(model, tok, n=16):
    """A stop token that ends the rows of MANY at different steps (some never)."""
    enc = tok(MANY, return_tensors="pt", padding=True)
    free = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=n, stop_token_ids=(-1,)))
    counts = {}
    for toks in free.tokens:
        for t in set(toks):
            counts[t] = counts.get(t, 0) + 1
    return enc, max(counts, key=lambda t: (0 < counts[t] < len(MANY), counts[t]))


@pytest.mark.dynamic_cache
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_finished_rows_leave_the_batch_without_changing_any_result(arch):
    """on_finish drops finished rows from the cache; every output equals the run that keeps them."""
    from kvlib.core.pooling import token_trajectory

    model, tok = tiny_model(arch, seed=3)
    enc, stop = _staggered_stop(model, tok)
    cfg = DecodeConfig(max_new_tokens=16, stop_token_ids=(stop,))
    full = decode(model, enc.input_ids, enc.attention_mask, cfg)
    lengths = sorted({len(t) for t in full.tokens})
    assert len(lengths) >= 3, "the test needs rows that finish at different steps"
    parts, batch_sizes = [], []
    res = decode(model, enc.input_ids, enc.attention_mask, cfg, on_finish=parts.append,
                 on_step=lambda n: None, controller=lambda s: batch_sizes.append(len(s.rows)) or {})
    assert min(batch_sizes) < len(MANY)  # rows really left
    assert sorted(r for p in parts for r in p.rows) == list(range(len(MANY)))  # each row handed over once
    assert res.tokens == full.tokens and res.finish_reason == full.finish_reason
    assert res.state.slots == full.state.slots
    for a, b in zip(res.max_prob, full.max_prob):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    from kvlib.core.cache import cache_layers

    full_attn = [i for i, layer in enumerate(cache_layers(full.state.cache)) if layer.sliding_window is None]
    for part in parts:  # the handed-over cache rows hold the same keys/values as the full run's cache
        for j, row in enumerate(part.rows):
            assert part.tokens[j] == full.tokens[row] and part.finish_reason[j] == full.finish_reason[row]
            mine = token_trajectory(part.state.cache, j, part.state.slots[j], part="both", layers=full_attn)
            ref = token_trajectory(full.state.cache, row, full.state.slots[row], part="both", layers=full_attn)
            assert torch.allclose(mine, ref, atol=1e-5)


def test_injection_and_sampling_survive_rows_leaving():
    model, tok = tiny_model("qwen3", seed=2)
    enc, stop = _staggered_stop(model, tok)
    inject = tok("</think>ok", add_special_tokens=False).input_ids

    def controller(state):  # inject into every still-running odd row at step 5 (logical indices)
        return {i: (inject, "to_fast") for i in range(1, len(MANY), 2) if state.step == 5 and not state.done[i]}

    for cfg in (DecodeConfig(max_new_tokens=16, stop_token_ids=(stop,)),
                DecodeConfig(max_new_tokens=16, stop_token_ids=(stop,), do_sample=True, temperature=1.3)):
        seeds = list(range(len(MANY)))
        keep = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=controller, seeds=seeds)
        leave = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=controller, seeds=seeds,
                       on_finish=lambda part: None)
        assert leave.tokens == keep.tokens and leave.switches == keep.switches
        assert any(keep.switches)


def test_withdrawn_tokens_vanish_as_if_never_sampled():
    """Withdraw row 0's last 3 tokens (2 already fed) and inject text: the row continues exactly as a fresh
    decode of prompt + kept tokens + text; the other row, and a run whose finished rows leave, agree."""
    model, tok = tiny_model("qwen3", seed=2)
    inject = tok("ok", add_special_tokens=False).input_ids

    def controller(state):
        return {0: (inject, "cut", 3)} if state.step == 5 else {}

    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=14, stop_token_ids=(-1,))
    plain = decode(model, enc.input_ids, enc.attention_mask, cfg)
    res = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=controller)
    kept = plain.tokens[0][:3]
    assert res.tokens[0][:5] == kept + inject and res.switches[0] == [(3, "cut")]
    assert res.state.withdrawn == [3, 0] and res.tokens[1] == plain.tokens[1]
    assert len(res.max_prob[0]) == res.sampled_mask[0].count(True) == 14 - len(inject)
    assert len(res.state.slots[0]) == len(res.tokens[0]) - 1  # the withdrawn slots are gone
    assert res.state.attention_mask[0, res.state.slots[0]].all()
    ids = torch.cat([tok([PROMPTS[0]], return_tensors="pt").input_ids, torch.tensor([kept + inject])], dim=1)
    fresh = decode(model, ids, torch.ones_like(ids), DecodeConfig(max_new_tokens=14 - 5, stop_token_ids=(-1,)))
    assert res.tokens[0][5:] == fresh.tokens[0]
    assert torch.allclose(torch.tensor(res.max_prob[0][3:]), torch.tensor(fresh.max_prob[0]), atol=1e-5)
    leave = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=controller, on_finish=lambda part: None)
    assert leave.tokens == res.tokens and leave.state.withdrawn == res.state.withdrawn


def test_only_the_rows_own_sampled_tokens_can_be_withdrawn():
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    x = tok("x", add_special_tokens=False).input_ids
    cases = {
        "injected": lambda s: {0: (x, "a")} if s.step == 1 else ({0: (x, "b", 2)} if s.step == 2 else {}),
        "too many": lambda s: {0: (x, "b", 5)} if s.step == 2 else {},
        "nothing in their place": lambda s: {0: ([], "b", 1)} if s.step == 2 else {},
    }
    for name, ctl in cases.items():
        with pytest.raises(ValueError, match="withdraw"):
            decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=8), controller=ctl)
