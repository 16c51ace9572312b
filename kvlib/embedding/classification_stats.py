"""Accuracy and macro-F1 of a classifier's test predictions, with bootstrap intervals over test texts.

The style of :mod:`kvlib.selfeval.metrics`: ``n_boot`` resamples drawn at once from a seeded
``np.random.default_rng(seed)``, percentile intervals. Here the resampled unit is a test text (plain, not
stratified), and the scores of every resample come from per-class counts (``np.bincount``), so 1000
resamples of a few thousand texts cost milliseconds.

* Macro-F1 averages the F1 of the labels present in the (whole) test split, a label never predicted
  scoring 0 (scikit-learn's ``f1_score(labels=..., average="macro", zero_division=0)``; the tests check
  that both agree).
* :func:`paired_difference` resamples the same texts for both predictions, so its interval is that of
  the difference itself.
* :func:`majority_scores` is the constant predictor of the test split's largest class: the level every
  representation must beat to say anything about the labels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["macro_f1", "bootstrap_scores", "paired_difference", "majority_scores", "METRICS"]

METRICS = ("accuracy", "macro-F1")


def _arrays(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"need one prediction per test text (got {y.size} labels and {p.size} predictions)")
    return y, p, np.unique(y)


def _rows_scores(y: np.ndarray, p: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro-F1 of each row: ``y``, ``p`` ``[B, n]`` -> ``{metric: [B]}``."""
    acc = (y == p).mean(axis=1)
    f1 = np.zeros(y.shape[0])
    for k in labels:
        yt, pk = y == k, p == k
        tp = (yt & pk).sum(axis=1)
        denom = yt.sum(axis=1) + pk.sum(axis=1)  # 2tp + fp + fn
        f1 += np.divide(2.0 * tp, denom, out=np.zeros_like(f1), where=denom > 0)
    return {"accuracy": acc, "macro-F1": f1 / len(labels)}


def macro_f1(y_true, y_pred) -> float:
    """Macro-F1 over the labels present in ``y_true`` (a label never predicted scores 0)."""
    y, p, labels = _arrays(y_true, y_pred)
    return float(_rows_scores(y[None], p[None], labels)["macro-F1"][0])


def _interval(boots: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(boots, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _resamples(n: int, n_boot: int, level: float, seed: int) -> np.ndarray:
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_scores(y_true, y_pred, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``{"accuracy", "accuracy lo", "accuracy hi", "macro-F1", "macro-F1 lo", "macro-F1 hi"}`` of one
    prediction ``[n_test]``; the intervals are percentile bootstrap intervals over test texts."""
    y, p, labels = _arrays(y_true, y_pred)
    point = _rows_scores(y[None], p[None], labels)
    idx = _resamples(y.size, n_boot, level, seed)
    boots = _rows_scores(y[idx], p[idx], labels)
    out = {}
    for m in METRICS:
        lo, hi = _interval(boots[m], level)
        out.update({m: float(point[m][0]), f"{m} lo": lo, f"{m} hi": hi})
    return out


def paired_difference(y_true, pred_a, pred_b, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                      ) -> dict[str, float]:
    """Score(a) - score(b) on the same test texts, with a paired bootstrap interval, per metric:
    ``{"accuracy", "accuracy lo", "accuracy hi", "macro-F1", ...}`` (each resample draws the same texts for both)."""
    y, a, labels = _arrays(y_true, pred_a)
    _, b, _ = _arrays(y_true, pred_b)
    pa, pb = _rows_scores(y[None], a[None], labels), _rows_scores(y[None], b[None], labels)
    idx = _resamples(y.size, n_boot, level, seed)
    ba, bb = _rows_scores(y[idx], a[idx], labels), _rows_scores(y[idx], b[idx], labels)
    out = {}
    for m in METRICS:
        lo, hi = _interval(ba[m] - bb[m], level)
        out.update({m: float(pa[m][0] - pb[m][0]), f"{m} lo": lo, f"{m} hi": hi})
    return out


def majority_scores(y_true, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """:func:`bootstrap_scores` of the constant prediction of the test split's largest class (ties: lowest id)."""
    y = np.asarray(y_true).ravel()
    if y.size == 0:
        raise ValueError("an empty test split has no majority class")
    values, counts = np.unique(y, return_counts=True)
    return bootstrap_scores(y, np.full_like(y, values[np.argmax(counts)]), n_boot, level, seed)
