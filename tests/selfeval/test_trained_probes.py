"""Trained self-evaluation probes: each reads only its own features, folds group by question, and the
combined probe finds a signal that only the cache carries."""

import numpy as np
import pandas as pd
import pytest

from kvlib.selfeval.trained_probes import answer_probes, output_features, pooled_kv, probe_scores
from kvlib.selfeval.metrics import auroc
from kvlib.selfeval.scores import kv_probe_features, score_records
from kvlib.runs.store import encode_array

D = 6


def _rec(item_id, correct, mp, ent, values, keys):
    arrays = {"traj_values": values.astype(np.float16), "traj_keys": keys.astype(np.float16)}
    return {"item_id": item_id, "correct": correct, "n_tokens": len(values) + 1, "finish_reason": "stop",
            "max_prob": list(mp), "entropy": list(ent), "seconds": 1.0, "extract_seconds": {"kv": 0.001},
            "arrays": {k: encode_array(v) for k, v in arrays.items()}}


def _records(signal_in: str, n: int = 80, seed: int = 0):
    """Answers whose correctness shows only in the output statistics or only in the mean cached values."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        ok = i % 2 == 0
        k = 8
        shift = 0.3 if (signal_in == "output" and ok) else 0.0
        mp = np.clip(rng.normal(0.6 + shift, 0.05, k), 0.01, 1.0)
        ent = np.clip(rng.normal(1.0, 0.2, k), 0.0, None)
        values = rng.normal(size=(k - 1, D)) + (0.8 if (signal_in == "kv" and ok) else 0.0)
        keys = rng.normal(size=(k - 1, D))
        recs.append(_rec(f"q{i}", ok, mp, ent, values, keys))
    return recs


def _auc(recs, s):
    return auroc(np.array([r["correct"] for r in recs]), s) / 100


@pytest.mark.parametrize("signal_in", ["kv", "output"])
def test_each_probe_sees_only_its_features(signal_in):
    recs = _records(signal_in)
    scores = score_records(recs, probe=False)
    probes = answer_probes(recs, scores, seed=0)
    assert set(probes) == {"KV-probe", "Output-probe", "Output+KV"}
    auc = {k: _auc(recs, v) for k, v in probes.items()}
    if signal_in == "kv":
        assert auc["KV-probe"] > 0.9 and auc["Output+KV"] > 0.85 and auc["Output-probe"] < 0.75
    else:
        assert auc["Output-probe"] > 0.9 and auc["Output+KV"] > 0.85 and auc["KV-probe"] < 0.75


def test_pooled_kv_is_the_kv_probe_feature():
    rec = _records("kv", n=2)[0]
    assert np.array_equal(pooled_kv(rec), kv_probe_features(rec))


def test_output_features_are_finite():
    x = output_features({"MaxProb": 0.5, "PPL": float("nan"), "Entropy": -1.0}, 10)
    assert x.shape == (4,) and np.isfinite(x).all() and x[3] == pytest.approx(np.log(11))


def test_folds_keep_a_question_on_one_side():
    groups = np.repeat(np.arange(20), 2)  # two answers per question
    X = np.eye(20)[groups]  # features that identify the question: memorised if a twin were in the training fold
    y = np.repeat(np.arange(20) % 2, 2)
    s = probe_scores(X, y, groups, seed=0)
    assert np.isfinite(s).all() and auroc(y, s) < 75
    leaky = probe_scores(X, y, np.arange(40), seed=0)  # grouping by answer instead: the twin leaks the label
    assert auroc(y, leaky) > 95


def test_probe_scores_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"need X \[N, F\] with one label and one group per row"):
        probe_scores(np.zeros((4, 2)), np.zeros(3), ["a"] * 4)
    with pytest.raises(ValueError, match="3 records but 2 score rows"):
        answer_probes(_records("kv", n=3), pd.DataFrame({"n_tokens": [1, 2]}))


def test_the_output_probe_has_answer_length_among_its_features():
    """Output+KV - Output-probe is measured beyond length: the Output-probe's last feature is log(1 + length)."""
    x = output_features({"MaxProb": 0.5, "PPL": 0.25, "Entropy": -1.0}, n_tokens=99)
    assert x.tolist() == pytest.approx([0.5, np.log(0.25), -1.0, np.log(100.0)])
    assert output_features({"MaxProb": 0.5, "PPL": 0.25, "Entropy": -1.0}, 7)[-1] != x[-1]
