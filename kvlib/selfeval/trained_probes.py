"""Trained self-evaluation probes: does the KV cache add anything to what the output distribution says?

The fixed scores of Table 2 (MaxProb, PPL, entropy, CoE, KV-CoE) need no training. A fairer question for
the KV cache is whether a *trained* reader of it beats a trained reader of the output statistics, on the
same answers and the same folds. Three probes, each an out-of-fold logistic regression (standardised
features, L2 strength chosen by a grouped inner CV on AUROC, folds grouped by question so that no
question is ever on both sides):

================  ===========================================================================================
probe             features per answer
================  ===========================================================================================
``KV-probe``      token-mean of the answer's layer-averaged keys and values ``[2 * kv_heads * head_dim]``
``Output-probe``  MaxProb, log(1/PPL), -Entropy and log(answer length): what the output distribution gives
``Output+KV``     the output features, the KV-CoE scores (R and C on keys, values, both; answer-only and
                  prompt+answer; both forms) and the pooled keys and values
================  ===========================================================================================

``Output+KV`` minus ``Output-probe`` (paired bootstrap) is the value the cache adds on top of the output
statistics *and* the answer's length: the Output-probe has length among its features, so a KV signal that only
tracks how long the answer is (keys are cached after RoPE, so a key trajectory knows positions) adds nothing.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..runs.generation import record_array
from ..runs.records import AnswerRecord, GenerationRecord

__all__ = ["pooled_kv", "output_features", "grouped_folds", "probe_scores", "answer_probes", "OUTPUT_FEATURES"]

OUTPUT_FEATURES = ("MaxProb", "PPL", "Entropy")


def pooled_kv(record: GenerationRecord) -> np.ndarray:
    """``[2 * kv_heads * head_dim]``: token-mean of the answer's layer-averaged keys, then values (zeros if empty)."""
    parts = [record_array(record, f"traj_{p}").astype(np.float64) for p in ("keys", "values")]
    return np.concatenate([p.mean(axis=0) if len(p) else np.zeros(p.shape[-1]) for p in parts])


def output_features(scores: Mapping[str, float], n_tokens: int) -> np.ndarray:
    """``[4]``: MaxProb, log of 1/PPL, -Entropy, log(1 + answer length) (NaN-free: NaN -> 0)."""
    mp, ppl, ent = (float(scores.get(k, np.nan)) for k in OUTPUT_FEATURES)
    x = np.array([mp, np.log(max(ppl, 1e-300)) if np.isfinite(ppl) else np.nan, ent, np.log1p(n_tokens)])
    return np.nan_to_num(x)


def grouped_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int = 0) -> list:
    """``StratifiedGroupKFold`` splits ``[(train, test), ...]`` with every group in one fold; the number of
    folds is cut to the number of groups in the smaller class (``[]`` when that is below 2)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    k = min(n_splits, *(len(set(groups[y == c])) for c in (0, 1)))
    if k < 2:
        return []
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def probe_scores(X: np.ndarray, y: np.ndarray, groups: Sequence, n_splits: int = 5,
                 Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0), seed: int = 0) -> np.ndarray:
    """``[N]`` out-of-fold P(correct) from a standardised logistic regression on ``X`` ``[N, F]``.

    Outer folds: :func:`grouped_folds` over ``groups``; inside each training fold ``C`` is
    picked from ``Cs`` by a grouped 3-fold inner CV on AUROC (the median of ``Cs`` when the fold is too small
    for one). NaN everywhere when a class has fewer than 2 groups.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, g = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=int), np.asarray(groups)
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(g):
        raise ValueError(f"need X [N, F] with one label and one group per row; got X {X.shape}, y {y.shape}, "
                         f"groups {g.shape}")
    out = np.full(len(y), np.nan)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    for train, test in grouped_folds(y, g, n_splits, seed):
        inner = grouped_folds(y[train], g[train], 3, seed)
        if inner:
            model = GridSearchCV(pipe, {"logisticregression__C": list(Cs)}, scoring="roc_auc", cv=inner)
            model.fit(X[train], y[train])
        else:
            model = pipe.set_params(logisticregression__C=float(np.median(Cs))).fit(X[train], y[train])
        out[test] = model.predict_proba(X[test])[:, 1]
    return out


def answer_probes(records: Sequence[AnswerRecord], scores: "pd.DataFrame",  # noqa: F821
                  seed: int = 0) -> dict[str, np.ndarray]:
    """``{"KV-probe", "Output-probe", "Output+KV": [N]}`` out-of-fold scores for graded ``records`` whose
    fixed scores are the rows of ``scores`` (same order: :func:`kvlib.selfeval.scores.score_records`)."""
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} score rows: pass the rows of these records")
    y = np.array([bool(r["correct"]) for r in records], dtype=int)
    groups = [r["item_id"] for r in records]
    kv = np.stack([pooled_kv(r) for r in records])
    out_x = np.stack([output_features(row, n) for row, n in zip(scores.to_dict("records"), scores["n_tokens"])])
    coe_cols = [c for c in scores.columns if c.startswith("KV-CoE-")]
    coe = np.nan_to_num(scores[coe_cols].to_numpy(dtype=np.float64)) if coe_cols else np.zeros((len(y), 0))
    return {"KV-probe": probe_scores(kv, y, groups, seed=seed),
            "Output-probe": probe_scores(out_x, y, groups, seed=seed),
            "Output+KV": probe_scores(np.concatenate([out_x, coe, kv], axis=1), y, groups, seed=seed)}
