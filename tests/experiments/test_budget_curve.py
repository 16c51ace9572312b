"""The equal-token baseline: budget levels, the difference of a method to the forced-answer budget curve with its
paired bootstrap interval, the verdict sentence, and method names for what ran."""

import numpy as np
import pandas as pd
import pytest

from kvlib.experiments.budget_curve import budget_levels, curve_points, switching_verdict, versus_curve
from kvlib.experiments.labels import Method


@pytest.mark.parametrize("fast, slow", [(4.2, 180.0), (60.0, 61.0), (0.3, 9.0), (120.0, 380.0)])
def test_budget_levels_span_fast_to_slow(fast, slow):
    levels = budget_levels(fast, slow, 5)
    assert len(levels) == 5 and levels == sorted(set(levels)) and levels[0] >= 1
    assert levels[0] == max(1, round(fast))
    if slow - fast >= 4:
        assert levels[-1] == round(slow)
    gaps = np.diff(levels)
    assert gaps.max() - gaps.min() <= 1  # evenly spread (rounding aside)
    with pytest.raises(ValueError):
        budget_levels(fast, slow, 0)


def _items(seed=0, n=200, levels=(20, 60, 100, 140, 180)):
    """Synthetic per-item outcomes: longer budgets are right more often and spend more tokens."""
    rng = np.random.default_rng(seed)
    slow_len = rng.integers(10, 250, n)
    p = rng.uniform(0, 1, n)
    rows = []

    def add(method, correct, tokens, **extra):
        rows.extend({"method": method, "set": "gsm8k", "item_id": f"i{k}", "correct": float(c), "tokens": float(t),
                     **extra} for k, (c, t) in enumerate(zip(correct, tokens)))

    add(Method.FAST, p < 0.1, rng.integers(2, 8, n))
    for k, b in enumerate(levels, 1):
        add(Method.curve_level(k), p < 0.1 + 0.6 * b / 250, np.minimum(slow_len, b + 8), budget=b)
    add(Method.SLOW, p < 0.75, slow_len)
    return pd.DataFrame(rows), p, slow_len


def test_a_method_equal_to_a_curve_point_differs_by_zero():
    items, _, _ = _items()
    copy = items[items["method"] == Method.curve_level(3)].assign(method="copy of level 3")
    vs = versus_curve(pd.concat([items, copy]), n_boot=300).set_index("method")
    r = vs.loc["copy of level 3"]
    assert r["difference"] == 0 and r["lo"] == 0 and r["hi"] == 0
    assert r["curve_accuracy"] == copy["correct"].mean()


def test_difference_is_interpolated_between_neighbouring_budgets_with_a_paired_interval():
    items, p, slow_len = _items()
    curve = curve_points(items)
    assert list(curve["method"]) == [Method.FAST, *[Method.curve_level(k) for k in range(1, 6)], Method.SLOW]
    assert curve["mean_tokens"].is_monotonic_increasing
    n = len(p)
    # a router: the slow answer on the harder half, the fast answer elsewhere; better than the curve by design
    hard = p > 0.5
    fast = items[items["method"] == Method.FAST].set_index("item_id").loc[[f"i{k}" for k in range(n)]]
    tokens = np.where(hard, slow_len, fast["tokens"].to_numpy())
    correct = np.where(hard, p < 0.75, fast["correct"].to_numpy().astype(bool))
    router = pd.DataFrame({"method": "router", "set": "gsm8k", "item_id": [f"i{k}" for k in range(n)],
                           "correct": correct.astype(float), "tokens": tokens.astype(float)})
    vs = versus_curve(pd.concat([items, router]), n_boot=500).set_index("method")
    r = vs.loc["router"]
    # the curve's accuracy at the router's mean tokens: linear between the two neighbouring curve points
    x, xp, fp = tokens.mean(), curve["mean_tokens"].to_numpy(), curve["accuracy"].to_numpy()
    j = np.searchsorted(xp, x) - 1
    w = (x - xp[j]) / (xp[j + 1] - xp[j])
    assert r["curve_accuracy"] == pytest.approx((1 - w) * fp[j] + w * fp[j + 1])
    assert r["difference"] == pytest.approx(100 * (correct.mean() - r["curve_accuracy"]))
    assert r["lo"] < r["difference"] < r["hi"]
    assert r["mean_tokens"] == pytest.approx(x) and r["n"] == n
    verdict = switching_verdict(vs.reset_index(), methods=("router",))
    assert "GSM8K, router at" in verdict and f"{r['difference']:+.1f} points" in verdict
    judged = "more accurate" if r["lo"] > 0 else "less accurate" if r["hi"] < 0 else "not distinguishable"
    assert judged in verdict
    assert verdict.startswith(f"KV switching beats the equal-token forced-answer budget curve on {int(r['lo'] > 0)} "
                              "of 1 set(s)")


def test_a_method_outside_the_curve_has_no_difference():
    items, _, _ = _items()
    below = items[items["method"] == Method.FAST].assign(method="cheaper than fast", tokens=0.0)
    vs = versus_curve(pd.concat([items, below]), n_boot=100).set_index("method")
    assert np.isnan(vs.loc["cheaper than fast", "difference"]) and np.isnan(vs.loc["cheaper than fast", "lo"])
    assert "outside the budget curve's token range" in switching_verdict(vs.reset_index(),
                                                                         methods=("cheaper than fast",))


def test_a_set_without_the_curve_is_left_out():
    items, _, _ = _items()
    no_curve = items[items["method"].isin([Method.FAST, Method.SLOW])].assign(set="svamp")
    router = no_curve[no_curve["method"] == Method.SLOW].assign(method=Method.KV_CLASSIFICATION)
    vs = versus_curve(pd.concat([no_curve, router]), n_boot=50)
    assert vs.empty
    assert "was not made" in switching_verdict(vs)


def test_deer_is_named_for_what_ran():
    assert Method.deer(3.5) == Method.DEER
    assert Method.deer(0) == Method.DEER_NO_TRIAL == "slow, answer forced at 90% (no DEER trial ran)"
    assert Method.deer(0, think_ratio=0.8) == "slow, answer forced at 80% (no DEER trial ran)"
    assert all(Method.is_deer(m) for m in (Method.DEER, Method.DEER_NO_TRIAL, Method.deer(0, 0.5)))
    assert not Method.is_deer(Method.SLOW) and not Method.is_deer(Method.curve_level(1))
    assert Method.curve_index(Method.curve_level(4)) == 4 and Method.curve_index(Method.budget(4)) is None


def test_the_model_size_table3_keeps_deer_rows_and_the_curve(tmp_path):
    from kvlib.experiments.model_size import table3_by_model

    d = tmp_path / "m-1b"
    d.mkdir()
    rows = [{"method": Method.FAST, "set": "gsm8k", "accuracy": 0.1, "mean_tokens": 40.0, "cap": 128,
             "at_cap_share": 0.025},
            {"method": Method.SLOW, "set": "gsm8k", "accuracy": 0.5, "mean_tokens": 300.0, "cap": 384,
             "at_cap_share": 0.1},
            {"method": Method.KV_GENERATIVE, "set": "gsm8k", "accuracy": 0.45, "mean_tokens": 200.0, "vs_curve": 2.5,
             "vs_curve_lo": -1.0, "vs_curve_hi": 6.25},
            {"method": Method.deer(0), "set": "gsm8k", "accuracy": 0.5, "mean_tokens": 290.0},
            {"method": Method.curve_level(1), "set": "gsm8k", "accuracy": 0.2, "mean_tokens": 90.0}]
    pd.DataFrame(rows).to_csv(d / "table3_switching.csv", index=False)
    out = table3_by_model({"m-1b": d})
    assert [m for _, m in out.index] == [Method.FAST, Method.SLOW, Method.KV_GENERATIVE, Method.DEER_NO_TRIAL,
                                         Method.curve_level(1)]
    assert out.loc[("gsm8k", Method.KV_GENERATIVE), "m-1b"] == "0.450 / 200 (vs curve +2.5 [-1.0, +6.2])"
    assert out.loc[("gsm8k", Method.FAST), "m-1b"] == "0.100 / 40 [2.5% at cap 128]"
    assert out.loc[("gsm8k", Method.SLOW), "m-1b"] == "0.500 / 300 [10.0% at cap 384]"
    # a model whose table predates the curve and the cap report is marked, beside one that has both
    old = tmp_path / "m-3b"
    old.mkdir()
    pd.DataFrame([{k: v for k, v in r.items() if k not in ("cap", "at_cap_share", "vs_curve", "vs_curve_lo",
                                                           "vs_curve_hi")} for r in rows[:3]]
                 ).to_csv(old / "table3_switching.csv", index=False)
    both = table3_by_model({"m-1b": d, "m-3b": old})
    assert list(both.columns) == ["m-1b", "m-3b (earlier protocol: no cap shares, no budget curve)"]
    assert both.loc[("gsm8k", Method.KV_GENERATIVE)].tolist() == ["0.450 / 200 (vs curve +2.5 [-1.0, +6.2])",
                                                                   "0.450 / 200"]


def test_the_fast_cap_is_picked_on_training_answers_and_the_cap_shares_report_it():
    from types import SimpleNamespace

    from kvlib.switching.difficulty import cap_records
    from kvlib.experiments.switching import SwitchingPlan, cap_shares, pick_fast_cap

    rng = np.random.default_rng(3)

    def recs(n, scale, cap):
        lengths = np.minimum(rng.gamma(2.0, scale, n).round().astype(int) + 1, cap)
        return [{"item_id": f"i{k}", "question": f"q{k}", "correct": bool(k % 2), "n_tokens": int(t),
                 "finish_reason": "length" if t >= cap else "stop"} for k, t in enumerate(lengths)]

    plan = SwitchingPlan(train_sets={"gsm8k": 400}, test_sets={"gsm8k": 300}, fast_tokens=512, slow_tokens=512)
    train_fast = {"gsm8k": recs(400, 50, 512)}
    picked = pick_fast_cap(plan, train_fast)
    lengths = np.array([r["n_tokens"] for r in train_fast["gsm8k"]])
    assert picked.fast_generous == 512 and 128 <= picked.fast_tokens < 512 and picked.fast_tokens % 32 == 0
    assert np.mean(lengths >= picked.fast_tokens) <= 0.02
    assert pick_fast_cap(plan.with_sizes(fast_cap_quantile=None), train_fast) == plan.with_sizes(
        fast_cap_quantile=None)
    run = SimpleNamespace(plan=picked, train_fast_generous=train_fast,
                          train_pairs={"gsm8k": (cap_records(train_fast["gsm8k"], picked.fast_tokens),
                                                 recs(400, 150, 512))},
                          test_pairs={"gsm8k": (recs(300, 50, picked.fast_tokens), recs(300, 150, 512))})
    shares = cap_shares(run).set_index("split")
    fast_test = np.array([r["n_tokens"] for r in run.test_pairs["gsm8k"][0]])
    slow_test = np.array([r["n_tokens"] for r in run.test_pairs["gsm8k"][1]])
    assert shares.loc["evaluation", "fast at cap"] == np.mean(fast_test >= picked.fast_tokens) < 0.05
    assert shares.loc["evaluation", "slow at cap"] == np.mean(slow_test >= 512)
    assert shares.loc["train", "fast at cap"] == np.mean(lengths >= picked.fast_tokens)
    assert shares.loc["train", "fast at generous cap"] == np.mean(lengths >= 512)
    assert shares.loc["train", "generous fast cap"] == 512


def test_a_threshold_sweep_is_read_against_the_random_routing_line(tmp_path):
    from kvlib.experiments.budget_curve import sweep_vs_random
    from kvlib.experiments.model_size import sweep_vs_random_by_model

    rows = [(Method.FAST, "", 0.1, 10.0), (Method.SLOW, "", 0.5, 110.0),
            (Method.KV_CLASSIFICATION, "tau=0", 0.5, 110.0),  # an end of the line: not a sweep point
            (Method.KV_CLASSIFICATION, "tau=30", 0.35, 60.0),  # the line is at 0.30 there: +5 points
            (Method.KV_CLASSIFICATION, "tau=50", 0.302, 60.0),  # +0.2: within the margin
            (Method.KV_CLASSIFICATION, "tau=70", 0.30, 85.0),  # the line is at 0.40: -10 points
            (Method.ORACLE, "", 0.6, 50.0)]  # not a sweep
    points = pd.DataFrame([{"method": m, "set": "gsm8k", "param": p, "accuracy": a, "mean_tokens": t}
                           for m, p, a, t in rows])
    points = pd.concat([points, points[points["method"] == Method.FAST].assign(set="svamp")])  # no slow end: left out
    out = sweep_vs_random(points)
    assert out[["set", "sweep points", "above", "below"]].values.tolist() == [["gsm8k", 3, 1, 1]]
    r = out.iloc[0]
    assert r["largest gain"] == pytest.approx(5.0) and r["at tokens"] == 60.0
    assert r["mean gain"] == pytest.approx((5.0 + 0.2 - 10.0) / 3)
    d = tmp_path / "m-1b"
    d.mkdir()
    points.to_csv(d / "table3_pareto_points.csv", index=False)
    by = sweep_vs_random_by_model({"m-1b": d})
    assert by.columns[0] == "model" and by["set"].tolist() == ["GSM8K"]
    assert by["model"].iloc[0] == "m-1b (earlier protocol: no cap shares, no budget curve)"  # no Table 3 beside it
