"""Replaying stored greedy answers under a controller gives the records of the live run (tiny models).

Every test runs one method twice on the same items, live and replayed from the plain greedy answers of the
same prompts, and compares the records token for token.
"""

import numpy as np
import pytest
import torch
from test_early_exit import CONFIDENT, scripted

from kvlib import tiny_model
from kvlib.switching.kv_switch import SwitchConfig, adaptive_generate
from kvlib.core.decoding import DecodeConfig, RowHistory, decode
from kvlib.switching.difficulty import FeatureSpec, live_features
from kvlib.switching.early_exit import EarlyExitConfig, budget_generate, early_exit_generate
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store
from kvlib.runs.replay import check_reference, replay_generate
from kvlib.switching.thinking import render_prompt

QS = [(f"q{i}", f"What is {i} + {2 * i}?" + " Think." * (i % 3)) for i in range(7)]
KEYS = ("token_ids", "n_tokens", "finish_reason", "switches", "output")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=3)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3", seed=0)


def _plain(model, tok, root, mode, n, extractors=None):
    settings = GenerationSettings(max_new_tokens=n)
    prompts = [Prompt(i, render_prompt(tok, q, mode)) for i, q in QS]
    store = open_store(root, "m", f"plain-{mode}-{n}", settings, extractors or {})
    recs = generate(model, tok, prompts, store, settings, batch_size=3, extractors=extractors, progress=False)
    return {r["item_id"]: r for r in recs}


def _same(live, replayed, trace_atol=None):
    assert len(live) == len(replayed)
    for a, b in zip(live, replayed):
        for k in KEYS:
            assert a[k] == b[k], (a["item_id"], k)
        assert a["max_prob"] == pytest.approx(b["max_prob"], abs=1e-4)
        if "difficulty_trace" in a:
            assert [n for n, _ in a["difficulty_trace"]] == [n for n, _ in b["difficulty_trace"]]
            da, db = [d for _, d in a["difficulty_trace"]], [d for _, d in b["difficulty_trace"]]
            assert da == (pytest.approx(db, abs=trace_atol) if trace_atol else db)
        assert "replayed_until" in b and 0 < b["replayed_until"] <= b["n_tokens"]


def _by_tokens(state, rows):
    """A scripted difficulty that depends only on the row's own tokens (not on its place in a batch)."""
    return [{0: 10.0, 1: 90.0, 2: 90.0}.get(sum(state.tokens[r]) % 7, 50.0) for r in rows]


@pytest.mark.parametrize("start", ["slow", "fast"])
def test_kv_generative_replay_equals_live(tiny, tmp_path, start):
    model, tok = tiny
    refs = {"slow": _plain(model, tok, tmp_path, "slow", 30), "fast": _plain(model, tok, tmp_path, "fast", 12)}
    cfg = SwitchConfig(start=start, check_every=4, tau_fast=30, tau_slow=70, fast_tokens=12)
    kw = dict(settings=GenerationSettings(max_new_tokens=30), batch_size=3, difficulty=_by_tokens, progress=False)
    live = adaptive_generate(model, tok, QS, None, cfg, root=tmp_path / "live", **kw)
    replayed = adaptive_generate(model, tok, QS, None, cfg, root=tmp_path / "replay", references=refs, **kw)
    _same(live, replayed)
    switched = [r for r in replayed if r["switches"]]
    assert switched and len(switched) < len(replayed)  # both kinds of rows are exercised
    assert all(r["replayed_until"] == r["switches"][0][0] for r in switched)
    assert all(r["replayed_until"] == r["n_tokens"] for r in replayed if not r["switches"])


def _from_cache(state, rows):
    """A difficulty read from the live cache (the last 4 fed tokens of the last 2 layers), spread over 0-100."""
    f = live_features(state, rows, FeatureSpec(4, 2))
    return (50 + 50 * torch.tanh(f.mean(-1) * 20)).tolist()


def test_kv_generative_checks_read_the_replayed_cache(tiny, tmp_path):
    model, tok = tiny
    slow = _plain(model, tok, tmp_path, "slow", 30)
    cfg = SwitchConfig(start="slow", check_every=4, tau_fast=20, tau_slow=70)
    kw = dict(settings=GenerationSettings(max_new_tokens=30), batch_size=4, difficulty=_from_cache, progress=False)
    live = adaptive_generate(model, tok, QS, None, cfg, root=tmp_path / "live", **kw)
    replayed = adaptive_generate(model, tok, QS, None, cfg, root=tmp_path / "replay", references={"slow": slow}, **kw)
    _same(live, replayed, trace_atol=1e-3)  # prefilled keys/values equal the decoded ones up to rounding
    switched = sum(bool(r["switches"]) for r in replayed)
    assert 0 < switched < len(QS)


def test_deer_replay_runs_its_trials_on_the_replayed_cache(qwen3, tmp_path):
    model, tok = qwen3
    settings = GenerationSettings(max_new_tokens=40)
    with scripted(model, tok, "\nOk Wait", CONFIDENT):
        slow = _plain(model, tok, tmp_path, "slow", 40)
        kw = dict(settings=settings, batch_size=2, progress=False)
        live = early_exit_generate(model, tok, QS, EarlyExitConfig(), root=tmp_path / "live", **kw)
        replayed = early_exit_generate(model, tok, QS, EarlyExitConfig(), root=tmp_path / "replay",
                                       references=slow, **kw)
    _same(live, replayed)
    assert all(r["early_exit_trials"] and r["switches"] for r in replayed)  # trials ran and exited
    assert [r["early_exit_trials"] for r in live] == [r["early_exit_trials"] for r in replayed]
    assert [r["withdrawn_tokens"] for r in live] == [r["withdrawn_tokens"] for r in replayed]


def test_deer_cap_and_budget_replay_equal_live(tiny, tmp_path):
    model, tok = tiny
    slow = _plain(model, tok, tmp_path, "slow", 30)
    kw = dict(settings=GenerationSettings(max_new_tokens=30), batch_size=3, progress=False)
    cfg = EarlyExitConfig(think_ratio=0.5)  # no transition word in random text: the cap at 15 tokens acts
    live = early_exit_generate(model, tok, QS, cfg, root=tmp_path / "live", **kw)
    replayed = early_exit_generate(model, tok, QS, cfg, root=tmp_path / "replay", references=slow, **kw)
    _same(live, replayed)
    live = budget_generate(model, tok, QS, 8, answer_tokens=6, root=tmp_path / "blive", **kw)
    replayed = budget_generate(model, tok, QS, 8, answer_tokens=6, root=tmp_path / "breplay", references=slow, **kw)
    _same(live, replayed)
    assert [r["forced"] for r in live] == [r["forced"] for r in replayed]


def test_decoding_from_a_history_continues_the_greedy_run(tiny):
    model, tok = tiny
    texts = [render_prompt(tok, q, "slow") for _, q in QS[:3]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = DecodeConfig(max_new_tokens=16, stop_token_ids=(-1,))
    full = decode(model, enc.input_ids, enc.attention_mask, cfg)
    k = 5
    rows = [tok(t, add_special_tokens=False).input_ids + full.tokens[i][:k] for i, t in enumerate(texts)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    hist = [RowHistory(tuple(full.tokens[i][:k]), (True,) * k, tuple(full.max_prob[i][:k]),
                       tuple(full.entropy[i][:k])) for i in range(3)]
    resumed = decode(model, ids, mask, cfg, history=hist)
    assert resumed.tokens == full.tokens
    assert np.allclose(np.array(resumed.max_prob), np.array(full.max_prob), atol=1e-4)
    with pytest.raises(ValueError, match="history tokens must be the last"):
        decode(model, ids, mask, cfg, history=[RowHistory((1,), (True,), (0.5,), (1.0,))] * 3)
    with pytest.raises(ValueError, match="nothing left to decode"):
        decode(model, ids, mask, DecodeConfig(max_new_tokens=k), history=hist)


def test_a_reference_of_another_prompt_or_a_sampled_run_is_refused(tiny, tmp_path):
    model, tok = tiny
    slow = _plain(model, tok, tmp_path, "slow", 12)
    fast_prompt = Prompt("q1", render_prompt(tok, QS[1][1], "fast"))
    with pytest.raises(ValueError, match="generated for another prompt"):
        check_reference(fast_prompt, slow["q1"])
    sampled = GenerationSettings(max_new_tokens=12, do_sample=True)
    store = open_store(tmp_path, "m", "x", sampled, {})
    with pytest.raises(ValueError, match="replay needs greedy settings"):
        replay_generate(model, tok, [fast_prompt], store, slow, sampled, progress=False)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_replay_loop_equals_decode_with_and_without_a_controller(tiny, cache):
    """ReplayLoop (kvlib.runs.replay) and decode share one loop: replaying decode's own greedy answers gives decode's
    tokens, statistics, slots and KV trajectories; under a controller that injects into one row and withdraws
    from another, the rows turn live and the result equals decode under the same controller."""
    from kvlib.core.pooling import token_trajectory
    from kvlib.runs.replay import _replay_batch

    model, tok = tiny
    tok.padding_side = "left"
    chunk = [Prompt(i, render_prompt(tok, q, "slow")) for i, q in QS[:4]]
    enc = tok([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = DecodeConfig(max_new_tokens=14, cache=cache)
    inject = tok("ok", add_special_tokens=False).input_ids

    def controller(state):
        if state.step == 3:
            return {0: (inject, "to_fast")}
        return {2: (inject, "cut", 2)} if state.step == 6 and not state.done[2] else {}

    for ctl in (None, controller):
        parts = {}
        live = decode(model, enc.input_ids, enc.attention_mask, cfg, controller=ctl,
                      on_finish=lambda part: parts.update({r: (part, j) for j, r in enumerate(part.rows)})
                      if cache == "dynamic" else None)
        plain = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=14, cache="dynamic"))
        refs = [{"max_prob": plain.max_prob[i], "entropy": plain.entropy[i]} for i in range(len(chunk))]
        traj = {"t": lambda m, part, ids, mask: [{"t": token_trajectory(part.state.cache, j, s, part="both").numpy()}
                                                for j, s in enumerate(part.state.slots)]}
        res, arrays, until = _replay_batch(model, tok, chunk, plain.tokens, refs, cfg, ctl, traj)
        assert res.tokens == live.tokens and res.switches == live.switches
        assert res.finish_reason == live.finish_reason and res.state.withdrawn == live.state.withdrawn
        for i in range(len(chunk)):
            assert np.allclose(res.max_prob[i], live.max_prob[i], atol=1e-4)
            if cache == "dynamic":  # the rows that left the live batch: their own cache copies
                part, j = parts[i]
                ref = token_trajectory(part.state.cache, j, part.state.slots[j], part="both").numpy()
                assert arrays[i]["t"].shape == ref.shape and np.allclose(arrays[i]["t"], ref, atol=1e-4)
        if ctl is None:
            assert until == [len(t) for t in plain.tokens]
        else:
            assert until[0] == 4 and until[1] == len(plain.tokens[1]) and until[2] == 7 - 2
