"""Baselines (DEER-style early exit, budgets, routing) and the switching experiment end to end on a tiny model."""

import logging
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from kvlib import tiny_model
from kvlib.core.cache import cache_length, crop_cache, kv_layers
from kvlib.assets.data import MathItem
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.switching.difficulty import prompt_kv_extractor, question_key, split_by_question
from kvlib.switching.early_exit import BudgetConfig, EarlyExitConfig, early_exit_generate
from kvlib.experiments.budget_sweep import budget_grid, table4_markdown
from kvlib.experiments.labels import Method
from kvlib.experiments.budget_curve import curve_methods
from kvlib.experiments.switching import (SwitchingPlan, best_spec, classifier_table, evaluate_methods,
                                         evaluate_switching, fit_classifiers, headline, label_frame, method_row,
                                         pareto_figure, route, table3_markdown)
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store
from kvlib.switching.thinking import protocol_for, render_prompt

QS = [(f"q{i}", f"What is {i} + {3 * i}?" + " Think." * (i % 3)) for i in range(4)]
S = GenerationSettings(max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=4)


def _slow(model, tok, root):
    prompts = [Prompt(i, render_prompt(tok, q, "slow")) for i, q in QS]
    return generate(model, tok, prompts, open_store(root, "m", "slow", S), S, batch_size=3, progress=False)


def test_crop_cache_rolls_back(tiny):
    model, tok = tiny
    enc = tok(["abc", "abcdef"], return_tensors="pt", padding=True, add_special_tokens=False)
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=4))
    cache = res.state.cache
    before = [k.clone() for k, _ in kv_layers(cache)]
    n = cache_length(cache)
    crop_cache(cache, n - 2)
    assert cache_length(cache) == n - 2
    assert all(torch.equal(k, b[:, :, : n - 2]) for (k, _), b in zip(kv_layers(cache), before))
    with pytest.raises(ValueError, match=f"cannot crop a cache of {n - 2} positions to {n}"):
        crop_cache(cache, n)


def test_early_exit_that_never_fires_changes_nothing(tiny, tmp_path):
    """Trials that never succeed leave the decoded sequence untouched: the transition word is the model's own
    and stays where it is, and nothing is inserted. With the thinking cap off the DEER run IS plain greedy
    decoding token for token; with the cap on, it is plain greedy decoding up to the cap, where the answer
    is forced."""
    model, tok = tiny
    plain = _slow(model, tok, tmp_path)
    chars = Counter(c for r in plain for c in tok.decode(r["token_ids"]) if c.strip())
    word = chars.most_common(1)[0][0]  # a "transition word" this random model writes often
    never = EarlyExitConfig(threshold=1.0, words=(word,), think_ratio=1.0)
    recs = early_exit_generate(model, tok, QS, never, settings=S, root=tmp_path, batch_size=3, progress=False)
    assert [r["token_ids"] for r in recs] == [r["token_ids"] for r in plain]
    assert all(r["switches"] == [] and r["withdrawn_tokens"] == 0 for r in recs)
    for r in recs:  # one trial before every occurrence of the word (one token per character here)
        at = [k for k, t in enumerate(r["token_ids"]) if tok.decode([t]) == word][: never.max_trials]
        assert [int(t[0]) for t in r["early_exit_trials"]] == at
        assert r["trial_tokens"] == sum(int(t[2]) for t in r["early_exit_trials"])
    assert sum(len(r["early_exit_trials"]) for r in recs) >= 3, "the test needs trials"
    capped = early_exit_generate(model, tok, QS, EarlyExitConfig(threshold=1.0, words=(word,)), settings=S,
                                 root=tmp_path, batch_size=3, progress=False)
    cap = int(0.9 * S.max_new_tokens)
    to_fast = tok(protocol_for(tok).to_fast, add_special_tokens=False).input_ids
    for r, p in zip(capped, plain):
        assert r["token_ids"][:cap] == p["token_ids"][:cap]
        if p["n_tokens"] > cap:
            assert [tuple(s) for s in r["switches"]] == [(cap, "think_cap")]
            assert r["token_ids"][cap:] == to_fast[: S.max_new_tokens - cap]


def _records(n, correct, tokens):
    return [{"item_id": f"i{k}", "correct": c, "n_tokens": t} for k, c, t in zip(range(n), correct, tokens)]


def test_routing_rows():
    fast = _records(4, [True, False, False, True], [5, 5, 5, 5])
    slow = _records(4, [True, True, False, False], [100, 80, 120, 100])
    c, t = route(fast, slow, np.array([0, 1, 1, 0]))
    assert c.tolist() == [True, True, False, True] and t.tolist() == [5, 80, 120, 5]
    row = method_row("x", "set", c, t, slow_tokens=100.0)
    assert row["accuracy"] == 0.75 and row["mean_tokens"] == 52.5 and row["token_change_vs_slow_pct"] == -47.5


def _items(prefix, n, seed):
    rng = np.random.default_rng(seed)
    return [MathItem(f"{prefix}/{k}", f"Tom has {a} apples and gets {b} more. How many apples?", str(a + b), "svamp")
            for k, (a, b) in enumerate(rng.integers(1, 50, size=(n, 2)))]


def _pairs(model, tok, items_by_set, root, plan):
    """Fast/slow records with prompt KV sums and a scripted grade (stands in for
    kvlib.switching.answers.answer_records)."""
    ex = {"prompt_kv": prompt_kv_extractor((4, 8), keep_layers=3)}
    out = {}
    for name, items in items_by_set.items():
        pair = []
        for mode, budget in (("fast", plan.fast_tokens), ("slow", plan.slow_tokens)):
            settings = GenerationSettings(max_new_tokens=budget)
            prompts = [Prompt(it.id, render_prompt(tok, it.question, mode)) for it in items]
            recs = generate(model, tok, prompts, open_store(root, "m", f"{name}-{mode}", settings, ex), settings,
                            batch_size=8, extractors=ex, progress=False)
            pair.append([{**r, "question": it.question, "correct": (k % (2 if mode == "fast" else 3)) != 0}
                         for k, (r, it) in enumerate(zip(recs, items))])
        out[name] = tuple(pair)
    return out


def _refit_reuses_the_stored_fits(clfs, frame, recs, plan, test_frame, tok, folder):
    """A second fit on the same inputs (notebook 05 after 04) reads the stored classifiers instead of training,
    the same weights and info; a damaged file is fitted again, never trusted; other inputs are another fit."""
    import kvlib.experiments.switching as sw

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the same fit is stored")

    args = (frame, recs, plan)
    kw = dict(exclude_questions=test_frame["question"].tolist(), tokenizer=tok, reuse=folder)
    orig, sw.train_classifier = sw.train_classifier, no_training
    try:
        again = fit_classifiers(*args, **kw)
    finally:
        sw.train_classifier = orig
    for key, clf in clfs.items():
        assert again[key].fingerprint() == clf.fingerprint() and again[key].info == clf.info
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == len(clfs)
    files[0].write_bytes(b"damaged")
    refit = fit_classifiers(*args, **kw)
    assert {k: c.fingerprint() for k, c in refit.items()} == {k: c.fingerprint() for k, c in clfs.items()}
    other = fit_classifiers(frame.assign(label=frame["label"][::-1].to_numpy()), recs, plan, **kw)
    assert len(list(folder.glob("*.safetensors"))) == 2 * len(clfs) and set(other) == set(clfs)


def test_experiment_end_to_end_on_a_tiny_model(tiny, tmp_path):
    model, tok = tiny
    train = {"svamp": _items("svamp/train", 24, 0)}
    test = {"svamp": _items("svamp/test", 4, 1) + [train["svamp"][0]]}  # one test question also in training
    plan = SwitchingPlan(train_sets={"svamp": 24}, test_sets={"svamp": 5}, fast_tokens=4, slow_tokens=12,
                         batch_size=8, grid=((4, 3), (8, 1)), budgets=(3,), check_every=4,
                         generative_sweep=((50.0, 30.0, 70.0),), random_seeds=20,
                         early_exit=EarlyExitConfig(min_gap=4, trial_tokens=2))
    frame, recs = label_frame(_pairs(model, tok, train, tmp_path, plan))
    test_pairs = _pairs(model, tok, test, tmp_path, plan)
    test_frame, _ = label_frame(test_pairs)
    assert set(frame["label"]) <= {0, 25, 75, 100}
    clfs = fit_classifiers(frame, recs, plan, exclude_questions=test_frame["question"].tolist(), tokenizer=tok,
                           reuse=tmp_path / "fits")
    assert set(clfs) == {(4, 3), (8, 1)}
    _refit_reuses_the_stored_fits(clfs, frame, recs, plan, test_frame, tok, tmp_path / "fits")
    ctab = classifier_table(clfs)  # each KV classifier beside the two baselines on its own validation split
    assert ctab["constant val_rmse"].nunique() == 1 and ctab["prompt-length val_rmse"].nunique() == 1
    assert np.isfinite(ctab[["val_rmse", "constant val_rmse", "prompt-length val_rmse"]].to_numpy()).all()
    split = split_by_question(frame["question"].tolist(), {"train": 0.8, "val": 0.2}, seed=plan.seed,
                              exclude=test_frame["question"].tolist())
    y = frame["label"].to_numpy(float)
    assert ctab["constant val_rmse"].iloc[0] == pytest.approx(
        np.sqrt(np.mean((y[split["val"]] - y[split["train"]].mean()) ** 2)), rel=1e-6)
    assert clfs[(4, 3)].info["prompt_length_unit"] == "tokens"
    clf = clfs[best_spec(clfs)]
    used = clf.info["train_rows"] + clf.info["val_rows"]
    leaked = train["svamp"][0].question
    assert used == len(frame) - sum(question_key(q) == question_key(leaked) for q in frame["question"])
    res = evaluate_switching(model, tok, "m", test, test_pairs, clf, plan, root=tmp_path, progress=False)
    table, points = res.table, res.points
    live, live_points = evaluate_methods(model, tok, "m", test, test_pairs, clf, plan.with_sizes(replay=False),
                                         root=tmp_path / "live", progress=False)
    pd.testing.assert_frame_equal(table, live)  # replaying the stored answers changes no number
    pd.testing.assert_frame_equal(points, live_points)
    methods = set(table["method"])
    deer = table[table["method"].map(Method.is_deer)]
    assert len(deer) == 1 and deer["method"].iloc[0] == Method.deer(deer["trial_tokens"].iloc[0])  # named for what ran
    order = [m for m in Method.TABLE3_ORDER if not Method.is_deer(m)]
    assert {*order, Method.budget(3)} <= methods
    by = table.set_index("method")
    # the budget curve: 5 levels from the fast to the slow mean tokens, token means rising with the budget
    levels = table[table["method"].map(lambda m: Method.curve_index(m) is not None)].sort_values("budget")
    assert list(levels["method"]) == [Method.curve_level(k) for k in range(1, 6)]
    assert levels["budget"].iloc[0] == round(by.loc[Method.FAST, "mean_tokens"])
    assert levels["budget"].iloc[-1] == round(by.loc[Method.SLOW, "mean_tokens"])
    assert levels["mean_tokens"].is_monotonic_increasing
    assert len(points[points["method"] == Method.BUDGET_CURVE]) == 5 + 2  # fast, the levels, slow
    # per-item outcomes match the table, and the difference to the curve is in the table for every other method
    means = res.items.groupby("method")["correct"].mean()
    assert np.allclose(means[table["method"]].to_numpy(), table["accuracy"].to_numpy())
    others = set(methods) - set(curve_methods(list(methods)))
    assert set(res.vs_budget["method"]) == others
    assert (table.set_index("method").loc[list(others), "vs_curve"].to_numpy()
            == res.vs_budget.set_index("method").loc[list(others), "difference"].to_numpy()).all()
    assert {"vs_curve", "vs_curve_lo", "vs_curve_hi"} <= set(table.columns)
    offline = evaluate_switching(model, tok, "m", test, test_pairs, clf, plan.with_sizes(live_sets=("gsm8k",)),
                                 root=tmp_path, progress=False)  # svamp not listed: the curve only runs live there
    assert Method.KV_GENERATIVE not in set(offline.table["method"]) and not offline.table["method"].map(
        Method.is_deer).any()
    assert set(offline.vs_budget["method"]) == {Method.KV_CLASSIFICATION, Method.RANDOM, Method.ORACLE}
    fast_row = by.loc[Method.FAST]
    assert fast_row["cap"] == plan.fast_tokens and fast_row["at_cap_share"] == np.mean(
        [r["n_tokens"] >= plan.fast_tokens for r in test_pairs["svamp"][0]])
    fast, slow = test_pairs["svamp"]
    assert by.loc[Method.SLOW, "mean_tokens"] == np.mean([r["n_tokens"] for r in slow])
    assert by.loc[Method.ORACLE, "accuracy"] >= max(by.loc[Method.FAST, "accuracy"], by.loc[Method.SLOW, "accuracy"])
    to_fast = tok(protocol_for(tok).to_fast, add_special_tokens=False).input_ids
    assert by.loc[Method.budget(3), "mean_tokens"] <= 3 + len(to_fast) + BudgetConfig(3).answer_tokens  # room to answer
    assert {Method.KV_CLASSIFICATION, Method.KV_GENERATIVE, Method.TOKEN_BUDGET} <= set(points["method"])
    md = table3_markdown(table, "caption")
    first = md.split("\n\n")[1]
    rows = [line.split("|")[1].strip() for line in first.splitlines() if line.startswith("|")][2:]
    expected = [m for m in Method.TABLE3_ORDER if m in methods]
    assert rows == [*expected, Method.budget(3), *[Method.curve_level(k) for k in range(1, 6)]]  # budgets last
    assert "SVAMP" in md and "budget curve" in md
    grid = budget_grid(model, tok, "m", test, test_pairs, clfs, plan, root=tmp_path, progress=False)
    assert len(grid) == 2 * 2 and "2L" not in table4_markdown(grid, "c") and "3L x 4" in table4_markdown(grid, "c")
    only_class = budget_grid(model, tok, "m", test, test_pairs, clfs, plan.with_sizes(grid_live_sets=("gsm8k",)),
                             root=tmp_path, progress=False)  # svamp not listed: no live KV-Generative rows
    assert list(only_class["method"]) == [Method.KV_CLASSIFICATION] * 2
    fig = pareto_figure(points)
    assert len(fig.axes) == 1
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert Method.BUDGET_CURVE in legend and deer["method"].iloc[0] in legend
    head = headline(table)
    assert deer["method"].iloc[0] in set(head["method"]) and "vs budget curve (points)" in head


def test_the_setup_of_notebooks_04_and_05_and_their_captions(tiny, tmp_path, caplog):
    """switching_setup: the smoke plan, items, graded answer pairs and labelled rows of every set; Table 3's caption
    names the classifier's features and the live sets, Table 4's caption neither (it compares features)."""
    from types import SimpleNamespace

    from kvlib.experiments import budget_sweep
    from kvlib.switching.difficulty import fast_cap
    from kvlib.experiments.switching import PARETO, TABLE3, caption, switching_setup
    from kvlib.profiles import get_profile

    model, tok = tiny
    profile = get_profile("smoke")
    with caplog.at_level(logging.INFO, logger="kvlib"):
        run = switching_setup(profile, model, tok, smoke=True, root=tmp_path, progress=False)
    assert any(r.name == "kvlib.experiments.switching" and "train {'svamp': 8, 'mawps': 8}, test {'svamp': 4}"
               in r.getMessage() for r in caplog.records)
    assert run.plan.check_every == 8 and run.plan.budgets == (8,) and run.plan.random_seeds == 20
    assert list(run.train_items) == ["svamp", "mawps"] and [len(v) for v in run.test_pairs["svamp"]] == [4, 4]
    assert len(run.frame) == 16 == len(run.train_records) and len(run.evaluation_questions) == 4
    counts = run.label_counts()
    assert set(counts.index) == {("train", "svamp"), ("train", "mawps"), ("evaluation", "svamp")}
    assert counts.to_numpy().sum() == 20
    # the fast cap: picked from the training fast answers, generated at the profile's generous cap
    generous = [r["n_tokens"] for recs in run.train_fast_generous.values() for r in recs]
    assert run.plan.fast_generous == profile.fast_tokens
    assert run.plan.fast_tokens == fast_cap(generous, run.plan.fast_cap_quantile, ceiling=profile.fast_tokens)
    assert all(r["n_tokens"] <= run.plan.fast_tokens for fast, _ in run.train_pairs.values() for r in fast)
    shares = run.cap_shares()
    assert list(zip(shares["split"], shares["set"])) == [("train", "svamp"), ("train", "mawps"),
                                                         ("evaluation", "svamp")]
    fast, slow = run.test_pairs["svamp"]
    ev = shares.iloc[-1]
    assert ev["fast at cap"] == np.mean([r["n_tokens"] >= run.plan.fast_tokens for r in fast])
    assert ev["slow at cap"] == np.mean([r["n_tokens"] >= run.plan.slow_tokens for r in slow])
    assert shares.iloc[0]["fast at generous cap"] == np.mean(
        [r["n_tokens"] >= profile.fast_tokens for r in run.train_fast_generous["svamp"]])
    assert run.protocol_form == "prompt"
    clf = SimpleNamespace(spec=SimpleNamespace(n_tokens=32, n_layers=8), info={"train_sets": ["mawps", "svamp"]})
    plan = run.plan.with_sizes(live_sets=("svamp",))
    full = caption("m", "smoke", plan, run.test_items, clf, TABLE3)
    assert "features: last 32 tokens x last 8 layers; tau=50" in full and "Live methods" in full
    bare = caption("m", "smoke", plan, run.test_items, clf, TABLE3, features=False, live=False)
    assert bare == full.replace("features: last 32 tokens x last 8 layers; ", "").replace(
        f" Live methods ({Method.KV_GENERATIVE}, {Method.DEER}, token budgets) run on SVAMP; the other sets show the "
        "offline rows and the budget curve only.", "")
    assert run.caption(clf, PARETO).endswith(f"check every 8 tokens. {PARETO}")
    assert "a switch to fast injects 'So the final answer is \\boxed{'" in full
    table4 = budget_sweep.caption(run, {(32, 8): clf})
    assert "features:" not in table4 and "Live methods" not in table4
    assert table4.endswith(f"cells: accuracy / mean generated tokens. {Method.KV_GENERATIVE} runs live on: SVAMP.")


def test_a_set_with_its_own_budget_keeps_it_for_every_answer_and_stays_out_of_the_fast_cap_pick(tiny, tmp_path):
    """``set_tokens``: a set whose answers need more room (MATH-500 at these model sizes) gets its own budget for its
    fast and slow answers and for every live method (Tables 3 and 4), its training answers do not move the other
    sets' fast cap, and the cap shares and the caption say so."""
    from dataclasses import replace

    from kvlib.experiments.switching import best_spec, evaluate_switching, fit_classifiers, switching_setup
    from kvlib.profiles import get_profile
    from kvlib.switching.difficulty import fast_cap

    model, tok = tiny
    base = get_profile("smoke")
    own = 12  # between the smoke profile's fast (8) and slow (24) budgets
    profile = replace(base, set_tokens={"svamp": own})
    run = switching_setup(profile, model, tok, smoke=True, root=tmp_path, progress=False)
    plan = run.plan
    assert plan.caps("svamp") == (own, own) and plan.caps("mawps") == (plan.fast_tokens, base.slow_tokens)
    assert plan.generation("svamp").max_new_tokens == own and plan.generation().max_new_tokens == base.slow_tokens
    mawps = [r["n_tokens"] for r in run.train_fast_generous["mawps"]]
    assert plan.fast_tokens == fast_cap(mawps, plan.fast_cap_quantile, ceiling=base.fast_tokens)  # svamp left out
    for pairs in (run.train_pairs, run.test_pairs):
        fast, slow = pairs["svamp"]
        assert max(r["n_tokens"] for r in fast + slow) <= own
        assert any(r["n_tokens"] == own for r in slow), "the random model's slow answers run to their cap"
    shares = run.cap_shares().set_index(["split", "set"])
    assert shares.loc[("evaluation", "svamp"), ["fast cap", "slow cap"]].tolist() == [own, own]
    assert shares.loc[("train", "mawps"), "slow cap"] == base.slow_tokens
    assert np.isnan(shares.loc[("train", "svamp"), "generous fast cap"])
    plan = plan.with_sizes(grid=((32, 3),))  # the tiny model has 3 layers
    clfs = fit_classifiers(run.frame, run.train_records, plan, exclude_questions=run.evaluation_questions,
                           tokenizer=tok, reuse=tmp_path / "fits")
    clf = clfs[best_spec(clfs)]
    assert f"(SVAMP: fast, slow and adaptive <= {own}, its own budget)" in run.caption(clf, "t")
    res = evaluate_switching(model, tok, "m", run.test_items, run.test_pairs, clf, plan, root=tmp_path,
                             progress=False)
    by = res.table.set_index("method")
    assert by.loc[Method.FAST, "cap"] == own == by.loc[Method.SLOW, "cap"]
    live = res.items[~res.items["method"].isin([Method.FAST, Method.SLOW, Method.KV_CLASSIFICATION, Method.RANDOM,
                                                Method.ORACLE])]
    capped = live[live["method"].eq(Method.KV_GENERATIVE) | live["method"].map(Method.is_deer)]
    assert len(capped) and capped["tokens"].max() == own  # the set's budget, not the profile's slow one (24)
    grid = budget_grid(model, tok, "m", run.test_items, run.test_pairs, clfs, plan, root=tmp_path, progress=False)
    assert grid.loc[grid["method"] == Method.KV_GENERATIVE, "mean_tokens"].max() == own  # Table 4 too
