"""Tables and figures of the switching experiment (notebooks 04 and 05), in the paper's layout.

Table 3 cells read ``accuracy / mean tokens (change vs slow)`` as in the paper; the CSV keeps one row per
(method, set) with every number. The Pareto figure puts every method on one accuracy-vs-tokens plot per
set: the KV-Classification threshold sweep, the KV-Generative sweep, token budgets, DEER-style early exit,
and the fixed points (fast, slow, oracle); random routing lies on the dashed fast-slow line in expectation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .data import SET_LABELS

__all__ = ["SET_LABELS", "caption", "table3_markdown", "table4_markdown", "pareto_figure", "classifier_table",
           "headline"]

_ORDER = ["fast", "slow", "KV-Classification", "KV-Generative", "random (same slow share)",
          "oracle (fast if fast is right)", "DEER-style early exit"]


def _label(name: str) -> str:
    return SET_LABELS.get(name, name)


def _skipped(test_items: Mapping, plan, classifier) -> list[str]:
    """``"Label (reason)"`` for every evaluation set the selection skipped and every training set of the plan
    that the classifier never saw (its ``info["train_sets"]``)."""
    out = [f"{_label(s.name)} ({s.reason})" for s in getattr(test_items, "skipped", ())]
    trained = (getattr(classifier, "info", None) or {}).get("train_sets")
    if trained is not None:
        out += [f"{_label(k)} (no training items)" for k in plan.train_sets if k not in set(trained)]
    return out


def caption(model_name: str, profile: str, plan, test_items: Mapping, classifier, what: str,
            hardware: str = "") -> str:
    """One line: model, profile, sets and sizes, budgets, classifier settings, what the table shows, and the
    sets left out (``test_items.skipped`` from :func:`kvlib.switching.switching_items`, training sets the
    classifier did not see)."""
    sets = ", ".join(f"{_label(k)} n={len(v)}" for k, v in test_items.items())
    trained = (getattr(classifier, "info", None) or {}).get("train_sets")
    train = ", ".join(f"{k} {'all' if v in (None, 'all') else v}" for k, v in plan.train_sets.items()
                      if trained is None or k in set(trained))
    spec = classifier.spec
    skipped = _skipped(test_items, plan, classifier)
    note = f" Skipped: {'; '.join(skipped)}." if skipped else ""
    live = getattr(plan, "live_sets", None)
    if live is not None:
        note += (f" Live methods (KV-Generative, DEER-style early exit, token budgets) run on "
                 f"{', '.join(_label(k) for k in live if k in test_items) or 'no set'}; the other sets show the "
                 "offline rows only.")
    on = f" on {hardware}" if hardware else ""
    return (f"Model {model_name}, profile {profile}{on}; greedy; fast answers <= {plan.fast_tokens} and slow/adaptive "
            f"<= {plan.slow_tokens} new tokens; evaluation sets: {sets}; classifier trained on the train splits "
            f"of {train} (split by question, evaluation questions excluded), features: last {spec.n_tokens} "
            f"tokens x last {spec.n_layers} layers; tau={plan.tau:g}, tau_fast={plan.tau_fast:g}, "
            f"tau_slow={plan.tau_slow:g}, check every {plan.check_every} tokens.{note} {what}")


def _order(methods) -> list[str]:
    known = [m for m in _ORDER if m in set(methods)]
    rest = set(methods) - set(known)
    budget = lambda m: int(m.split()[-1]) if m.startswith("budget ") and m.split()[-1].isdigit() else 0  # noqa: E731
    return known + sorted(rest, key=lambda m: (not m.startswith("budget "), budget(m), m))


def table3_markdown(table: pd.DataFrame, caption_line: str) -> str:
    """``accuracy / tokens (change vs slow)`` per method (rows) and set (columns), plus overhead notes."""
    sets = list(dict.fromkeys(table["set"]))
    out = pd.DataFrame(index=_order(table["method"].unique()), columns=[_label(s) for s in sets], dtype=object)
    for _, r in table.iterrows():
        change = "" if r["method"] == "slow" else f" ({r['token_change_vs_slow_pct']:+.1f}%)"
        cell = f"{r['accuracy']:.3f} / {r['mean_tokens']:.0f}{change}"
        if pd.notna(r.get("trial_tokens", np.nan)):
            cell += f" [+{r['trial_tokens']:.0f} trial]"
        out.loc[r["method"], _label(r["set"])] = cell
    out.index.name = "method"
    notes = ("Cells: accuracy / mean generated tokens per item (injected switch text included) and the change vs "
             "always-slow. [+k trial]: mean tokens per item that DEER-style trial answers spent (overhead, rolled "
             "back). KV methods also prefill the decision prompt once more per item (see the CSV).")
    return f"{caption_line}\n\n{out.fillna('').to_markdown()}\n\n{notes}\n"


def table4_markdown(grid: pd.DataFrame, caption_line: str) -> str:
    """Appendix B layout: rows (set, method), columns ``L x N``; cells ``accuracy / tokens``."""
    grid = grid.assign(col=[f"{n_layers}L x {n_tokens}" for n_layers, n_tokens in zip(grid["layers"], grid["tokens"])],
                       cell=[f"{a:.3f} / {t:.0f}" for a, t in zip(grid["accuracy"], grid["mean_tokens"])])
    cols = list(dict.fromkeys(grid["col"]))
    wide = grid.pivot_table(index=["set", "method"], columns="col", values="cell", aggfunc="first")[cols]
    wide.index = [f"{_label(s)} · {m}" for s, m in wide.index]
    rmse = grid.groupby("col")["val_rmse"].first()[cols]
    note = "Validation RMSE of each classifier (difficulty points): " + ", ".join(
        f"{c}: {v:.1f}" for c, v in rmse.items())
    return f"{caption_line}\n\n{wide.to_markdown()}\n\n{note}\n"


def classifier_table(classifiers: Mapping, qualities: Mapping) -> pd.DataFrame:
    """One row per grid point: validation RMSE, epochs, and evaluation-set quality."""
    rows = []
    for key, clf in classifiers.items():
        row = {"tokens": key[0], "layers": key[1], "train_rows": clf.info["train_rows"],
               "val_rows": clf.info["val_rows"], "val_rmse": clf.info["val_rmse"], "epochs": clf.info["best_epoch"]}
        for name, q in qualities.get(key, {}).items():
            row.update({f"{_label(name)} {k}": v for k, v in q.items() if k != "n"})
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_figure(points: pd.DataFrame):
    """Accuracy vs mean generated tokens, one panel per set, every method on it."""
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(points["set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    style = {"KV-Classification": ("C0", "o", "-"), "KV-Generative": ("C3", "s", "-"),
             "token budget": ("C2", "^", "-"), "DEER-style early exit": ("C4", "D", ""),
             "fast": ("k", "<", ""), "slow": ("k", ">", ""), "oracle (fast if fast is right)": ("C1", "*", ""),
             "random (same slow share)": ("grey", "x", "")}
    for ax, name in zip(axes[0], sets):
        df = points[points["set"] == name]
        ends = df[df["method"].isin(["fast", "slow"])].sort_values("mean_tokens")
        ax.plot(ends["mean_tokens"], ends["accuracy"], ls="--", c="grey", lw=1,
                label="random routing (expected)")
        for method, sub in df.groupby("method", sort=False):
            c, m, ls = style.get(method, ("C5", "v", "-"))
            sub = sub.sort_values("mean_tokens")
            ax.plot(sub["mean_tokens"], sub["accuracy"], marker=m, ls=ls or "none", c=c, label=method,
                    ms=9 if m == "*" else 6, lw=1.5)
        ax.set_title(_label(name))
        ax.set_xlabel("mean generated tokens per item")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    seen = {}  # one legend for every panel: a method drawn on any set is listed (live methods skip some sets)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    axes[0][-1].legend(seen.values(), seen.keys(), fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def headline(table: pd.DataFrame,
             methods=("KV-Generative", "KV-Classification", "DEER-style early exit")) -> pd.DataFrame:
    """Per set and method: times fewer tokens than always-slow and the accuracy change in points (x100)."""
    rows = []
    for name, df in table.groupby("set", sort=False):
        slow = df[df["method"] == "slow"].iloc[0]
        for m in methods:
            hit = df[df["method"] == m]
            if hit.empty:
                continue
            r = hit.iloc[0]
            rows.append({"set": _label(name), "method": m, "slow accuracy": slow["accuracy"], "accuracy": r["accuracy"],
                         "accuracy change (points)": 100 * (r["accuracy"] - slow["accuracy"]),
                         "slow tokens": slow["mean_tokens"], "tokens": r["mean_tokens"],
                         "x fewer tokens": slow["mean_tokens"] / max(r["mean_tokens"], 1e-9)})
    return pd.DataFrame(rows)
