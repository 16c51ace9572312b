"""The MTEB classification protocol on local data, and a sweep of the layers and cache parts the KV embedding pools.

Protocol (mteb 2.26, ``mteb/abstasks/classification.py`` ``AbsTaskClassification``; the same in
mteb 1.x ``AbsTaskClassification`` + ``logRegClassificationEvaluator``):

* ``n_experiments = 10`` experiments. In each, the training pool is *undersampled*: a list of pool
  indices is shuffled in place with a fresh ``np.random.RandomState(seed)`` (``seed = 42``, MTEB's
  task seed; the list carries over, so each experiment draws another permutation), then the first
  ``samples_per_label`` indices of each label in that order are kept (8 by default; 32 for
  AmazonCounterfactualClassification; a label with fewer texts keeps them all).
* A ``sklearn.linear_model.LogisticRegression(max_iter=100, random_state=seed)`` (otherwise sklearn
  defaults: L2, ``C=1``, lbfgs) is fitted on the embeddings of those texts, with no scaling, and
  predicts the whole evaluation split.
* Main score: accuracy, averaged over the experiments. MTEB 1.x also reported its spread
  (``accuracy_stderr``, ``np.std``); we report the same population standard deviation.

``tests/test_probe.py`` runs mteb itself on one task with the same embeddings and checks that both
give the same per-experiment accuracies. Only the texts that some experiment samples are embedded
(plus the test split), so a large pool costs nothing extra.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .embedding import Embedder, KVEmbedder, KVPooling, Prefill, embed_all
from .textsets import TextSet

__all__ = ["ProbeConfig", "undersample", "classification_scores", "probe_textset", "run_probe_table",
           "wide_table", "sweep_embedders", "sweep_frame", "layer_sweep", "SWEEP_LAYERS"]

SWEEP_LAYERS = ("first", "middle", "last", "last4", "all")


@dataclass(frozen=True)
class ProbeConfig:
    """MTEB classification settings (see the module docstring for their source).

    Attributes:
        n_experiments: independent draws of the training sample.
        samples_per_label: training texts per label; ``None`` takes each set's MTEB value.
        max_iter: logistic-regression iterations.
        seed: MTEB's task seed (shuffling and the classifier's ``random_state``).
    """

    n_experiments: int = 10
    samples_per_label: int | None = None
    max_iter: int = 100
    seed: int = 42

    def __post_init__(self):
        if self.n_experiments < 1 or self.max_iter < 1:
            raise ValueError("n_experiments and max_iter must be >= 1")
        if self.samples_per_label is not None and self.samples_per_label < 1:
            raise ValueError("samples_per_label must be >= 1 (or None for the set's own value)")


def undersample(labels: Sequence[int], samples_per_label: int, n_experiments: int, seed: int) -> list[list[int]]:
    """Pool indices each experiment trains on, drawn exactly as MTEB's ``_undersample_data``."""
    idxs = list(range(len(labels)))
    draws = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(idxs)
        counter: dict[int, int] = defaultdict(int)
        picked = []
        for i in idxs:
            if counter[labels[i]] < samples_per_label:
                picked.append(i)
                counter[labels[i]] += 1
        draws.append(picked)
    return draws


def classification_scores(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                          samples_per_label: int, config: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """Accuracy of each experiment, ``[n_experiments]``.

    Args:
        train_x: ``[n_pool, D]`` embeddings of the pool (rows no experiment samples are never read).
        train_y: ``[n_pool]`` labels.
        test_x: ``[n_test, D]``; test_y: ``[n_test]``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    scores = []
    for rows in undersample(train_y.tolist(), samples_per_label, config.n_experiments, config.seed):
        clf = LogisticRegression(max_iter=config.max_iter, random_state=config.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(train_x[rows], train_y[rows])
        scores.append(accuracy_score(test_y, clf.predict(test_x)))
    return np.asarray(scores)


def probe_textset(ts: TextSet, embedders: Sequence[Embedder], config: ProbeConfig = ProbeConfig()) -> pd.DataFrame:
    """Probe one set with every embedder (one row per embedder; embedders sharing a prefill share it)."""
    spl = config.samples_per_label or ts.samples_per_label
    draws = undersample(list(ts.train_labels), spl, config.n_experiments, config.seed)
    needed = sorted({i for d in draws for i in d})
    texts = list(dict.fromkeys([ts.train_texts[i] for i in needed] + list(ts.test_texts)))  # unique, ordered
    where = {t: k for k, t in enumerate(texts)}
    embs = embed_all(embedders, texts)
    counts = np.bincount(ts.test_labels, minlength=len(ts.label_names))
    rows = []
    for e in embedders:
        x = embs[e.name]
        train_x = np.full((len(ts.train_texts), x.shape[1]), np.nan, np.float32)
        train_x[needed] = x[[where[ts.train_texts[i]] for i in needed]]
        test_x = x[[where[t] for t in ts.test_texts]]
        scores = classification_scores(train_x, ts.train_labels, test_x, ts.test_labels, spl, config)
        rows.append({
            "set": ts.name, "stands_for": ts.stands_for, "embedder": e.name, "accuracy_mean": scores.mean(),
            "accuracy_std": scores.std(), "scores": [round(float(s), 6) for s in scores], "dim": x.shape[1],
            "n_experiments": config.n_experiments, "samples_per_label": spl, "n_train_pool": len(ts.train_texts),
            "n_train_embedded": len(needed), "n_test": len(ts.test_texts), "n_labels": len(ts.label_names),
            "majority_acc": counts.max() / counts.sum(),
        })
    return pd.DataFrame(rows)


def run_probe_table(textsets: Sequence[TextSet], embedders: Sequence[Embedder], config: ProbeConfig = ProbeConfig(),
                    extra: dict[str, Sequence[Embedder]] | None = None) -> pd.DataFrame:
    """Every set x every embedder, long format (see :func:`probe_textset`); :func:`wide_table` pivots it.

    ``extra`` maps a set name to more embedders probed on that set only, in the same pass (e.g. the
    layer sweep of :func:`sweep_embedders`, which then costs no extra forward pass).
    """
    extra = extra or {}
    unknown = set(extra) - {ts.name for ts in textsets}
    if unknown:
        raise ValueError(f"extra embedders for unknown sets {sorted(unknown)}")
    return pd.concat([probe_textset(ts, [*embedders, *extra.get(ts.name, ())], config) for ts in textsets],
                     ignore_index=True)


def wide_table(long: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """Rows: sets; columns: embedders (in ``columns`` order); cells ``"mean ± std"``."""
    cols = list(columns) if columns else list(dict.fromkeys(long.embedder))
    cell = long.assign(cell=[f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(long.accuracy_mean, long.accuracy_std)])
    wide = cell.pivot(index="set", columns="embedder", values="cell")[cols]
    order = list(dict.fromkeys(long.set))
    wide = wide.loc[order]
    wide.insert(0, "stands for", long.drop_duplicates("set").set_index("set").loc[order, "stands_for"])
    wide.columns.name = None
    return wide


def sweep_embedders(prefill: Prefill, layer_choices: Sequence[str] = SWEEP_LAYERS,
                    parts: Sequence[str] = ("keys", "values", "both"), tokens: str = "mean") -> list[KVEmbedder]:
    """KV embedders for each layer choice x part, named ``"sweep:<layers>/<part>"``."""
    return [KVEmbedder(prefill, KVPooling(layers=lc, part=p, tokens=tokens), name=f"sweep:{lc}/{p}")
            for lc in layer_choices for p in parts]


def _span(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def sweep_frame(long: pd.DataFrame, embedders: Sequence[KVEmbedder]) -> pd.DataFrame:
    """The rows of ``long`` that belong to the sweep ``embedders``.

    Adds ``layers``, ``layer_ids`` and ``part`` columns.
    """
    by_name = {e.name: e for e in embedders}
    out = long[long.embedder.isin(list(by_name))].copy()
    out["layers"] = [str(by_name[n].pooling.layers) for n in out.embedder]
    out["layer_ids"] = [_span(by_name[n].layer_ids) for n in out.embedder]
    out["part"] = [by_name[n].pooling.part for n in out.embedder]
    return out.reset_index(drop=True)


def layer_sweep(ts: TextSet, prefill: Prefill, layer_choices: Sequence[str] = SWEEP_LAYERS,
                parts: Sequence[str] = ("keys", "values", "both"), tokens: str = "mean",
                config: ProbeConfig = ProbeConfig()) -> pd.DataFrame:
    """Probe accuracy of the KV embedding for each layer choice x part, all read from one prefill per text."""
    embedders = sweep_embedders(prefill, layer_choices, parts, tokens)
    return sweep_frame(probe_textset(ts, embedders, config), embedders)
