"""DEER-style early exit, the token budget and the end-of-thinking guard, on tiny models whose text is scripted.

A forward hook adds a large bias to the logit of a scripted next token, chosen by the last token fed to the
model (a little automaton): the model then writes e.g. ``"Ok Wait\\n"`` over and over, and a trial written
after ``\\boxed`` reads ``{42}</think>`` with probabilities of 1. Trials run through the same model, so the
automaton scripts them too.
"""

import contextlib

import pytest
import torch

from kvlib import tiny_model
from kvlib.switching.kv_switch import KVSwitchController
from kvlib.core.cache import cache_length, kv_layers
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.switching.early_exit import (BudgetConfig, BudgetController, EarlyExitConfig, EarlyExitController,
                                        budget_generate, early_exit_generate, trial_confidence)
from kvlib.runs.generation import GenerationSettings
from kvlib.switching.thinking import ThinkingWatch, protocol_for, render_prompt

QS = [("q0", "What is 1 + 1?"), ("q1", "What is 2 + 3? Think.")]


@contextlib.contextmanager
def scripted(model, tok, cycle: str, then: dict[str, str] | None = None, rows=None):
    """Make ``rows`` (cache rows; all if None) write ``cycle`` in a loop after the prompt's final newline.

    ``then`` maps a token's text to the text of the token forced after it (``"</think>"`` allowed).
    """
    ids = lambda text: [tok.convert_tokens_to_ids(text)] if text in ("</think>", "<think>") else \
        tok(text, add_special_tokens=False).input_ids  # noqa: E731
    c = ids(cycle)
    nxt = dict(zip(c, c[1:] + c[:1]))
    for a, b in (then or {}).items():
        nxt[ids(a)[0]] = ids(b)[0]

    def hook(module, args, kwargs, out):
        for r, t in enumerate(kwargs["input_ids"][:, -1].tolist()):
            if (rows is None or r in rows) and t in nxt:
                out.logits[r, -1, nxt[t]] += 1e4
        return out

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield handle
    finally:
        handle.remove()


CONFIDENT = {"d": "{", "{": "4", "4": "2", "2": "}", "}": "</think>"}  # after "\boxed": "{42}</think>"
UNCLOSED = {"d": "{", "{": "4", "4": "2", "2": "}", "}": "x", "x": "x"}  # "{42}xxxx...": never closes


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3", seed=0)


def _batch(tok, n=2):
    texts = [render_prompt(tok, q, "slow") for _, q in QS[:n]]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def _run(model, tok, controller=None, n=40):
    enc = _batch(tok)
    return decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=n, stop_token_ids=(-1,)),
                  controller=controller)


def _deer(tok, config=EarlyExitConfig(), n=40):
    return EarlyExitController(tok, protocol_for(tok), config, 2, {-1}, n)


def test_trial_confidence_policies_on_hand_made_probabilities():
    p = [0.1, 0.9, 0.8, 1.0]  # the first token (usually "{") is never read
    assert trial_confidence(p, "avg2") == pytest.approx((0.9 * 0.8 * 1.0) ** (1 / 3))
    assert trial_confidence(p, "avg1") == pytest.approx(0.9)
    assert trial_confidence(p, "min") == pytest.approx(0.8)
    assert trial_confidence([0.2, 0.0], "avg2") == pytest.approx(1e-10)  # floored, as DEER does
    assert trial_confidence([0.99], "avg2") == 0.0  # nothing after the first token
    with pytest.raises(ValueError, match="policy"):
        trial_confidence(p, "median")


def test_config_validation():
    assert EarlyExitConfig(words="Alternatively").words == ("Alternatively",)
    for bad, message in ((dict(threshold=0), r"threshold must be in \(0, 1\]"),
                         (dict(words=()), "words must be non-empty strings"),
                         (dict(words=("",)), "words must be non-empty strings"),
                         (dict(trial_tokens=1), "trial_tokens must be >= 2"),
                         (dict(policy="max"), "policy must be 'avg2', 'avg1' or 'min', not 'max'"),
                         (dict(max_trials=-1), "need max_trials >= 0 and min_gap >= 1"),
                         (dict(think_ratio=0), r"think_ratio must be in \(0, 1\]"),
                         (dict(min_gap=0), "need max_trials >= 0 and min_gap >= 1"),
                         (dict(answer_inducing=""), "answer_inducing must be a non-empty text")):
        with pytest.raises(ValueError, match=message):
            EarlyExitConfig(**bad)
    with pytest.raises(ValueError, match="budget and answer_tokens must be >= 1"):
        BudgetConfig(budget=8, answer_tokens=0)


def test_a_confident_trial_at_wait_ends_the_thinking_before_the_word(qwen3):
    model, tok = qwen3
    inducing = len(_ids(tok, EarlyExitConfig().answer_inducing))
    ctl = _deer(tok, EarlyExitConfig(think_ratio=1.0))
    with scripted(model, tok, "\nOk Wait", CONFIDENT, rows={0}):
        res = _run(model, tok, ctl)
    with scripted(model, tok, "\nOk Wait", CONFIDENT, rows={0}):
        plain = _run(model, tok)
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    # "Wait" completes at the 7th token; the trial sits before it (3 tokens "Ok "); "Wait" is withdrawn
    assert ctl.trials[0] == [(3, pytest.approx(1.0), inducing + 5)]  # "{42}</think>" is 5 tokens
    assert res.switches[0] == [(3, "early_exit")] and res.state.withdrawn[0] == 4
    assert res.tokens[0][:3] == plain.tokens[0][:3] and res.tokens[0][3 : 3 + len(to_fast)] == to_fast
    assert tok.decode(res.tokens[0]).startswith("Ok \n</think>\n\nOk Wait")  # no trial after the exit
    assert len(res.tokens[0]) == 40 and len(res.max_prob[0]) == res.sampled_mask[0].count(True)
    assert res.tokens[1] == plain.tokens[1] and res.switches[1] == []  # the other row never stopped at "Wait"
    arrays = ctl.arrays(0)
    assert arrays["trial_tokens"].tolist() == [inducing + 5] and arrays["withdrawn_tokens"].tolist() == [4]


def test_the_exit_equals_decoding_the_cut_thinking_afresh(qwen3):
    """Withdrawing the word and injecting the exit text continues exactly as a fresh decode of that text."""
    model, tok = qwen3
    ctl = _deer(tok, EarlyExitConfig(think_ratio=1.0))
    with scripted(model, tok, "\nOk Wait", CONFIDENT, rows={0}) as hook:
        def unscript_after_exit(state):  # the answer is the free model's: it depends on the context
            out = ctl(state)
            if out:
                hook.remove()
            return out

        res = _run(model, tok, unscript_after_exit)
    cut = res.tokens[0][: 3 + len(_ids(tok, protocol_for(tok).to_fast))]
    assert res.switches[0] == [(3, "early_exit")] and tok.decode(cut) == "Ok \n</think>\n\n"
    enc = _batch(tok)
    ids = torch.cat([enc.input_ids[0][enc.attention_mask[0].bool()], torch.tensor(cut)])[None]
    fresh = decode(model, ids, torch.ones_like(ids), DecodeConfig(max_new_tokens=40 - len(cut), stop_token_ids=(-1,)))
    assert res.tokens[0][len(cut):] == fresh.tokens[0]
    assert torch.allclose(torch.tensor(res.max_prob[0][3:]), torch.tensor(fresh.max_prob[0]), atol=1e-5)
    assert torch.allclose(torch.tensor(res.entropy[0][3:]), torch.tensor(fresh.entropy[0]), atol=1e-4)


def test_a_trial_sees_the_thinking_cut_before_the_word(qwen3):
    """The batched trial on the live cache (word masked, positions rewound) equals a fresh greedy decode of
    prompt + thinking before the word + the answer-inducing text."""
    model, tok = qwen3
    cfg = EarlyExitConfig(require_close=False, policy="avg1", trial_tokens=12, threshold=1.0, think_ratio=1.0)
    ctl = _deer(tok, cfg)
    with scripted(model, tok, "\nOk Wait", rows={0}):  # the trial after "\boxed" is the free model's
        res = _run(model, tok, ctl, n=16)
        enc = _batch(tok)
        for before, conf, spent in ctl.trials[0]:
            thinking = res.tokens[0][: int(before)]
            ids = torch.cat([enc.input_ids[0][enc.attention_mask[0].bool()],
                             torch.tensor(thinking + _ids(tok, cfg.answer_inducing))])[None]
            fresh = decode(model, ids, torch.ones_like(ids), DecodeConfig(max_new_tokens=12, stop_token_ids=(-1,)))
            assert spent == len(_ids(tok, cfg.answer_inducing)) + 12
            assert conf == pytest.approx(sum(fresh.max_prob[0][1:]) / 11, abs=1e-5)
    assert [t[0] for t in ctl.trials[0]] == [3, 11]


@pytest.mark.dynamic_cache
def test_rejected_trials_leave_tokens_and_cache_exactly_as_without_them(qwen3):
    """Trials that never succeed: token for token (and cache entry for cache entry) the run without trials."""
    model, tok = qwen3
    ctl = _deer(tok, EarlyExitConfig(think_ratio=1.0), n=48)
    with scripted(model, tok, "\nOk Wait", UNCLOSED):
        res = _run(model, tok, ctl, n=48)
        plain = _run(model, tok, n=48)
    assert res.tokens == plain.tokens and res.switches == [[], []] and res.state.slots == plain.state.slots
    assert res.max_prob == plain.max_prob
    assert all(torch.equal(a, b) for pair in zip(kv_layers(res.state.cache), kv_layers(plain.state.cache))
               for a, b in zip(*pair))
    assert torch.equal(res.state.attention_mask, plain.state.attention_mask)
    for row in range(2):  # a trial before every "Wait" (one per 8 tokens), each scoring 0: no </think>
        assert [t[0] for t in ctl.trials[row]] == [3, 11, 19, 27, 35, 43]
        assert all(c == 0.0 and n == len(_ids(tok, EarlyExitConfig().answer_inducing)) + 20
                   for _, c, n in ctl.trials[row])


def test_trials_stop_after_max_trials_and_the_cap_forces_the_answer(qwen3):
    model, tok = qwen3
    ctl = _deer(tok, EarlyExitConfig(max_trials=3, think_ratio=0.75), n=48)
    with scripted(model, tok, "\nOk Wait", UNCLOSED):
        res = _run(model, tok, ctl, n=48)
        plain = _run(model, tok, n=48)
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    for row in range(2):
        assert [t[0] for t in ctl.trials[row]] == [3, 11, 19]
        assert res.switches[row] == [(36, "think_cap")]  # 0.75 x 48
        assert res.tokens[row][:36] == plain.tokens[row][:36] and res.tokens[row][36 : 36 + len(to_fast)] == to_fast


def test_the_native_trial_scores_zero_unless_it_closes_the_thinking(qwen3):
    model, tok = qwen3
    for require, want in ((None, 0.0), (False, 1.0)):  # None: the native form requires it (DEER's Qwen3 variant)
        ctl = _deer(tok, EarlyExitConfig(require_close=require, think_ratio=1.0))
        with scripted(model, tok, "\nOk Wait", UNCLOSED, rows={0}):
            res = _run(model, tok, ctl)
        assert ctl.trials[0][0][1] == pytest.approx(want)
        assert res.switches[0] == ([] if want == 0 else [(3, "early_exit")])


def test_several_transition_words_and_min_gap(qwen3):
    """Any listed word triggers a trial (DEER's option: "Alternatively"); min_gap spaces them."""
    model, tok = qwen3
    found = {}
    for gap in (1, 4):
        ctl = _deer(tok, EarlyExitConfig(words=("Wait", "Hm"), min_gap=gap, think_ratio=1.0))
        with scripted(model, tok, "\nHm Wait", UNCLOSED, rows={0}):  # "Hm" ends at 2 tokens, "Wait" at 7, ...
            _run(model, tok, ctl, n=40)
        found[gap] = [t[0] for t in ctl.trials[0]]
    assert found[1] == [0, 3, 8, 11, 16, 19, 24, 27, 32, 35]  # both words; 10 = max_trials
    assert found[4] == [3, 11, 19, 27, 35]  # each "Hm" comes 3 tokens after the last trial: skipped


def test_controller_restores_the_cache_after_every_trial(qwen3):
    model, tok = qwen3
    ctl = _deer(tok, EarlyExitConfig(think_ratio=1.0))
    seen = []

    def watch(state):
        n = cache_length(state.cache)
        out = ctl(state)
        seen.append((n, cache_length(state.cache), state.attention_mask.shape[1]))
        return out

    with scripted(model, tok, "\nOk Wait", UNCLOSED):
        _run(model, tok, watch, n=24)
    assert sum(len(t) for t in ctl.trials) == 6 and all(a == b == c for a, b, c in seen)


CLOSES = "\nOk </think>"  # the model ends its thinking itself with its 4th token, then keeps writing


def test_no_controller_injects_after_the_model_closed_its_thinking(qwen3):
    """Row 0's model writes </think> as its 4th token; row 1's never does. Only row 1 ever gets text."""
    model, tok = qwen3
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    watch = lambda: ThinkingWatch(tok, protocol_for(tok), [True, True])  # noqa: E731
    controllers = {
        "deer": _deer(tok, EarlyExitConfig(words=("Ok",), think_ratio=0.5)),
        "budget": BudgetController(to_fast, 8, 2, watch()),
        "kv": KVSwitchController(lambda state, rows: [0.0] * len(rows), ["slow", "slow"], {"fast": to_fast},
                                 6, 30.0, 70.0, watch=watch()),
    }
    for name, ctl in controllers.items():
        with scripted(model, tok, CLOSES, rows={0}), scripted(model, tok, "\nOk Wait", rows={1}):
            res = _run(model, tok, ctl)
            plain = _run(model, tok)
        close = tok.convert_tokens_to_ids("</think>")
        assert res.tokens[0].index(close) == 3
        assert res.switches[0] == [] and res.tokens[0] == plain.tokens[0], name
        assert len(res.switches[1]) == 1, name  # the guard is per row
    assert controllers["budget"].arrays(0)["thinking_tokens"].tolist() == [4]
    assert controllers["budget"].arrays(1)["thinking_tokens"].tolist() == [8]
    deer = controllers["deer"]
    assert [t[0] for t in deer.trials[0]] == [0]  # the "Ok" before </think> got a trial, the later ones none
    assert [t[0] for t in deer.trials[1]] == [0, 8, 16]  # row 1: every "Ok" until the cap at 20
    assert controllers["kv"].trace[0] == [] and controllers["kv"].trace[1] == [(6, 0.0)]


def test_a_spelled_out_closing_tag_is_not_the_closing_token(qwen3):
    _, tok = qwen3
    from types import SimpleNamespace

    w = ThinkingWatch(tok, protocol_for(tok), [True, True])
    spelled, real = _ids(tok, "so </think"), _ids(tok, "so ") + [tok.convert_tokens_to_ids("</think>")]
    spelled += _ids(tok, ">")
    for k in range(1, max(len(spelled), len(real)) + 1):
        w.update(SimpleNamespace(tokens=[spelled[:k], real[:k]], done=[False, False], step=k))
    assert w.closed == [False, True] and w.closed_at == [None, len(real)]


def test_early_exit_generate_end_to_end_with_records(qwen3, tmp_path):
    model, tok = qwen3
    settings = GenerationSettings(max_new_tokens=40)
    with scripted(model, tok, "\nOk Wait", CONFIDENT):
        recs = early_exit_generate(model, tok, QS, EarlyExitConfig(), settings=settings, root=tmp_path,
                                   batch_size=2, progress=False)
    inducing = len(_ids(tok, EarlyExitConfig().answer_inducing))
    for r in recs:
        assert [tuple(s) for s in r["switches"]] == [(3, "early_exit")]
        assert r["trial_tokens"] == inducing + 5 and r["withdrawn_tokens"] == 4
        assert len(r["early_exit_trials"]) == 1 and r["n_tokens"] == len(r["token_ids"]) == 40
        assert r["output"].startswith("Ok \n\n\nOk Wait")  # "</think>" is a special token: not in the text


def test_prompt_form_trial_stops_when_the_box_closes():
    model, tok = tiny_model("qwen2", seed=4)
    assert protocol_for(tok).form == "prompt"
    enc = tok([render_prompt(tok, q, "slow") for _, q in QS], return_tensors="pt", padding=True,
              add_special_tokens=False)
    ctl = EarlyExitController(tok, protocol_for(tok), EarlyExitConfig(think_ratio=1.0), 2, {-1}, 40)
    prompt_end = tok.decode(enc.input_ids[0, -1:])
    with scripted(model, tok, prompt_end + "Ok Wait", UNCLOSED):
        res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=40, stop_token_ids=(-1,)),
                     controller=ctl)
    inducing = len(_ids(tok, EarlyExitConfig().answer_inducing))
    assert ctl.trials[0][0] == (3, pytest.approx(1.0), inducing + 4)  # "{42}": stopped at the brace, confident
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    assert res.switches[0] == [(3, "early_exit")] and res.tokens[0][3 : 3 + len(to_fast)] == to_fast


def test_budget_forces_the_answer_and_leaves_it_room(qwen3, tmp_path):
    model, tok = qwen3
    to_fast = _ids(tok, protocol_for(tok).to_fast)
    settings = GenerationSettings(max_new_tokens=12)  # replaced: the budget run sizes itself
    with scripted(model, tok, "\nOk Wait"):
        recs = budget_generate(model, tok, QS, budget=6, answer_tokens=20, settings=settings, root=tmp_path / "a",
                               batch_size=2, progress=False)
    for r in recs:
        assert [tuple(s) for s in r["switches"]] == [(6, "budget_6")] and r["forced"]
        assert r["token_ids"][6 : 6 + len(to_fast)] == to_fast
        # the scripted model never stops: it uses all of its answer room, and every token is counted
        assert r["n_tokens"] == len(r["token_ids"]) == 6 + len(to_fast) + 20 and r["thinking_tokens"] == 6
    assert BudgetConfig(budget=6).answer_tokens >= 32
    with scripted(model, tok, CLOSES):
        own = budget_generate(model, tok, QS, budget=6, answer_tokens=20, settings=settings, root=tmp_path / "b",
                              batch_size=2, progress=False)
    for r in own:  # the thinking closed at 4 tokens: nothing is forced, the answer keeps the whole room
        assert r["switches"] == [] and not r["forced"] and r["thinking_tokens"] == 4
        assert r["n_tokens"] == 6 + len(to_fast) + 20


def test_adaptive_generate_never_switches_a_row_that_closed_its_thinking(qwen3, tmp_path):
    from kvlib.switching.kv_switch import SwitchConfig, adaptive_generate

    model, tok = qwen3
    cfg = SwitchConfig(start="slow", check_every=6)  # a scripted difficulty of 0 asks for fast at every check
    easy = lambda state, rows: [0.0] * len(rows)  # noqa: E731
    for script, root in ((CLOSES, tmp_path / "closes"), ("\nOk Wait", tmp_path / "thinks")):
        with scripted(model, tok, script):
            recs = adaptive_generate(model, tok, QS, None, cfg, settings=GenerationSettings(max_new_tokens=20),
                                     root=root, batch_size=2, difficulty=easy, progress=False)
        want = [] if script == CLOSES else [(6, "to_fast")]
        assert all([tuple(s) for s in r["switches"]] == want for r in recs), script
        assert all(r["difficulty_trace"] == ([] if script == CLOSES else [(6, 0.0)]) for r in recs)
