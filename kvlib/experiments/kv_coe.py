"""Notebook 03's experiment (Table 2): data sets, graded answers, scores, tables, captions and figures.

The notebook stays a list of calls: :func:`selfeval_sets` picks each profile set's seeded test subset
(TheoremQA only when its file is in ``data_dir``; a skipped set is named in the caption), :func:`collect_scores`
reads the graded slow answers (generated once and shared with the switching notebooks through
:func:`kvlib.switching.answers.answer_records`) and scores them with :func:`kvlib.selfeval.scores.score_records`;
:func:`table2`,
:func:`auroc_differences` and :func:`coe_cost` evaluate the scores per set, and the plotting functions draw ROC
curves and score distributions for the main scores. Sets are labelled as in the paper (``GSM8K``, ``MATH-500``
...). The per-answer scores themselves are library code, in :mod:`kvlib.selfeval.scores`.

The controls that decide how to read Table 2:

* ``Length`` (minus the answer's token count) and the ``Output-probe`` (which has log answer length among its
  features): what length and the output statistics alone give;
* the ``prompt+answer`` KV-CoE rows beside the answer-only ones, and each CoE row in both forms
  (:func:`forms_table`);
* orientation: every score is used as oriented; ``below chance`` flags a score whose flipped version's 95%
  interval lies above 50 (:func:`orientation_table`, and the caption :func:`table2_notes`);
* the KV-CoE variant called "best" is picked on a validation half of each set's items and reported on the other
  half (:func:`best_variant`), never picked on the answers it is reported on;
* :func:`table2_verdicts` writes the sentences a reader takes away, from the tables, with their intervals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..assets.data import SelectedSets, select_sets, skipped_sets
from ..core.phases import phase
from ..selfeval.metrics import MIN_CLASS, auroc, evaluate_score, flipped_interval, paired_auroc_difference
from ..selfeval.scores import KV_COE_VARIANTS, METHODS, score_records
from .report import run_label, set_label, skipped_note

__all__ = ["MAIN_SCORES", "COMPARISONS", "CAPTIONS", "PAPER_QWEN2_7B", "selfeval_sets", "collect_scores",
           "answer_summary", "evaluate_sets", "table2", "table2_markdown", "table2_notes", "orientation_table",
           "forms_table", "validation_split", "BestVariant", "best_variant", "table2_verdicts", "auroc_differences",
           "coe_cost", "caption", "roc_figure", "score_figure"]

_log = logging.getLogger(__name__)

MAIN_SCORES = ["MaxProb", "Entropy", "Length", "CoE-C", "KV-CoE-R (V)", "KV-CoE-C (V)", "KV-probe", "Output+KV"]
COMPARISONS = [("KV-CoE-C (V)", "MaxProb"), ("KV-CoE-R (V)", "MaxProb"), ("KV-CoE-C (V)", "Entropy"),
               ("KV-CoE-C (V)", "Length"), ("KV-CoE-R (V)", "Length"), ("KV-CoE-C (K)", "Length"),
               ("MaxProb", "Length"),
               ("KV-CoE-C (V)", "CoE-C"), ("KV-CoE-R (V)", "CoE-R"),
               ("KV-CoE-C (V)", "CoE-C [paper]"), ("KV-CoE-R (V)", "CoE-R [paper]"),
               ("KV-CoE-C (V) [paper]", "CoE-C [paper]"), ("KV-CoE-R (V) [paper]", "CoE-R [paper]"),
               ("KV-CoE-C (V, prompt+answer)", "KV-CoE-C (V)"), ("KV-CoE-R (V, prompt+answer)", "KV-CoE-R (V)"),
               ("KV-CoE-C (V, prompt+answer)", "MaxProb"),
               ("KV-probe", "MaxProb"), ("KV-probe", "Length"), ("KV-probe", "Output-probe"),
               ("Output-probe", "Length"), ("Output+KV", "Output-probe"), ("Output+KV", "MaxProb")]
# what each of notebook 03's tables shows, after the caption's model, profile and hardware
CAPTIONS = {"differences": "AUROC differences x100 with paired bootstrap 95% intervals.",
            "cost": "extra cost per answer of each trajectory.",
            "verdicts": "what Table 2 says, sentence by sentence, copied from table2_kv_coe, table2_differences and "
                        "table2_best_variant (95% intervals; higher/lower only where a paired interval excludes 0).",
            "best": ("the KV-CoE variant chosen on a validation half of each set's items (a seeded split of item "
                     "ids, labels never read), by its mean validation AUROC over the sets with at least 10 answers "
                     "per class in that half; AUROC x100 [95% CI] and paired differences on the other, test half.")}
# The paper's Table 2, Qwen2-7B-Instruct (AUROC x100): MaxProb far below chance, and its best KV-CoE row per set
PAPER_QWEN2_7B = {"MaxProb": {"MATH": 12.40, "TheoremQA": 4.92}, "KV-CoE": {"MATH": 84.12, "TheoremQA": 88.87}}
BELOW = "▼"  # marks a below-chance AUROC in Markdown tables


def selfeval_sets(sizes: Mapping[str, int | str | None], data_dir: str | Path | None = None,
                  seed: int = 0) -> SelectedSets:
    """``{dataset: items}``: the seeded test subset of each set in ``sizes`` (``{name: n}``; ``n`` None or
    ``"all"`` for the whole set), through :func:`kvlib.assets.data.select_sets`.

    TheoremQA is read from ``data_dir/theoremqa_test.json``; without that file it is left out and listed in
    the result's ``skipped`` (which :func:`collect_scores` passes on to :func:`caption`). An empty set, a size
    larger than its set and repeated item ids are errors naming the set.
    """
    return select_sets(sizes, "test", data_dir, seed)


@phase("self-evaluation")
def collect_scores(model, tokenizer, model_name: str, sets: Mapping[str, Sequence], max_new_tokens: int,
                   batch_size: int = 16, root=None, seed: int = 0,
                   min_class: int = MIN_CLASS) -> dict[str, pd.DataFrame]:
    """``{label: score_records(...)}`` for the graded slow answers of every set (generated if not stored).

    The result keeps ``sets.skipped`` (see :class:`kvlib.assets.data.SelectedSets`) for :func:`caption`."""
    from ..switching.answers import answer_records
    from ..selfeval.coe import hidden_coe_pass

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
    """Long table: one row per (set, method) with :func:`kvlib.selfeval.metrics.evaluate_score`'s fields."""
    rows = []
    for name, df in scores_by_set.items():
        for method in methods or [m for m in METHODS if m in df]:
            if method not in df:
                continue
            rows.append({"set": name, "method": method,
                         **evaluate_score(df["correct"], df[method], min_class=min_class, n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)


@phase("bootstrap statistics")
def table2(scores_by_set: Mapping[str, pd.DataFrame], methods: Sequence[str] | None = None,
           min_class: int = MIN_CLASS, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Table 2: rows = methods, columns ``"{set} AUROC"``, ``"... AUROC lo"``, ``"... AUROC hi"``,
    ``"... FPR95"``, ``"... AUPR"``, ``"... n correct"``, ``"... n wrong"``, ``"... below chance"`` per set (x100;
    NaN = too few; ``below chance``: the flipped score's 95% interval lies above 50)."""
    long = evaluate_sets(scores_by_set, methods, min_class, n_boot, seed)
    cols = {"AUROC": "AUROC", "AUROC_lo": "AUROC lo", "AUROC_hi": "AUROC hi", "FPR95": "FPR95", "AUPR": "AUPR",
            "n_correct": "n correct", "n_wrong": "n wrong", "below_chance": "below chance"}
    parts = []
    for name in scores_by_set:
        sub = long[long["set"] == name].set_index("method")[list(cols)].rename(columns=cols)
        parts.append(sub.add_prefix(f"{name} "))
    order = list(dict.fromkeys(long["method"]))
    return pd.concat(parts, axis=1).reindex(order).rename_axis("method")


def _sets(table: pd.DataFrame) -> list[str]:
    return [c[: -len(" AUROC")] for c in table.columns if c.endswith(" AUROC")]


def _ci(a, lo, hi, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return "–" if pd.isna(a) else f"{f.format(a)} [{f.format(lo)}, {f.format(hi)}]"


def _auc(table: pd.DataFrame, method: str, s: str) -> str:
    """``AUROC [lo, hi]`` of ``method`` on set ``s`` in a :func:`table2` (``–`` where absent)."""
    if method not in table.index:
        return "–"
    return _ci(*(table.loc[method, f"{s} AUROC{x}"] for x in ("", " lo", " hi")))


def _flagged(table: pd.DataFrame, method: str, s: str) -> bool:
    col = f"{s} below chance"
    return col in table and method in table.index and bool(table.loc[method, col] is True
                                                           or table.loc[method, col] == 1)


def table2_markdown(table: pd.DataFrame, sets: Sequence[str], caption: str = "") -> str:
    """Markdown of :func:`table2`: ``AUROC [lo, hi]`` (``▼``: below chance), FPR95 and AUPR per set, counts in the
    header; a ``caption`` is followed by :func:`table2_notes`."""
    def fmt(x):
        return "–" if pd.isna(x) else f"{x:.1f}"

    show = pd.DataFrame(index=table.index)
    for s in sets:
        nc, nw = table[f"{s} n correct"].max(), table[f"{s} n wrong"].max()
        head = f"{s} ({int(nc)}✓/{int(nw)}✗)"
        show[f"{head} AUROC [95% CI]"] = [
            _ci(a, lo, hi) + (f" {BELOW}" if _flagged(table, m, s) else "")
            for m, a, lo, hi in zip(table.index, table[f"{s} AUROC"], table[f"{s} AUROC lo"], table[f"{s} AUROC hi"])]
        show[f"{head} FPR95↓"] = table[f"{s} FPR95"].map(fmt)
        show[f"{head} AUPR"] = table[f"{s} AUPR"].map(fmt)
    md = show.reset_index().to_markdown(index=False)
    return f"{caption} {table2_notes(table)}\n\n{md}\n" if caption else md + "\n"


def table2_notes(table: pd.DataFrame) -> str:
    """The caption sentences that say how to read :func:`table2`: the controls, the post-RoPE keys, and the
    orientation check with its comparison to the paper's below-chance MaxProb."""
    sets = _sets(table)
    notes = ["Length: minus the answer's token count (shorter = judged correct)."]
    if "Output-probe" in table.index:
        notes.append("Output-probe: MaxProb, 1/PPL, -Entropy and log answer length; Output+KV adds the KV-CoE scores "
                     "and the mean keys and values, so Output+KV - Output-probe is what the cache adds beyond length "
                     "and the output statistics.")
    if any(", prompt+answer)" in m for m in table.index):
        notes.append("(…, prompt+answer) rows: the trajectory runs over the prompt's tokens, then the answer's.")
    if any("(K" in m for m in table.index):
        notes.append("K rows: keys are cached after RoPE, so a key trajectory turns with each token's position: "
                     "position and answer length can leak into it (compare the Length row).")
    flagged = [f"{m} on {s} ({_auc(table, m, s)})" for s in sets for m in table.index if _flagged(table, m, s)]
    notes.append(f"Orientation: every score is used as oriented, larger = judged correct, fixed in advance and never "
                 f"fitted; {BELOW} marks a score whose flipped version's 95% interval lies above 50, i.e. reliably "
                 f"below chance as oriented: {'; '.join(flagged) if flagged else 'none here'}.")
    mp, kv = PAPER_QWEN2_7B["MaxProb"], PAPER_QWEN2_7B["KV-CoE"]
    measured = [s for s in sets if "MaxProb" in table.index and pd.notna(table.loc["MaxProb", f"{s} AUROC"])]
    ours = "; here MaxProb scores " + ", ".join(f"{_auc(table, 'MaxProb', s)} on {s}" for s in measured) if measured \
        else ""
    notes.append(f"The paper's Table 2 gives MaxProb {mp['MATH']:.1f} (MATH) and {mp['TheoremQA']:.1f} (TheoremQA) for "
                 f"Qwen2-7B-Instruct, far below chance: flipped, they would read {100 - mp['MATH']:.1f} and "
                 f"{100 - mp['TheoremQA']:.1f}, above that table's best KV-CoE ({kv['MATH']:.1f}, "
                 f"{kv['TheoremQA']:.1f}){ours}.")
    return " ".join(notes)


def orientation_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per score and set: the AUROC as oriented with its 95% interval, the flipped score's interval, and the flag
    (``True`` where that flipped interval lies above 50). Columns ``(set, field)``; rows as in ``table``."""
    cols = {}
    for s in _sets(table):
        a, lo, hi = (table[f"{s} AUROC{x}"] for x in ("", " lo", " hi"))
        flo, fhi = flipped_interval(lo, hi)
        cols[(s, "AUROC as oriented")] = [_ci(*v) for v in zip(a, lo, hi)]
        cols[(s, "flipped AUROC")] = [_ci(*v) for v in zip(100 - a, flo, fhi)]
        cols[(s, "below chance")] = [_flagged(table, m, s) for m in table.index]
    return pd.DataFrame(cols, index=table.index)


def forms_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every trajectory score in both forms side by side: rows hidden-state CoE and each KV-CoE variant, columns
    ``(set, "reference" | "paper")`` holding ``AUROC [lo, hi]`` (``▼`` below chance)."""
    bases = [m for m in table.index if "CoE" in m and not m.endswith(" [paper]")]
    cols = {}
    for s in _sets(table):
        for form, suffix in (("reference", ""), ("paper", " [paper]")):
            cells = []
            for b in bases:
                m = b + suffix
                if m not in table.index:
                    cells.append("–")
                    continue
                cells.append(_auc(table, m, s) + (f" {BELOW}" if _flagged(table, m, s) else ""))
            cols[(s, form)] = cells
    return pd.DataFrame(cols, index=pd.Index(bases, name="score"))


def validation_split(item_ids: Sequence, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[N]`` bool, True for answers in the validation part: a seeded random ``fraction`` of the distinct item ids
    (sorted, then permuted), so every answer to one question falls on one side. Reads ids only, never labels or
    scores."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie strictly between 0 and 1, not {fraction}")
    ids = np.asarray([str(i) for i in item_ids])
    distinct = np.unique(ids)
    picked = np.random.default_rng(seed).permutation(distinct)[: int(round(fraction * len(distinct)))]
    return np.isin(ids, picked)


@dataclass
class BestVariant:
    """The KV-CoE variant picked on validation answers, and how it does on the test answers.

    Attributes:
        name: the chosen variant (``None`` when no set had enough validation answers per class).
        validation: validation AUROC x100 per candidate (rows) and set (columns), and their ``mean`` (the pick's
            criterion, over the sets with at least ``min_class`` answers per class in the validation part).
        test: per set and score, the chosen variant and its baselines on the test part: ``AUROC``, ``lo``, ``hi``,
            ``n_correct``, ``n_wrong``.
        test_differences: per set, ``name`` minus each baseline on the test part: ``AUROC difference``, ``lo``,
            ``hi`` (paired bootstrap).
        fraction, seed: the validation split (:func:`validation_split`).
    """

    name: str | None
    validation: pd.DataFrame
    test: pd.DataFrame
    test_differences: pd.DataFrame
    fraction: float = 0.5
    seed: int = 0
    candidates: tuple[str, ...] = field(default_factory=tuple)

    def table(self) -> pd.DataFrame:
        """:attr:`test` with, on each baseline's row, the chosen variant minus that baseline (``difference``,
        ``difference lo``, ``difference hi``; NaN on the chosen variant's own row): the table notebook 03 saves."""
        d = self.test_differences.drop(columns=["score"]).rename(
            columns={"baseline": "score", "AUROC difference": "difference", "lo": "difference lo",
                     "hi": "difference hi"})
        return self.test.merge(d, on=["set", "score"], how="left").assign(chosen=self.name, validation_seed=self.seed)

    def quote(self) -> str:
        """One sentence giving the choice and its test-part AUROC per set, for text to quote."""
        if self.name is None:
            return "No KV-CoE variant could be chosen: no set has enough validation answers in both classes."
        own = self.test[self.test["score"] == self.name]
        per_set = ", ".join(f"{r.set} {_ci(r.AUROC, r.lo, r.hi)}" for r in own.itertuples())
        return (f"{self.name}, chosen among {len(self.candidates)} KV-CoE variants on a validation "
                f"{100 * self.fraction:.0f}% of each set's items (seed {self.seed}), scores on the other "
                f"{100 * (1 - self.fraction):.0f}%: {per_set or 'no set with enough test answers'}.")


def _hidden_of(variant: str) -> list[str]:
    letter = "R" if variant.startswith("KV-CoE-R") else "C"
    return [f"CoE-{letter}", f"CoE-{letter} [paper]"]


@phase("bootstrap statistics")
def best_variant(scores_by_set: Mapping[str, pd.DataFrame], candidates: Sequence[str] | None = None,
                 fraction: float = 0.5, seed: int = 0, baselines: Sequence[str] = ("MaxProb", "Length"),
                 min_class: int = MIN_CLASS, n_boot: int = 1000) -> BestVariant:
    """Pick the KV-CoE variant with the highest mean validation AUROC, and score it on the test part only.

    Each set's answers are split by :func:`validation_split` (item ids only). On the validation part every
    candidate (default: every KV-CoE variant present, :data:`kvlib.selfeval.scores.KV_COE_VARIANTS`) gets its AUROC per
    set; the pick is the highest mean over the sets where both classes have ``min_class`` answers in that part
    (a candidate absent from one of those sets is out; ties go to the earlier candidate). The test part alone
    gives the reported numbers: the pick, ``baselines`` and the hidden-state CoE of the same letter in both forms,
    with stratified bootstrap intervals, and the pick minus each of them with a paired bootstrap interval.
    """
    present = [c for c in (candidates or KV_COE_VARIANTS) if any(c in df for df in scores_by_set.values())]
    val_rows, parts = {}, {}
    for s, df in scores_by_set.items():
        val = validation_split(df["item_id"], fraction, seed)
        parts[s] = (df[val], df[~val])
        v = df[val]
        n_ok = int(v["correct"].sum())
        if min(n_ok, len(v) - n_ok) < max(1, min_class):
            continue
        col = {}
        for c in present:
            if c in v:
                keep = v[c].notna()
                y = v.loc[keep, "correct"]
                col[c] = auroc(y, v.loc[keep, c]) if 0 < y.sum() < len(y) else np.nan
        val_rows[s] = pd.Series(col, dtype=float)
    validation = pd.DataFrame(val_rows, index=pd.Index(present, name="candidate"))
    validation["mean"] = validation.mean(axis=1, skipna=False) if len(val_rows) else np.nan
    name = None
    if len(val_rows) and validation["mean"].notna().any():
        name = str(validation["mean"].idxmax())
    test_rows, diff_rows = [], []
    if name is not None:
        others = [b for b in (*baselines, *_hidden_of(name)) if b != name]
        for s, (_, t) in parts.items():
            for m in [name, *others]:
                if m not in t:
                    continue
                r = evaluate_score(t["correct"], t[m], min_class=min_class, n_boot=n_boot, seed=seed)
                test_rows.append({"set": s, "score": m, "AUROC": r["AUROC"], "lo": r["AUROC_lo"], "hi": r["AUROC_hi"],
                                  "n_correct": r["n_correct"], "n_wrong": r["n_wrong"]})
            n_ok = int(t["correct"].sum())
            for b in others:
                if b not in t:
                    continue
                d = (np.nan,) * 3
                if min(n_ok, len(t) - n_ok) >= max(1, min_class):
                    d = paired_auroc_difference(t["correct"], t[name], t[b], n_boot=n_boot, seed=seed)
                diff_rows.append({"set": s, "score": name, "baseline": b, "AUROC difference": d[0], "lo": d[1],
                                  "hi": d[2]})
    test = pd.DataFrame(test_rows, columns=["set", "score", "AUROC", "lo", "hi", "n_correct", "n_wrong"])
    diffs = pd.DataFrame(diff_rows, columns=["set", "score", "baseline", "AUROC difference", "lo", "hi"])
    return BestVariant(name, validation, test, diffs, fraction, seed, tuple(present))


def _diff_text(diffs: pd.DataFrame, s: str, a: str, b: str) -> str | None:
    if diffs is None or not len(diffs):
        return None
    sub = diffs[(diffs["set"] == s) & (diffs["score"] == a) & (diffs["baseline"] == b)]
    if not len(sub) or pd.isna(sub["AUROC difference"].iloc[0]):
        return None
    d, lo, hi = sub[["AUROC difference", "lo", "hi"]].iloc[0]
    word = "higher" if lo > 0 else "lower" if hi < 0 else "no difference shown"
    return f"{_ci(d, lo, hi, signed=True)}, {word}"


def table2_verdicts(table: pd.DataFrame, differences: pd.DataFrame, best: BestVariant | None = None,
                    kv: str = "KV-CoE-C (V)") -> list[str]:
    """The sentences that read Table 2, one per set (then one for the validation pick), every number with its
    95% interval, copied from :func:`table2`, :func:`auroc_differences` and :func:`best_variant`.

    Per set: ``kv`` against MaxProb, against answer length alone, against hidden-state CoE of the same letter in
    the reference and the paper's form, the prompt+answer variant against the answer-only one, and Output+KV
    against the Output-probe (length included). "higher"/"lower" only where the paired interval excludes 0.
    A set without metrics (too few answers in a class) says so.
    """
    hid_ref, hid_paper = _hidden_of(kv)
    pa = kv.replace(")", ", prompt+answer)", 1)
    out = []
    for s in _sets(table):
        nc, nw = int(table[f"{s} n correct"].max()), int(table[f"{s} n wrong"].max())
        head = f"{s} ({nc} correct / {nw} wrong)"
        if kv not in table.index or pd.isna(table.loc[kv, f"{s} AUROC"]):
            out.append(f"{head}: no AUROC, fewer than {MIN_CLASS} answers in a class (or no {kv} score).")
            continue
        clauses = [f"{kv} {_auc(table, kv, s)}"]
        for b, label in (("MaxProb", "MaxProb"), ("Length", "answer length alone"),
                         (hid_ref, f"hidden-state {hid_ref} (reference form)"),
                         (hid_paper, f"hidden-state {hid_ref} in the paper's form")):
            d = _diff_text(differences, s, kv, b)
            if b in table.index:
                clauses.append(f"vs {label} {_auc(table, b, s)}" + (f": {d}" if d else ""))
        d = _diff_text(differences, s, pa, kv)
        if d:
            clauses.append(f"over prompt+answer, {pa} {_auc(table, pa, s)}, minus answer-only: {d}")
        d = _diff_text(differences, s, "Output+KV", "Output-probe")
        if d:
            clauses.append(f"Output+KV - Output-probe (length and output statistics): {d}")
        flagged = [m for m in table.index if _flagged(table, m, s)]
        if flagged:
            clauses.append(f"below chance as oriented: {', '.join(flagged)}")
        out.append(f"{head}: " + "; ".join(clauses) + ".")
    if best is not None:
        line = best.quote()
        extra = []
        for b in dict.fromkeys(best.test_differences["baseline"]):
            ds = [f"{s} {t}" for s in dict.fromkeys(best.test_differences["set"])
                  if (t := _diff_text(best.test_differences, s, best.name, b))]
            if ds:
                extra.append(f"minus {b}: " + "; ".join(ds))
        if extra:
            line += " On the test half, the pick " + " | ".join(extra) + "."
        out.append(line)
    return out


@phase("bootstrap statistics")
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
