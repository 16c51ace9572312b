"""Self-evaluation metrics against scikit-learn and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from kvlib.selfeval.metrics import _auroc_rows, aupr, auroc, bootstrap_auroc_ci, evaluate_score, fpr_at_tpr


@pytest.fixture
def noisy():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = y * 0.8 + rng.normal(size=200)
    s[:20] = np.round(s[:20])  # some ties
    return y, s


def test_auroc_and_aupr_match_sklearn(noisy):
    y, s = noisy
    assert auroc(y, s) == pytest.approx(100 * roc_auc_score(y, s))
    assert aupr(y, s) == pytest.approx(100 * average_precision_score(y, s))
    assert 55 < auroc(y, s) < 90


def test_correct_is_the_positive_class():
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.9, 0.8, 0.2, 0.3, 0.1, 0.0])  # correct answers score higher (one swap)
    assert auroc(y, s) == pytest.approx(100 * 8 / 9)
    assert auroc(~y, s) == pytest.approx(100 * 1 / 9)


def test_fpr95_hand_case():
    """20 correct answers scored 1..20, 10 wrong ones scored 0.5, 1.5, ..., 9.5.

    TPR >= 95% needs 19 of the 20 correct answers above the threshold, i.e. threshold 2; the wrong answers
    at or above 2 are 2.5 .. 9.5, eight of ten: FPR95 = 80. At TPR 50% (threshold 11) none: 0.
    """
    pos, neg = np.arange(1, 21, dtype=float), np.arange(10) + 0.5
    y = np.r_[np.ones(20, bool), np.zeros(10, bool)]
    s = np.r_[pos, neg]
    assert fpr_at_tpr(y, s) == pytest.approx(80.0)
    assert fpr_at_tpr(y, s, tpr=0.5) == pytest.approx(0.0)
    assert fpr_at_tpr(y, -s) == pytest.approx(100.0)


def test_ranked_auroc_equals_sklearn_with_ties(noisy):
    y, s = noisy
    got = _auroc_rows(s[y][None], s[~y][None])[0]
    assert got == pytest.approx(100 * roc_auc_score(y, s))


def test_bootstrap_interval(noisy):
    y, s = noisy
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=1000, seed=1)
    assert lo < auroc(y, s) < hi
    assert 5 < hi - lo < 30
    assert (lo, hi) == bootstrap_auroc_ci(y, s, n_boot=1000, seed=1)  # seeded
    assert (lo, hi) != bootstrap_auroc_ci(y, s, n_boot=1000, seed=2)
    # the interval narrows roughly as 1/sqrt(n)
    y4, s4 = np.tile(y, 4), np.tile(s, 4)
    lo4, hi4 = bootstrap_auroc_ci(y4, s4, n_boot=1000, seed=1)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65


def test_perfect_separation():
    y = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    s = np.r_[np.linspace(1, 2, 30), np.linspace(-1, 0, 30)]
    r = evaluate_score(y, s, n_boot=200)
    assert (r["AUROC"], r["AUROC_lo"], r["AUROC_hi"], r["FPR95"], r["AUPR"]) == (100, 100, 100, 0, 100)


def test_small_class_keeps_counts_with_nan_metrics():
    y = np.r_[np.ones(4, bool), np.zeros(40, bool)]
    s = np.arange(44.0)
    r = evaluate_score(y, s, min_class=10)
    assert (r["n"], r["n_correct"], r["n_wrong"]) == (44, 4, 40)
    assert all(math.isnan(r[k]) for k in ("AUROC", "AUROC_lo", "AUROC_hi", "FPR95", "AUPR"))
    assert not math.isnan(evaluate_score(y, s, min_class=4)["AUROC"])


def test_nan_scores_are_dropped_and_counted(noisy):
    y, s = noisy
    s2 = s.copy()
    s2[:7] = np.nan
    r = evaluate_score(y, s2, n_boot=100)
    assert r["n_dropped"] == 7 and r["n"] == 193
    assert r["AUROC"] == pytest.approx(auroc(y[7:], s[7:]))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one entry per answer"):
        auroc([True, False], [0.1, 0.2, 0.3])


def test_paired_difference(noisy):
    from kvlib.selfeval.metrics import paired_auroc_difference

    y, s = noisy
    rng = np.random.default_rng(3)
    worse = s + rng.normal(scale=2.0, size=s.size)
    d, lo, hi = paired_auroc_difference(y, s, worse, n_boot=1000, seed=0)
    assert d == pytest.approx(auroc(y, s) - auroc(y, worse))
    assert lo < d < hi and lo > 0  # a clearly better score: the interval excludes 0
    assert paired_auroc_difference(y, s, s, n_boot=200) == (0.0, 0.0, 0.0)  # identical scores: exactly 0
    assert all(math.isnan(v) for v in paired_auroc_difference(np.ones(5, bool), s[:5], s[:5]))


def test_below_chance_flags_a_reliably_inverted_score_and_nothing_else(noisy):
    """The flipped score's interval is (100 - hi, 100 - lo) exactly; the flag is raised when it lies above 50."""
    from kvlib.selfeval.metrics import below_chance, flipped_interval

    y, s = noisy
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=500, seed=2)
    flo, fhi = bootstrap_auroc_ci(y, -s, n_boot=500, seed=2)  # the flipped score, computed directly
    assert flipped_interval(lo, hi) == (pytest.approx(flo), pytest.approx(fhi))
    assert evaluate_score(y, -s, n_boot=500)["below_chance"]  # built below chance
    assert not evaluate_score(y, s, n_boot=500)["below_chance"]  # above chance
    chance = np.random.default_rng(4).normal(size=len(y))  # no signal: interval straddles 50
    assert not evaluate_score(y, chance, n_boot=500)["below_chance"]
    assert not evaluate_score(y[:15], -s[:15], min_class=10)["below_chance"]  # no interval, no flag
    assert not below_chance(float("nan"), float("nan")) and below_chance(30.0, 49.9) and not below_chance(30, 50.5)
