"""Self-evaluation metrics: AUROC, FPR at 95% TPR, AUPR (all x100) and a bootstrap interval for AUROC.

Conventions (those of the original CoE evaluation):

* the positive class is a *correct* answer; every score must be oriented so that larger means "more
  likely correct" (see :mod:`kvlib.selfeval.scores` for each score's orientation);
* AUROC and AUPR come from scikit-learn (``roc_auc_score``, ``average_precision_score``); FPR95 is the
  false-positive rate at the first ROC threshold whose true-positive rate reaches 95% (``roc_curve``
  with every threshold kept), so ties are never split;
* the AUROC interval is a stratified percentile bootstrap: correct and wrong answers are resampled
  separately (each resample keeps both classes and their sizes), ``n_boot`` resamples drawn at once
  from a seeded generator, AUROC of each resample from ranks (Mann-Whitney U, ties averaged), which
  equals ``roc_auc_score``;
* rows whose score is NaN (an undefined CoE trajectory) are dropped and counted in ``n_dropped``;
* a set with fewer than ``min_class`` correct or wrong answers keeps its counts and gets NaN metrics
  rather than a number too noisy to read;
* orientation is never fitted: each score is used as oriented and :func:`below_chance` flags one whose
  flipped version (``-score``, AUROC ``100 - AUROC``) has a 95% interval above 50, i.e. a score that is
  reliably *worse* than chance as oriented (a strong detector read upside down).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["MIN_CLASS", "auroc", "fpr_at_tpr", "aupr", "bootstrap_auroc_ci", "paired_auroc_difference",
           "flipped_interval", "below_chance", "evaluate_score"]

MIN_CLASS = 10


def _xy(correct, score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(correct, dtype=bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"correct ({y.size}) and score ({s.size}) must have one entry per answer")
    return y, s


def auroc(correct, score) -> float:
    """Area under the ROC curve x100 (correct = positive class)."""
    y, s = _xy(correct, score)
    return 100.0 * float(roc_auc_score(y, s))


def fpr_at_tpr(correct, score, tpr: float = 0.95) -> float:
    """False-positive rate x100 at the first threshold where the true-positive rate reaches ``tpr``."""
    y, s = _xy(correct, score)
    fpr, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return 100.0 * float(fpr[np.argmax(tprs >= tpr - 1e-12)])


def aupr(correct, score) -> float:
    """Area under the precision-recall curve x100 (average precision, correct = positive class)."""
    y, s = _xy(correct, score)
    return 100.0 * float(average_precision_score(y, s))


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC x100 of each row: ``pos`` ``[B, n_pos]``, ``neg`` ``[B, n_neg]`` -> ``[B]``."""
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return 100.0 * u / (n_pos * n_neg)


def bootstrap_auroc_ci(correct, score, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                       ) -> tuple[float, float]:
    """Stratified percentile bootstrap interval ``(lo, hi)`` of AUROC x100 (NaN if a class is empty)."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    y, s = _xy(correct, score)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = _auroc_rows(rng.choice(pos, size=(n_boot, pos.size)), rng.choice(neg, size=(n_boot, neg.size)))
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(boots, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_auroc_difference(correct, score_a, score_b, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                            ) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) x100 on the same answers, with a paired stratified bootstrap interval.

    Each resample draws the same answers for both scores, so the interval reflects the difference itself
    (two overlapping single-score intervals do not mean "no difference"). Answers where either score is
    NaN are dropped. Returns ``(difference, lo, hi)``; NaN when a class is empty.
    """
    y, a = _xy(correct, score_a)
    _, b = _xy(correct, score_b)
    keep = ~(np.isnan(a) | np.isnan(b))
    y, a, b = y[keep], a[keep], b[keep]
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ip, ineg = rng.choice(pos, size=(n_boot, pos.size)), rng.choice(neg, size=(n_boot, neg.size))
    boots = _auroc_rows(a[ip], a[ineg]) - _auroc_rows(b[ip], b[ineg])
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(boots, [tail, 100.0 - tail])
    return auroc(y, a) - auroc(y, b), float(lo), float(hi)


def flipped_interval(lo: float, hi: float) -> tuple[float, float]:
    """The AUROC interval of the flipped score ``-s`` from that of ``s``: ``(100 - hi, 100 - lo)``.

    Exact for :func:`bootstrap_auroc_ci` with the same seed: each resample's AUROC of ``-s`` is ``100`` minus
    that of ``s`` (ties count one half either way), so the percentiles swap.
    """
    return 100.0 - hi, 100.0 - lo


def below_chance(lo: float, hi: float, chance: float = 50.0) -> bool:
    """Whether the flipped score's interval lies above ``chance`` (the score as oriented is reliably below it);
    ``False`` when the interval is NaN."""
    flo, _ = flipped_interval(lo, hi)
    return bool(np.isfinite(flo) and flo > chance)


def evaluate_score(correct, score, min_class: int = MIN_CLASS, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric of one score on one set.

    Returns:
        ``n``, ``n_correct``, ``n_wrong`` (after dropping NaN scores), ``n_dropped``, ``AUROC``,
        ``AUROC_lo``, ``AUROC_hi``, ``FPR95``, ``AUPR`` (x100; NaN when a class has < ``min_class`` answers) and
        ``below_chance`` (:func:`below_chance`: the flipped score's interval lies above 50; ``False`` without
        an interval).
    """
    y, s = _xy(correct, score)
    keep = ~np.isnan(s)
    y, s = y[keep], s[keep]
    row = {"n": int(y.size), "n_correct": int(y.sum()), "n_wrong": int((~y).sum()),
           "n_dropped": int((~keep).sum())}
    nan = float("nan")
    if min(row["n_correct"], row["n_wrong"]) < max(1, min_class):
        return {**row, "AUROC": nan, "AUROC_lo": nan, "AUROC_hi": nan, "FPR95": nan, "AUPR": nan,
                "below_chance": False}
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=n_boot, seed=seed)
    return {**row, "AUROC": auroc(y, s), "AUROC_lo": lo, "AUROC_hi": hi, "FPR95": fpr_at_tpr(y, s),
            "AUPR": aupr(y, s), "below_chance": below_chance(lo, hi)}
