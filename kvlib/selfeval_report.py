"""The self-evaluation experiment of notebook 03: data sets, graded answers, scores, figures, saved outputs.

The notebook stays a list of calls: :func:`selfeval_sets` picks each profile set's seeded test subset
(TheoremQA only when its file is in ``data_dir``; a skipped set is named in the caption), :func:`collect_scores`
reads the graded slow answers
(generated once and shared with the switching notebooks through :func:`kvlib.answers.answer_records`) and
scores them with :func:`kvlib.selfeval.score_records`, and the plotting functions draw ROC curves and score
distributions for the main scores. Sets are labelled as in the paper (``GSM8K``, ``MATH-500`` ...).

:func:`save_table` keeps results and wall-clock measurements apart: columns that hold timings (seconds,
tokens per second, ...; see :func:`timing_columns`) go to ``timings/<stem>.csv`` beside the table, so that two
runs with one seed write byte-identical result tables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .data import DATA_DIR_FILES, SET_LABELS, SelectedSets, select_sets, skipped_sets
from .metrics import MIN_CLASS
from .selfeval import score_records

__all__ = ["SET_LABELS", "MAIN_SCORES", "selfeval_sets", "collect_scores", "caption", "skipped_note", "roc_figure",
           "score_figure", "save_table", "save_figure", "timing_columns", "TIMINGS_DIR"]

MAIN_SCORES = ["MaxProb", "Entropy", "CoE-C", "KV-CoE-R (V)", "KV-CoE-C (V)", "KV-probe", "Output+KV"]
THEOREMQA_FILE = DATA_DIR_FILES["theoremqa"]
TIMINGS_DIR = "timings"
_TIMING = re.compile(r"seconds|tok_s|tokens?[ _]?/[ _]?s\b|per[ _]second"
                     r"|(^|[ _])(s|ms|us|time|elapsed|duration|wall)($|[ _])", re.I)


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
    from .answers import answer_records
    from .coe import hidden_coe_pass

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
            print(f"{name}: {n_ok} correct of {len(records)}: fewer than {min_class} per class, "
                  "no hidden-state CoE pass")
        scores[SET_LABELS.get(name, name)] = score_records(records, seed=seed)
    return SelectedSets(scores, skipped=skipped_sets(sets))


def skipped_note(selection) -> str:
    """`` Skipped: TheoremQA (needs DATA_DIR holding theoremqa_test.json).`` for the sets a selection left out
    (``""`` when none was)."""
    skipped = skipped_sets(selection)
    if not skipped:
        return ""
    return " Skipped: " + "; ".join(f"{SET_LABELS.get(s.name, s.name)} ({s.reason})" for s in skipped) + "."


def caption(model_name: str, profile: str, scores_by_set: Mapping[str, pd.DataFrame], max_new_tokens: int,
            hardware: str = "") -> str:
    """One line saying which model, profile, hardware, sets, sizes and budget produced a table, and which
    optional sets were skipped (``scores_by_set.skipped``, from :func:`collect_scores`)."""
    sets = ", ".join(f"{k} n={len(v)} ({int(v['correct'].sum())} correct)" for k, v in scores_by_set.items())
    on = f" on {hardware}" if hardware else ""
    return (f"Model {model_name}, profile {profile}{on}; greedy slow answers up to {max_new_tokens} new tokens; "
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


def timing_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that hold wall-clock measurements (names with ``seconds``, ``tok_s``, ``tokens/s``, or
    the word ``s``, ``ms``, ``us``, ``time``, ``elapsed``, ``duration``, ``wall``): they differ from run to run,
    so :func:`save_table` writes them apart."""
    return [c for c in df.columns if _TIMING.search(str(c))]


def _key_columns(df: pd.DataFrame, timings: Sequence[str]) -> list[str]:
    """Non-numeric columns (set, method, model, ...) that identify a row, repeated in the timings file."""
    return [c for c in df.columns if c not in timings and not pd.api.types.is_numeric_dtype(df[c])]


def save_table(df: pd.DataFrame, stem: str | Path, caption_line: str, markdown: str | None = None,
               timings: Sequence[str] | None = None) -> list[Path]:
    """``stem.csv`` (the data frame) and ``stem.md`` (``markdown`` or the frame as Markdown, after the caption).

    Wall-clock columns (``timings``; default :func:`timing_columns`) are not part of the result table: they go
    to ``timings/<stem name>.csv`` and ``.md`` next to it, with the row-identifying text columns, so results
    are byte-identical across runs with one seed while the timings of each run stay available. Returns the
    paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    timings = list(timing_columns(df) if timings is None else timings)
    missing = [c for c in timings if c not in df.columns]
    if missing:
        raise KeyError(f"timing columns {missing} are not in the table {stem.name} (columns: {list(df.columns)})")
    written = []
    if timings:
        tdir = stem.parent / TIMINGS_DIR
        tdir.mkdir(parents=True, exist_ok=True)
        tdf = df[_key_columns(df, timings) + timings]
        tstem = tdir / stem.name
        tdf.to_csv(tstem.with_suffix(".csv"), index=False)
        tstem.with_suffix(".md").write_text(f"{caption_line} Wall-clock measurements of this run (they vary from "
                                            f"run to run).\n\n{tdf.to_markdown(index=False)}\n")
        written += [tstem.with_suffix(".csv"), tstem.with_suffix(".md")]
        df = df.drop(columns=timings)
        if markdown is None:
            caption_line = f"{caption_line} Timings: {TIMINGS_DIR}/{stem.name}.md."
    df.to_csv(stem.with_suffix(".csv"), index=False)
    md = markdown if markdown is not None else f"{caption_line}\n\n{df.to_markdown(index=False)}\n"
    stem.with_suffix(".md").write_text(md)
    return [stem.with_suffix(".csv"), stem.with_suffix(".md"), *written]


def save_figure(fig, stem: str | Path, dpi: int = 150) -> None:
    """``stem.png`` and ``stem.pdf``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".png", ".pdf"):
        fig.savefig(stem.with_suffix(ext), dpi=dpi, bbox_inches="tight")
