"""KV-Classification and KV-Generative on tiny models with scripted difficulty functions."""

import numpy as np
import pytest

from kvlib import tiny_model
from kvlib.switching.kv_switch import KVSwitchController, SwitchConfig, adaptive_generate, initial_difficulty
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.switching.difficulty import (FeatureSpec, TrainConfig, features_from_sums, prompt_kv_extractor,
                                        train_classifier)
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store, record_array
from kvlib.switching.thinking import protocol_for, render_prompt

QS = [(f"q{i}", f"What is {i} + {3 * i}?" + " Think." * (i % 3)) for i in range(5)]
S = GenerationSettings(max_new_tokens=20)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=2)


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def _plain(model, tok, root, mode, settings=S, extractors=None):
    prompts = [Prompt(i, render_prompt(tok, q, mode)) for i, q in QS]
    store = open_store(root, "m", f"plain-{mode}", settings, extractors or {})
    return generate(model, tok, prompts, store, settings, batch_size=2, extractors=extractors, progress=False)


def test_switching_off_equals_greedy_generate(tiny, tmp_path):
    model, tok = tiny
    for mode in ("slow", "fast"):
        a = adaptive_generate(model, tok, QS, None, SwitchConfig.off(mode), settings=S, root=tmp_path, batch_size=3,
                              progress=False)
        b = _plain(model, tok, tmp_path, mode)
        assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
        assert all(r["switches"] == [] and r["start_mode"] == mode for r in a)


def test_generative_switches_at_the_check_and_counts_injected_tokens(tiny, tmp_path):
    model, tok = tiny
    calls = []

    def scripted(state, rows):
        calls.append((len(state.tokens[rows[0]]), list(rows)))
        return [10.0] * len(rows)  # "easy" at every check

    cfg = SwitchConfig(start="slow", check_every=8, tau_fast=30, tau_slow=70)
    long = GenerationSettings(max_new_tokens=48)  # room for the 31-character switch text
    recs = adaptive_generate(model, tok, QS, None, cfg, settings=long, root=tmp_path, batch_size=3,
                             difficulty=scripted, progress=False)
    plain = _plain(model, tok, tmp_path, "slow")
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    for r, p in zip(recs, plain):
        assert [tuple(s) for s in r["switches"]] == [(8, "to_fast")]
        assert r["token_ids"][:8] == p["token_ids"][:8]  # same greedy prefix up to the check
        assert r["token_ids"][8 : 8 + len(to_fast)] == to_fast  # the injected text follows
        assert r["n_tokens"] == len(r["token_ids"]) == long.max_new_tokens  # injected tokens count in the budget
        assert r["sampled_mask"][8 : 8 + len(to_fast)] == [False] * len(to_fast)
        assert r["difficulty_trace"] == [(8, 10.0)]  # one switch to fast, then no more checks
    assert [c[0] for c in calls] == [8, 8]  # one check per batch (batches of 3 and 2)


def test_one_switch_per_direction_and_cache_reused(tiny):
    model, tok = tiny
    enc = tok([render_prompt(tok, q, "fast") for _, q in QS[:2]], return_tensors="pt", padding=True,
              add_special_tokens=False)
    script = iter([90.0, 90.0, 10.0, 10.0, 90.0, 90.0] + [10.0] * 20)
    ids = {"fast": _ids(tok, "<F>"), "slow": _ids(tok, "<SLOW>")}
    ctl = KVSwitchController(lambda state, rows: [next(script) for _ in rows], ["fast", "fast"], ids, 5, 30, 70)
    widths, lengths = [], []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)

    def watch(state):
        lengths.append(state.attention_mask.shape[1])
        return ctl(state)

    try:
        res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=40, stop_token_ids=(-1,)),
                     controller=watch)
    finally:
        hook.remove()
    for row in range(2):  # fast -> slow at 5 tokens, slow -> fast at 5 + 5 + len(<SLOW>), then nothing
        first = 5
        second = first + len(ids["slow"]) + 5
        assert res.switches[row] == [(first, "to_slow"), (second, "to_fast")]
        assert [n for n, _ in ctl.trace[row]] == [first, second]
    assert widths[0] == enc.input_ids.shape[1] and widths.count(widths[0]) == 1  # one prefill, never redone
    assert sorted(set(widths[1:])) == sorted({1, 1 + len(ids["slow"]), 1 + len(ids["fast"])})
    assert all(b > a for a, b in zip(lengths, lengths[1:]))  # the cache only grows
    assert res.state.attention_mask.shape[1] == sum(widths)  # every fed position is in the one cache


def _classifier(model, tok, tmp_path):
    recs = _plain(model, tok, tmp_path, "slow", extractors={"prompt_kv": prompt_kv_extractor((4, 8))})
    x = np.stack([features_from_sums(record_array(r, "prompt_kv_sums"), (4, 8), FeatureSpec(8, 2)) for r in recs])
    y = np.array([0, 100, 25, 75, 100], np.float32)
    return train_classifier(x, y, x, y, FeatureSpec(8, 2), TrainConfig(max_epochs=30)), x


def test_classification_routes_on_prefill_difficulty(tiny, tmp_path):
    model, tok = tiny
    clf, x = _classifier(model, tok, tmp_path)
    d0 = initial_difficulty(model, tok, QS, clf, "slow", batch_size=2)
    np.testing.assert_allclose(d0, clf.predict(x), atol=1e-3)  # same as the stored prompt features
    mid = np.sort(d0)[len(d0) // 2 - 1 : len(d0) // 2 + 1]
    assert mid[1] - mid[0] > 1e-2, "the tiny classifier gave tied scores"
    tau = float(mid.mean())  # between two scores: float noise cannot flip a route
    cfg = SwitchConfig.classification(tau, fast_tokens=6)  # fast answers have their own, smaller budget
    recs = adaptive_generate(model, tok, QS, clf, cfg, settings=S, root=tmp_path, batch_size=4, progress=False)
    fast = _plain(model, tok, tmp_path, "fast", settings=GenerationSettings(max_new_tokens=6))
    slow = _plain(model, tok, tmp_path, "slow")
    for r, f, s, d in zip(recs, fast, slow, d0):
        want = s if d > tau else f
        assert r["start_mode"] == ("slow" if d > tau else "fast")
        assert r["token_ids"] == want["token_ids"] and abs(r["d0"] - d) < 1e-3
        assert r["finish_reason"] == want["finish_reason"]
        assert r["decision_prefill_tokens"] == len(_ids(tok, render_prompt(tok, r["question"], "slow")))
    assert {r["start_mode"] for r in recs} == {"fast", "slow"}
    again = adaptive_generate(model, tok, QS, clf, cfg, settings=S, root=tmp_path, batch_size=4,
                              progress=False)  # resumed from the store
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in recs]
    assert [r["start_mode"] for r in again] == [r["start_mode"] for r in recs]


def test_generative_with_a_real_classifier_runs_live(tiny, tmp_path):
    model, tok = tiny
    clf, _ = _classifier(model, tok, tmp_path)
    cfg = SwitchConfig.generative(tau=-1.0, tau_fast=101.0, tau_slow=101.0, check_every=6)  # start slow, exit at 6
    recs = adaptive_generate(model, tok, QS, clf, cfg, settings=S, root=tmp_path, batch_size=5, progress=False)
    assert all(r["start_mode"] == "slow" and [tuple(s) for s in r["switches"]] == [(6, "to_fast")] for r in recs)
    assert all(len(r["difficulty_trace"]) == 1 and 0 <= r["difficulty_trace"][0][1] <= 100 for r in recs)


def test_native_form_injects_the_closing_think_token(tmp_path):
    model, tok = tiny_model("qwen3", seed=0)
    assert protocol_for(tok).form == "native"
    close = tok.convert_tokens_to_ids("</think>")
    cfg = SwitchConfig(start="slow", check_every=4)
    recs = adaptive_generate(model, tok, QS[:2], None, cfg, settings=S, root=tmp_path, batch_size=2,
                             difficulty=lambda state, rows: [0.0] * len(rows), progress=False)
    for r in recs:
        assert r["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        assert [tuple(s) for s in r["switches"]] == [(4, "to_fast")]
        assert close in r["token_ids"][4:8] and close not in r["token_ids"][:4]


def test_config_validation():
    with pytest.raises(ValueError, match="start must be auto, fast or slow, not 'medium'"):
        SwitchConfig(start="medium")
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        SwitchConfig(check_every=0)
    with pytest.raises(ValueError, match="need tau_fast <= tau_slow"):
        SwitchConfig(tau_fast=80, tau_slow=20)
    with pytest.raises(ValueError, match="DifficultyClassifier"):
        adaptive_generate(None, None, QS, None, SwitchConfig.classification())
