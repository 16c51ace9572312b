"""The one runner of the controlled methods: the three ``*_generate`` wrappers are thin calls into it."""

import json
from dataclasses import replace

import numpy as np
import pytest

from kvlib import tiny_model
from kvlib.runs.generation import GenerationSettings, record_array
from kvlib.switching.early_exit import (BudgetConfig, EarlyExitConfig, budget_generate, budget_settings, budget_spec,
                                        early_exit_generate, early_exit_spec, slow_prompts)
from kvlib.switching.kv_switch import (RunContext, SwitchConfig, adaptive_generate, controlled_generate, method_store,
                                       switch_start)

QS = [(f"q{i}", f"What is {i} + {3 * i}?" + " Think." * (i % 3)) for i in range(4)]
S = GenerationSettings(max_new_tokens=16)
TIMING = ("seconds", "extract_seconds")


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3", seed=0)


def falling(state, rows):
    """A scripted difficulty, ``45 - 5 * tokens + (prompt tokens % 5)``, below 30 from 4 tokens on: a slow row
    switches to fast at its first check; the value tells which item it was read for."""
    return [45.0 - 5 * len(state.tokens[i]) + state.prompt_lengths[i] % 5 for i in rows]


def _plain(record: dict) -> str:
    """A stored record without its timings, its arrays read out, as JSON (so that NaN equals NaN)."""
    out = {k: v for k, v in record.items() if k not in TIMING and k != "arrays"}
    out["arrays"] = {k: record_array(record, k).tolist() for k in record.get("arrays", {})}
    return json.dumps(out, sort_keys=True)


def _assert_same(wrapped: list[dict], direct: list[dict]) -> None:
    assert [r["item_id"] for r in wrapped] == [q for q, _ in QS]
    for w, d in zip(wrapped, direct):
        assert _plain({k: v for k, v in w.items() if k in d}) == _plain(d)


def _stores(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl"))


def test_the_three_wrappers_are_the_one_runner(qwen3, tmp_path):
    model, tok = qwen3
    wrap, one = tmp_path / "wrappers", tmp_path / "runner"
    kw = dict(settings=S, batch_size=3, progress=False)
    run = RunContext(settings=S, root=one, batch_size=3, progress=False)
    protocol = run.thinking(tok)

    cfg = SwitchConfig(start="slow", check_every=4)
    wrapped = adaptive_generate(model, tok, QS, None, cfg, difficulty=falling, root=wrap, **kw)
    start = switch_start(model, tok, QS, None, cfg, run, difficulty=falling)
    _assert_same(wrapped, controlled_generate(model, tok, start.prompts, start.spec, run))
    assert any(r["switches"] for r in wrapped) and all(r["difficulty_trace"] for r in wrapped)

    ee = EarlyExitConfig(think_ratio=0.5)
    wrapped = early_exit_generate(model, tok, QS, ee, root=wrap, **kw)
    direct = controlled_generate(model, tok, slow_prompts(tok, QS, protocol),
                                 early_exit_spec(model, tok, ee, protocol, S), run)
    _assert_same(wrapped, direct)
    assert any(label == "think_cap" for r in wrapped for _, label in r["switches"])

    budget = BudgetConfig(5, answer_tokens=6)
    wrapped = budget_generate(model, tok, QS, 5, answer_tokens=6, root=wrap, **kw)
    direct = controlled_generate(model, tok, slow_prompts(tok, QS, protocol), budget_spec(tok, budget, protocol),
                                 replace(run, settings=budget_settings(tok, budget, protocol, S)))
    _assert_same(wrapped, direct)
    assert any(r["forced"] for r in wrapped)

    assert _stores(wrap) == _stores(one) and len(_stores(wrap)) == 3  # the same store identities


def test_records_carry_the_arrays_their_controllers_hand_over(qwen3, tmp_path):
    model, tok = qwen3
    run = RunContext(settings=S, root=tmp_path, batch_size=2, progress=False)
    start = switch_start(model, tok, QS, None, SwitchConfig(start="slow", check_every=4), run, difficulty=falling)
    records = controlled_generate(model, tok, start.prompts, start.spec, run)
    assert sum(rec["n_tokens"] > 4 for rec in records) >= 2
    offset = {rec["item_id"]: len(tok(rec["prompt"], add_special_tokens=False).input_ids) % 5 for rec in records}
    assert len(set(offset.values())) > 1  # the items' traces differ
    for rec in records:  # the spec's arrays known before decoding, and the controller's trace of this very row
        assert np.isnan(record_array(rec, "d0")[0]) and record_array(rec, "decision_prefill_tokens")[0] == 0
        trace = record_array(rec, "difficulty_trace")
        if rec["n_tokens"] > 4:  # one check, at 4 tokens, and the switch it made
            assert trace.tolist() == [[4.0, 25.0 + offset[rec["item_id"]]]]
            assert [tuple(s) for s in rec["switches"]] == [(4, "to_fast")]


def test_the_store_identity_of_controlled_runs_is_kept(qwen3, tmp_path):
    """The trace extractor's identity is hashed into every stored controlled run: changing it orphans them."""
    model, tok = qwen3
    run = RunContext(settings=S, root=tmp_path)
    protocol = run.thinking(tok)
    store = method_store(model, tok, budget_spec(tok, BudgetConfig(5), protocol), run, readonly=True)
    assert store.settings["extractors"] == {"trace": {
        "function": "kvlib.switching.kv_switch.trace_extractor.<locals>.extract", "params": {"holder": "<dict>"}}}
    assert store.settings["method"] == "budget" and store.kind == "adaptive"
