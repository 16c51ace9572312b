"""Notebook 03's experiment (Table 2): data sets, graded answers, scores, tables, captions and figures.

The notebook stays a list of calls: :func:`selfeval_sets` picks each profile set's seeded test subset
(TheoremQA only when its file is in ``data_dir``; a skipped set is named in the caption), :func:`collect_scores`
reads the graded slow answers (generated once and shared with the switching notebooks through
:func:`kvlib.answers.answer_records`) and scores them with :func:`kvlib.selfeval.score_records`; :func:`table2`,
:func:`auroc_differences` and :func:`coe_cost` evaluate the scores per set, and the plotting functions draw ROC
curves and score distributions for the main scores. Sets are labelled as in the paper (``GSM8K``, ``MATH-500``
...). The per-answer scores themselves are library code, in :mod:`kvlib.selfeval`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..data import SelectedSets, select_sets, skipped_sets
from ..metrics import MIN_CLASS, evaluate_score, paired_auroc_difference
from ..selfeval import METHODS, score_records
from .report import run_label, set_label, skipped_note

__all__ = ["MAIN_SCORES", "COMPARISONS", "CAPTIONS", "selfeval_sets", "collect_scores", "answer_summary",
           "evaluate_sets", "table2", "table2_markdown", "auroc_differences", "coe_cost", "caption", "roc_figure",
           "score_figure"]

_log = logging.getLogger(__name__)

MAIN_SCORES = ["MaxProb", "Entropy", "CoE-C", "KV-CoE-R (V)", "KV-CoE-C (V)", "KV-probe", "Output+KV"]
COMPARISONS = [("KV-CoE-C (V)", "MaxProb"), ("KV-CoE-R (V)", "MaxProb"), ("KV-CoE-C (V)", "Entropy"),
               ("KV-CoE-C (V)", "CoE-C"), ("KV-CoE-R (V)", "CoE-R"), ("KV-probe", "MaxProb"),
               ("KV-probe", "Output-probe"), ("Output+KV", "Output-probe"), ("Output+KV", "MaxProb")]
# what each of notebook 03's tables shows, after the caption's model, profile and hardware
CAPTIONS = {"differences": "AUROC differences x100 with paired bootstrap 95% intervals.",
            "cost": "extra cost per answer of each trajectory."}


def selfeval_sets(sizes: Mapping[str, int | str | None], data_dir: str | Path | None = None,
                  seed: int = 0) -> SelectedSets:
    """``{dataset: items}``: the seeded test subset of each set in ``sizes`` (``{name: n}``; ``n`` None or
    ``"all"`` for the whole set), through :func:`kvlib.data.select_sets`.

    TheoremQA is read from ``data_dir/theoremqa_test.json``; without that file it is left out and listed in
    the result's ``skipped`` (which :func:`collect_scores` passes on to :func:`caption`). An empty set, a size
    larger than its set and repeated item ids are errors naming the set.
    """
    return select_sets(sizes, "test", data_dir, seed)


def collect_scores(model, tokenizer, model_name: str, sets: Mapping[str, Sequence], max_new_tokens: int,
                   batch_size: int = 16, root=None, seed: int = 0,
                   min_class: int = MIN_CLASS) -> dict[str, pd.DataFrame]:
    """``{label: score_records(...)}`` for the graded slow answers of every set (generated if not stored).

    The result keeps ``sets.skipped`` (see :class:`kvlib.data.SelectedSets`) for :func:`caption`."""
    from ..answers import answer_records
    from ..coe import hidden_coe_pass

    if not sets:
        raise ValueError("no data sets to score: select some with selfeval_sets({name: n, ...})")
    scores = {}
    for name, items in sets.items():
        if not len(items):
            raise ValueError(f"data set {name} has no items to answer: give it a size of at least 1 in the profile, "
                             f"or leave it out")
        records = answer_records(model, tokenizer, model_name, name, items, mode="slow",
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, root=root)
        n_ok = sum(r["correct"] for r in records)
        if min(n_ok, len(records) - n_ok) >= min_class:
            records = hidden_coe_pass(model, tokenizer, model_name, name, records,
                                      batch_size=max(1, batch_size // 2), root=root)
        else:  # the table shows no metric for this set: skip the costly re-forward
            _log.info("%s: %d correct of %d: fewer than %d per class, no hidden-state CoE pass", name, n_ok,
                      len(records), min_class)
        scores[set_label(name)] = score_records(records, seed=seed)
    return SelectedSets(scores, skipped=skipped_sets(sets))


def answer_summary(scores_by_set: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per set: answers, correct, mean tokens, unfinished answers."""
    return pd.DataFrame({name: {"answers": len(df), "correct": int(df["correct"].sum()),
                                "mean tokens": df["n_tokens"].mean(),
                                "unfinished": int((df["finish_reason"] != "stop").sum())}
                         for name, df in scores_by_set.items()}).T


def evaluate_sets(scores_by_set: Mapping[str, pd.DataFrame], methods: Sequence[str] | None = None,
                  min_class: int = MIN_CLASS, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long table: one row per (set, method) with :func:`kvlib.metrics.evaluate_score`'s fields."""
    rows = []
    for name, df in scores_by_set.items():
        for method in methods or [m for m in METHODS if m in df]:
            if method not in df:
                continue
            rows.append({"set": name, "method": method,
                         **evaluate_score(df["correct"], df[method], min_class=min_class, n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)


def table2(scores_by_set: Mapping[str, pd.DataFrame], methods: Sequence[str] | None = None,
           min_class: int = MIN_CLASS, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Table 2: rows = methods, columns ``"{set} AUROC"``, ``"... AUROC lo"``, ``"... AUROC hi"``,
    ``"... FPR95"``, ``"... AUPR"``, ``"... n correct"``, ``"... n wrong"`` per set (x100; NaN = too few)."""
    long = evaluate_sets(scores_by_set, methods, min_class, n_boot, seed)
    cols = {"AUROC": "AUROC", "AUROC_lo": "AUROC lo", "AUROC_hi": "AUROC hi", "FPR95": "FPR95", "AUPR": "AUPR",
            "n_correct": "n correct", "n_wrong": "n wrong"}
    parts = []
    for name in scores_by_set:
        sub = long[long["set"] == name].set_index("method")[list(cols)].rename(columns=cols)
        parts.append(sub.add_prefix(f"{name} "))
    order = list(dict.fromkeys(long["method"]))
    return pd.concat(parts, axis=1).reindex(order).rename_axis("method")


def table2_markdown(table: pd.DataFrame, sets: Sequence[str], caption: str = "") -> str:
    """Markdown of :func:`table2`: ``AUROC [lo, hi]``, FPR95 and AUPR per set, counts in the header."""
    def fmt(x):
        return "–" if pd.isna(x) else f"{x:.1f}"

    show = pd.DataFrame(index=table.index)
    for s in sets:
        nc, nw = table[f"{s} n correct"].max(), table[f"{s} n wrong"].max()
        head = f"{s} ({int(nc)}✓/{int(nw)}✗)"
        show[f"{head} AUROC [95% CI]"] = [
            "–" if pd.isna(a) else f"{a:.1f} [{lo:.1f}, {hi:.1f}]"
            for a, lo, hi in zip(table[f"{s} AUROC"], table[f"{s} AUROC lo"], table[f"{s} AUROC hi"])]
        show[f"{head} FPR95↓"] = table[f"{s} FPR95"].map(fmt)
        show[f"{head} AUPR"] = table[f"{s} AUPR"].map(fmt)
    md = show.reset_index().to_markdown(index=False)
    return f"{caption}\n\n{md}\n" if caption else md + "\n"


def auroc_differences(scores_by_set: Mapping[str, pd.DataFrame],
                      pairs: Sequence[tuple[str, str]] = COMPARISONS, min_class: int = MIN_CLASS,
                      n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """AUROC(a) - AUROC(b) per set with a paired bootstrap 95% interval (NaN when a class is too small)."""
    rows = []
    for name, df in scores_by_set.items():
        n_ok = int(df["correct"].sum())
        for a, b in pairs:
            if a not in df or b not in df:
                continue
            d = (np.nan,) * 3
            if min(n_ok, len(df) - n_ok) >= max(1, min_class):
                d = paired_auroc_difference(df["correct"], df[a], df[b], n_boot=n_boot, seed=seed)
            rows.append({"set": name, "score": a, "baseline": b, "AUROC difference": d[0], "lo": d[1], "hi": d[2],
                         "n_correct": n_ok, "n_wrong": len(df) - n_ok})
    return pd.DataFrame(rows)


def coe_cost(scores_by_set: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per set: mean extra seconds and bytes per answer of KV-CoE (reductions over the live cache) and of
    hidden-state CoE (a re-forward with hidden states), their ratio, and the mean answer length.

    The ``*seconds*`` columns are wall-clock measurements that change from run to run:
    :func:`kvlib.experiments.report.save_table` writes them to ``timings/coe_cost.csv``, apart from the
    deterministic columns (sizes, bytes, tokens)."""
    rows = []
    for name, df in scores_by_set.items():
        kv_s, hid_s = df["kv_seconds"].mean(), df["hidden_seconds"].mean()
        kv_b, hid_b = df["kv_bytes"].mean(), df["hidden_bytes"].mean()
        rows.append({"set": name, "n": len(df), "mean_tokens": df["n_tokens"].mean(),
                     "gen_seconds": df["gen_seconds"].mean(), "kv_coe_seconds": kv_s, "hidden_coe_seconds": hid_s,
                     "seconds_ratio": hid_s / kv_s if kv_s > 0 else np.nan, "kv_coe_bytes": kv_b,
                     "hidden_coe_bytes": hid_b, "bytes_ratio": hid_b / kv_b if kv_b > 0 else np.nan})
    return pd.DataFrame(rows)


def caption(model_name: str, profile: str, scores_by_set: Mapping[str, pd.DataFrame], max_new_tokens: int,
            hardware: str = "", table: str = "table2") -> str:
    """One line saying which model, profile and hardware produced a table of notebook 03.

    ``table="table2"``: also the sets, their sizes, the budget, the metrics, and the optional sets that were
    skipped (``scores_by_set.skipped``, from :func:`collect_scores`). ``"differences"`` or ``"cost"``: the
    run, then what that table shows (:data:`CAPTIONS`)."""
    head = run_label(model_name, profile, hardware)
    if table != "table2":
        if table not in CAPTIONS:
            raise ValueError(f"unknown table {table!r}: choose table2 or one of {', '.join(CAPTIONS)}")
        return f"{head}; {CAPTIONS[table]}"
    sets = ", ".join(f"{k} n={len(v)} ({int(v['correct'].sum())} correct)" for k, v in scores_by_set.items())
    return (f"{head}; greedy slow answers up to {max_new_tokens} new tokens; "
            f"sets: {sets}. AUROC/FPR95/AUPR x100, correct = positive class, 95% stratified bootstrap CI; "
            f"CoE rows use the reference (original CoE) form, [paper] rows the seed's equations."
            f"{skipped_note(scores_by_set)}")


def _small(df: pd.DataFrame, min_class: int) -> bool:
    n_ok = int(df["correct"].sum())
    return min(n_ok, len(df) - n_ok) < min_class


def roc_figure(scores_by_set: Mapping[str, pd.DataFrame], methods: Sequence[str] = MAIN_SCORES,
               min_class: int = MIN_CLASS):
    """One ROC panel per set (TPR = share of correct answers accepted, FPR = share of wrong ones)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    n = len(scores_by_set)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False, sharey=True)
    for ax, (name, df) in zip(axes[0], scores_by_set.items()):
        n_ok = int(df["correct"].sum())
        ax.set_title(f"{name} ({n_ok} correct / {len(df) - n_ok} wrong)")
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        ax.set_xlabel("false-positive rate (wrong answers accepted)")
        if _small(df, min_class):
            ax.text(0.5, 0.5, f"fewer than {min_class} answers\nin one class: no curve", ha="center", va="center")
            continue
        for m in methods:
            if m not in df:
                continue
            ok = df[m].notna()
            y, s = df.loc[ok, "correct"].to_numpy(), df.loc[ok, m].to_numpy()
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.6, label=f"{m} ({100 * roc_auc_score(y, s):.1f})")
        ax.legend(fontsize=8, loc="lower right", title="score (AUROC)", title_fontsize=8)
    axes[0][0].set_ylabel("true-positive rate (correct answers accepted)")
    fig.tight_layout()
    return fig


def score_figure(scores_by_set: Mapping[str, pd.DataFrame], methods: Sequence[str] = MAIN_SCORES):
    """Histograms of each main score for correct vs wrong answers: one row per set, one column per score."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    methods = [m for m in methods if any(m in df for df in scores_by_set.values())]
    rows, cols = len(scores_by_set), len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.4 * rows), squeeze=False)
    for r, (name, df) in enumerate(scores_by_set.items()):
        for c, m in enumerate(methods):
            ax = axes[r][c]
            data = df.assign(answer=np.where(df["correct"], "correct", "wrong"))
            if m in data and data[m].notna().any():
                sns.histplot(data=data, x=m, hue="answer", hue_order=["correct", "wrong"], stat="density",
                             common_norm=False, element="step", bins=20, ax=ax, legend=(r == 0 and c == 0))
                ax.xaxis.set_major_locator(MaxNLocator(4))
            else:  # scores that need both classes (supervised probe) or were skipped for a one-class set
                n_ok = int(df["correct"].sum())
                ax.text(0.5, 0.5, f"not computed:\n{n_ok} correct / {len(df) - n_ok} wrong", ha="center",
                        va="center", transform=ax.transAxes, fontsize=9, color="grey")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_xlabel("score (larger = judged correct)" if r == rows - 1 else "")
            ax.set_ylabel(f"{name}\ndensity" if c == 0 else "")
            if r == 0:
                ax.set_title(m)
    fig.tight_layout()
    return fig
