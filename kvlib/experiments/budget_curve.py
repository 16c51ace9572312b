"""The equal-token baseline of Table 3: the accuracy of simply stopping the slow answer, at every mean token count.

The test that decides the paper's switching claim is not "fewer tokens than always-slow" but "more accuracy than
stopping the answer at the same mean token count". The **forced-answer budget curve** of one set and model is:

* always-fast (the fast prompt, no step-by-step text: the curve's zero-thinking end);
* the slow answer cut at ``B`` appended tokens and forced to answer (:func:`kvlib.switching.early_exit.budget_generate`:
  the switch-to-fast text is injected, then at most 64 more tokens), at :func:`budget_levels` budgets spread
  evenly from the fast to the slow mean token count;
* always-slow (no budget: the curve's other end).

Each point is ``(mean generated tokens, accuracy)`` over the same evaluation items, tokens counted as for every
method (injected text included). :func:`versus_curve` compares each switching method with the curve at the
method's own mean token count: the curve's accuracy there is interpolated linearly between the two neighbouring
curve points (points ordered by mean tokens), which is the mean over items of each item's correctness interpolated
with the same weights; the difference (method - curve, accuracy points x100) gets a paired bootstrap 95% interval
that redraws items (the same draw for the method and every curve point) and recomputes the method's mean tokens,
the curve's points and the interpolation in each draw. A method outside the curve's token range has no difference
(``NaN``): the curve says nothing there. :func:`switching_verdict` turns the table into one sentence per set.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .labels import Method
from .report import set_label

__all__ = ["budget_levels", "curve_methods", "curve_points", "versus_curve", "switching_verdict", "sweep_vs_random",
           "VS_CURVE", "VS_RANDOM"]

VS_CURVE = ("Accuracy difference (points x100) of each method to the forced-answer budget curve (always-fast, the "
            "slow answer cut at each budget and forced to answer, always-slow) at the method's own mean token count: "
            "the curve interpolated linearly between its two neighbouring points; paired bootstrap 95% interval over "
            "items (the method's and the curve's tokens and accuracy recomputed in each draw). Empty where the "
            "method's tokens lie outside the curve.")


VS_RANDOM = ("Each router's threshold sweep against random routing: random routing that sends a share p of the items "
             "to their slow answer has, in expectation, p times the slow answer's accuracy and tokens plus (1 - p) "
             "times the fast answer's, the straight line from the fast to the slow point. For each sweep point "
             "between the two ends, its accuracy minus that line's at the point's mean tokens (points x100); "
             "above = more than 0.5 points over the line, below = more than 0.5 under it. From the Pareto points "
             "(no per-item data, so no interval: a gain of a point or two is within the bootstrap spread of Table "
             "3's rows).")


def budget_levels(fast_mean: float, slow_mean: float, n: int = 5) -> list[int]:
    """``n`` distinct token budgets spread evenly from ``fast_mean`` to ``slow_mean`` (rounded, at least 1), in
    increasing order; when the two means are closer than ``n`` tokens the levels run on past ``slow_mean`` one
    token apart."""
    if n < 1:
        raise ValueError("need at least one budget level")
    lo = max(1, int(round(fast_mean)))
    hi = max(int(round(slow_mean)), lo + n - 1)
    levels = np.unique(np.round(np.linspace(lo, hi, n)).astype(int))
    return [int(b) for b in levels]


def curve_methods(methods: Sequence[str]) -> list[str]:
    """The methods among ``methods`` that make up the curve: fast, the budget levels, slow."""
    return [m for m in methods if m in (Method.FAST, Method.SLOW) or Method.curve_index(m) is not None]


def _matrices(items: pd.DataFrame, methods: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, tokens)``, each ``[len(methods), n items]``, items aligned by ``item_id``."""
    wide_c = items.pivot(index="item_id", columns="method", values="correct")
    wide_t = items.pivot(index="item_id", columns="method", values="tokens")
    missing = wide_c[list(methods)].isna().any()
    if missing.any():
        raise ValueError(f"methods without an outcome for every item: {list(missing[missing].index)}")
    return wide_c[list(methods)].to_numpy(float).T, wide_t[list(methods)].to_numpy(float).T


def curve_points(items: pd.DataFrame) -> pd.DataFrame:
    """The curve of every set: ``set, method, budget, accuracy, mean_tokens`` ordered by mean tokens.

    Args:
        items: one row per (method, set, item): ``method, set, item_id, correct, tokens`` (and ``budget`` on the
            budget rows), as :func:`kvlib.experiments.switching.evaluate_switching` returns them.
    """
    rows = []
    for name, df in items.groupby("set", sort=False):
        for method in curve_methods(list(dict.fromkeys(df["method"]))):
            sub = df[df["method"] == method]
            budget = sub["budget"].iloc[0] if "budget" in sub and Method.curve_index(method) else np.nan
            rows.append({"set": name, "method": method, "budget": budget, "accuracy": sub["correct"].mean(),
                         "mean_tokens": sub["tokens"].mean()})
    out = pd.DataFrame(rows, columns=["set", "method", "budget", "accuracy", "mean_tokens"])
    return out.sort_values(["set", "mean_tokens"], kind="stable").reset_index(drop=True) if len(out) else out


def _interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation: ``x`` ``[B]``, ``xp``/``fp`` ``[B, P]`` (any order); NaN outside."""
    out = np.full(len(x), np.nan)
    for b in range(len(x)):
        order = np.argsort(xp[b], kind="stable")
        out[b] = np.interp(x[b], xp[b, order], fp[b, order], left=np.nan, right=np.nan)
    return out


def versus_curve(items: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every non-curve method's accuracy difference to the budget curve at its own mean token count.

    Args:
        items: per-item outcomes (see :func:`curve_points`); a set needs the fast and slow rows and at least one
            budget level, else it is left out.
        n_boot: bootstrap draws of items.

    Returns:
        One row per (set, method): ``set, method, n, accuracy, mean_tokens, curve_accuracy, difference, lo, hi``
        (differences in accuracy points x100; ``NaN`` outside the curve's token range; ``lo``/``hi`` the 2.5 and
        97.5 percentiles of the draws that fall inside it).
    """
    rows = []
    rng = np.random.default_rng(seed)
    for name, df in items.groupby("set", sort=False):
        methods = list(dict.fromkeys(df["method"]))
        curve = curve_methods(methods)
        if not any(Method.curve_index(m) for m in curve) or Method.FAST not in curve or Method.SLOW not in curve:
            continue
        others = [m for m in methods if m not in curve]
        if not others:
            continue
        correct, tokens = _matrices(df, curve + others)
        n = correct.shape[1]
        cc, ct = correct[: len(curve)], tokens[: len(curve)]
        idx = rng.integers(0, n, size=(n_boot, n))
        boot_cc, boot_ct = cc[:, idx].mean(-1).T, ct[:, idx].mean(-1).T  # [B, P]
        for k, method in enumerate(others):
            mc, mt = correct[len(curve) + k], tokens[len(curve) + k]
            at = float(_interp(np.array([mt.mean()]), ct.mean(1)[None], cc.mean(1)[None])[0])
            diffs = 100 * (mc[idx].mean(1) - _interp(mt[idx].mean(1), boot_ct, boot_cc))
            inside = np.isfinite(diffs)
            lo, hi = (np.percentile(diffs[inside], [2.5, 97.5]) if np.isfinite(at) and inside.any()
                      else (np.nan, np.nan))
            rows.append({"set": name, "method": method, "n": n, "accuracy": float(mc.mean()),
                         "mean_tokens": float(mt.mean()), "curve_accuracy": at,
                         "difference": 100 * (float(mc.mean()) - at), "lo": float(lo), "hi": float(hi)})
    return pd.DataFrame(rows, columns=["set", "method", "n", "accuracy", "mean_tokens", "curve_accuracy",
                                       "difference", "lo", "hi"])


def switching_verdict(vs: pd.DataFrame, methods: Sequence[str] = (Method.KV_CLASSIFICATION, Method.KV_GENERATIVE)
                      ) -> str:
    """The switching verdict read from :func:`versus_curve`: for each set and KV method, its difference to the
    equal-token budget curve with its interval and what it means, then the count of sets where a KV method is
    above the curve (its interval above 0)."""
    parts, wins, tested = [], 0, 0
    for name, df in vs.groupby("set", sort=False):
        best = False
        for method in methods:
            hit = df[df["method"] == method]
            if hit.empty:
                continue
            r = hit.iloc[0]
            where = f"{set_label(name)}, {method} at {r['mean_tokens']:.0f} tokens"
            if not np.isfinite(r["difference"]):
                parts.append(f"{where}: outside the budget curve's token range, not tested.")
                continue
            tested += 1
            if r["lo"] > 0:
                judgement = "more accurate than stopping the answer at the same mean token count"
                best = True
            elif r["hi"] < 0:
                judgement = "less accurate than stopping the answer at the same mean token count"
            else:
                judgement = "not distinguishable from stopping the answer at the same mean token count"
            parts.append(f"{where}: {r['difference']:+.1f} points [{r['lo']:+.1f}, {r['hi']:+.1f}] vs the budget "
                         f"curve (n={int(r['n'])}), {judgement}.")
        wins += best
    if not tested:
        return " ".join(["No KV switching method lies within the budget curve's token range: the equal-token test "
                         "was not made.", *parts])
    n_sets = vs["set"].nunique()
    head = (f"KV switching beats the equal-token forced-answer budget curve on {wins} of {n_sets} set(s) "
            f"(95% interval above 0).")
    return " ".join([head, *parts])


def sweep_vs_random(points: pd.DataFrame, methods: Sequence[str] = (Method.KV_CLASSIFICATION,),
                    margin: float = 0.5) -> pd.DataFrame:
    """Per set and router, its threshold sweep against random routing (:data:`VS_RANDOM`), from the Pareto points
    of Table 3 (``method, set, param, accuracy, mean_tokens``, with the ``fast`` and ``slow`` points).

    Returns one row per set and method: ``sweep points`` (strictly between the fast and the slow tokens), how many
    lie ``above`` / ``below`` the random-routing line by more than ``margin`` points, the ``largest gain`` and the
    ``mean gain`` over the line (points x100) and the mean tokens where the largest gain lies; a set without both
    ends or without sweep points between them is left out."""
    rows = []
    for name, df in points.groupby("set", sort=False):
        ends = {m: df[df["method"] == m] for m in (Method.FAST, Method.SLOW)}
        if any(e.empty for e in ends.values()):
            continue
        (fa, ft), (sa, st) = ((float(e["accuracy"].iloc[0]), float(e["mean_tokens"].iloc[0])) for e in ends.values())
        if st <= ft:
            continue
        for method in methods:
            sweep = df[(df["method"] == method) & (df["mean_tokens"] > ft) & (df["mean_tokens"] < st)]
            if sweep.empty:
                continue
            tok = sweep["mean_tokens"].to_numpy(float)
            gain = 100 * (sweep["accuracy"].to_numpy(float) - (fa + (tok - ft) / (st - ft) * (sa - fa)))
            rows.append({"set": name, "method": method, "sweep points": len(gain),
                         "above": int(np.sum(gain > margin)), "below": int(np.sum(gain < -margin)),
                         "largest gain": float(gain.max()), "at tokens": float(tok[gain.argmax()]),
                         "mean gain": float(gain.mean())})
    return pd.DataFrame(rows, columns=["set", "method", "sweep points", "above", "below", "largest gain",
                                       "at tokens", "mean gain"])
