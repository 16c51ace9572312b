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

The second protocol, the **whole training split** (:class:`WholeSplitConfig`, :func:`whole_split_probe`): a
logistic regression fitted on every training text (dense features standardised inside the pipeline), its
regularisation strength ``C`` chosen by stratified k-fold cross-validation on the training split alone
(``GridSearchCV``, log-loss, which favours neither reported metric), refitted on the whole training
split and scored once on the test split, with 95% bootstrap intervals over test texts
(:mod:`kvlib.embedding.classification_stats`). Sets with one split are halved
(:func:`kvlib.embedding.textsets.whole_split`). With
few sampled texts the few-shot score measures the luck of the sample; here the amount of training
data is not the bottleneck.

Both protocols report accuracy and macro-F1, and both take the bag-of-words control
(:class:`kvlib.embedding.embedders.BagOfWords`): its TF-IDF vocabulary is fitted inside each fit, on that fit's
training texts only.

``tests/embedding/test_mteb_classification.py`` runs mteb itself on one task with the same embeddings and checks that
both
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

from ..core.phases import phase
from .embedders import Embedder, KVEmbedder, KVPooling, LayerPooler, PrefillRunner, RecipeEmbedder, embed_all
from .classification_stats import bootstrap_scores, macro_f1, majority_scores, paired_difference
from .textsets import TextSet, whole_split

__all__ = ["ProbeConfig", "WholeSplitConfig", "WholeSplitResult", "undersample", "few_shot_predictions",
           "classification_scores", "whole_split_probe", "probe_textset", "run_probe_table", "differences",
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


def _head(x: np.ndarray, text_features, standardise: bool) -> list:
    """The steps before the classifier: a TF-IDF fitted on the training texts (``x`` holds texts), a scaler
    (dense features, whole-split protocol) or nothing (MTEB's few-shot protocol)."""
    if x.dtype == object:
        if text_features is None:
            raise ValueError("these features are texts: pass the BagOfWords embedder that vectorises them")
        return [text_features.vectorizer()]
    from sklearn.preprocessing import StandardScaler

    return [StandardScaler()] if standardise else []


def few_shot_predictions(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, samples_per_label: int,
                         config: ProbeConfig = ProbeConfig(), text_features=None) -> np.ndarray:
    """Test predictions of each MTEB experiment, ``[n_experiments, n_test]``.

    Args:
        train_x: ``[n_pool, D]`` embeddings of the pool (rows no experiment samples are never read), or the
            pool's texts ``[n_pool]`` (object array) with ``text_features`` the :class:`BagOfWords` that
            vectorises them (fitted on each experiment's sample).
        train_y: ``[n_pool]`` labels; test_x: ``[n_test, D]`` (or texts).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from threadpoolctl import threadpool_limits

    train_y = np.asarray(train_y)
    preds = []
    for rows in undersample(train_y.tolist(), samples_per_label, config.n_experiments, config.seed):
        clf = make_pipeline(*_head(train_x, text_features, standardise=False),
                            LogisticRegression(max_iter=config.max_iter, random_state=config.seed))
        with warnings.catch_warnings(), threadpool_limits(1):  # small fits: threads only contend
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(train_x[rows], train_y[rows])
            preds.append(clf.predict(test_x))
    return np.asarray(preds)


def classification_scores(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                          samples_per_label: int, config: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """Accuracy of each experiment, ``[n_experiments]`` (see :func:`few_shot_predictions`)."""
    preds = few_shot_predictions(train_x, train_y, test_x, samples_per_label, config)
    return (preds == np.asarray(test_y)[None]).mean(axis=1)


@dataclass(frozen=True)
class WholeSplitConfig:
    """The whole-training-split protocol.

    Attributes:
        cs: the grid of inverse regularisation strengths ``C`` cross-validated on the training split.
        folds: stratified folds (fewer when the smallest label has fewer training texts; at least 2).
        scoring: the cross-validation score (scikit-learn name); log-loss favours neither accuracy nor macro-F1.
        max_iter: logistic-regression iterations (lbfgs).
        n_boot / level: bootstrap resamples over test texts and the interval's level.
        seed: fold shuffling and bootstrap seed.
        n_jobs: processes for the cross-validation fits (scikit-learn's ``n_jobs``; 1 on a shared CPU).
    """

    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    folds: int = 5
    scoring: str = "neg_log_loss"
    max_iter: int = 500
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    n_jobs: int = 1

    def __post_init__(self):
        if not self.cs or min(self.cs) <= 0:
            raise ValueError("cs must hold positive values of C")
        if self.folds < 2 or self.max_iter < 1 or self.n_boot < 1 or not 0 < self.level < 1:
            raise ValueError("need folds >= 2, max_iter >= 1, n_boot >= 1 and 0 < level < 1")


@dataclass
class WholeSplitResult:
    """One whole-split fit: ``pred`` ``[n_test]``, the chosen ``C``, the refitted ``model`` (a scikit-learn
    pipeline) and ``scores`` (:func:`kvlib.embedding.classification_stats.bootstrap_scores`)."""

    pred: np.ndarray
    C: float
    model: object
    scores: dict


def whole_split_probe(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                      config: WholeSplitConfig = WholeSplitConfig(), text_features=None) -> WholeSplitResult:
    """Fit on every training text, ``C`` chosen by cross-validation on the training split; score on test.

    ``test_x`` is only predicted and ``test_y`` only scored: neither reaches the choice of ``C`` or the fit.
    Features as in :func:`few_shot_predictions`.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from threadpoolctl import threadpool_limits

    train_y = np.asarray(train_y)
    smallest = int(np.bincount(train_y)[np.unique(train_y)].min())
    if len(np.unique(train_y)) < 2 or smallest < 2:
        raise ValueError("the whole-split probe needs at least 2 training texts of each of 2 or more labels")
    pipe = make_pipeline(*_head(train_x, text_features, standardise=True), LogisticRegression(max_iter=config.max_iter))
    cv = StratifiedKFold(n_splits=min(config.folds, smallest), shuffle=True, random_state=config.seed)
    search = GridSearchCV(pipe, {"logisticregression__C": list(config.cs)}, cv=cv, scoring=config.scoring,
                          n_jobs=config.n_jobs)
    with warnings.catch_warnings(), threadpool_limits(1):  # many small fits: BLAS threads only contend
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(train_x, train_y)
        pred = search.predict(test_x)
    return WholeSplitResult(pred, float(search.best_params_["logisticregression__C"]), search.best_estimator_,
                            bootstrap_scores(test_y, pred, config.n_boot, config.level, config.seed))


def _features(x: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    return x[list(rows)]


def probe_textset(ts: TextSet, embedders: Sequence[Embedder], config: ProbeConfig = ProbeConfig(),
                  whole: WholeSplitConfig | None = None) -> pd.DataFrame:
    """Probe one set with every embedder (one row per embedder; embedders sharing a prefill share it).

    The few-shot (MTEB) protocol always runs: ``accuracy_*`` and ``f1_*`` columns (mean and std over the
    experiments; per-experiment values in ``scores`` / ``f1_scores``). With ``whole``, the whole-split
    protocol runs too: ``whole_accuracy`` / ``whole_f1`` with ``_lo`` / ``_hi`` interval ends, ``whole_C``,
    the split's sizes, the predictions and labels (``whole_pred``, ``whole_true``: what :func:`differences`
    pairs) and the majority class's scores on that test split. Every text is embedded once.
    """
    spl = config.samples_per_label or ts.samples_per_label
    draws = undersample(list(ts.train_labels), spl, config.n_experiments, config.seed)
    needed = sorted({i for d in draws for i in d})
    wts = whole_split(ts) if whole is not None else None
    extra = list(wts.train_texts) + list(wts.test_texts) if wts is not None else []
    texts = list(dict.fromkeys([ts.train_texts[i] for i in needed] + list(ts.test_texts) + extra))  # unique, ordered
    where = {t: k for k, t in enumerate(texts)}
    embs = embed_all(embedders, texts)
    test_y = np.asarray(ts.test_labels)
    counts = np.bincount(test_y, minlength=len(ts.label_names))
    major = np.full_like(test_y, counts.argmax())
    base = {"set": ts.name, "stands_for": ts.stands_for, "n_experiments": config.n_experiments,
            "samples_per_label": spl, "n_train_pool": len(ts.train_texts), "n_train_embedded": len(needed),
            "n_test": len(ts.test_texts), "n_labels": len(ts.label_names), "majority_acc": counts.max() / counts.sum(),
            "majority_f1": macro_f1(test_y, major)}
    if wts is not None:
        maj = majority_scores(wts.test_labels, whole.n_boot, whole.level, whole.seed)
        base.update({"whole_n_train": len(wts.train_texts), "whole_n_test": len(wts.test_texts),
                     "whole_one_split": ts.one_split,
                     **{f"whole_majority_{_KEY[k]}": v for k, v in maj.items()}})
    rows = []
    for e in embedders:
        with phase("layer sweep fit" if e.name.startswith("sweep:") else "probe fit"):
            x = embs[e.name]
            text_features = e if getattr(e, "text_features", False) else None
            pool_x = np.empty(len(ts.train_texts), object) if x.dtype == object else np.full(
                (len(ts.train_texts), x.shape[1]), np.nan, np.float32)
            pool_x[needed] = _features(x, [where[ts.train_texts[i]] for i in needed])
            test_x = _features(x, [where[t] for t in ts.test_texts])
            preds = few_shot_predictions(pool_x, ts.train_labels, test_x, spl, config, text_features)
            acc = (preds == test_y[None]).mean(axis=1)
            f1 = np.asarray([macro_f1(test_y, p) for p in preds])
            row = {**base, "embedder": e.name, "accuracy_mean": acc.mean(), "accuracy_std": acc.std(),
                   "scores": [round(float(a), 6) for a in acc], "f1_mean": f1.mean(), "f1_std": f1.std(),
                   "f1_scores": [round(float(v), 6) for v in f1], "dim": x.shape[1] if x.ndim == 2 else 0}
            if wts is not None:
                res = whole_split_probe(_features(x, [where[t] for t in wts.train_texts]), wts.train_labels,
                                        _features(x, [where[t] for t in wts.test_texts]), wts.test_labels, whole,
                                        text_features)
                row.update({f"whole_{_KEY[k]}": v for k, v in res.scores.items()})
                row.update({"whole_C": res.C, "whole_pred": res.pred.tolist(), "whole_true": list(wts.test_labels)})
            rows.append(row)
    return pd.DataFrame(rows)


# probe_stats' score names -> column suffixes
_KEY = {"accuracy": "accuracy", "accuracy lo": "accuracy_lo", "accuracy hi": "accuracy_hi", "macro-F1": "f1",
        "macro-F1 lo": "f1_lo", "macro-F1 hi": "f1_hi"}


@phase("probe table")
def run_probe_table(textsets: Sequence[TextSet], embedders: Sequence[Embedder], config: ProbeConfig = ProbeConfig(),
                    extra: dict[str, Sequence[Embedder]] | None = None,
                    whole: WholeSplitConfig | None = None) -> pd.DataFrame:
    """Every set x every embedder, long format (see :func:`probe_textset`); :func:`wide_table` pivots it.

    ``extra`` maps a set name to more embedders probed on that set only, in the same pass (e.g. the
    layer sweep of :func:`sweep_embedders`, which then costs no extra forward pass).
    """
    extra = extra or {}
    unknown = set(extra) - {ts.name for ts in textsets}
    if unknown:
        raise ValueError(f"extra embedders for unknown sets {sorted(unknown)}")
    return pd.concat([probe_textset(ts, [*embedders, *extra.get(ts.name, ())], config, whole) for ts in textsets],
                     ignore_index=True)


def differences(long: pd.DataFrame, pairs: Sequence[tuple[str, str]], n_boot: int = 1000, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """Paired whole-split differences ``a - b`` per set and pair, with paired bootstrap intervals over test texts.

    Columns: ``set``, ``a``, ``b``, ``n_test``, then for accuracy and macro-F1 the difference, ``lo`` and
    ``hi`` (``accuracy``, ``accuracy_lo``, ...). Pairs absent from a set are skipped.
    """
    if "whole_pred" not in long:
        raise ValueError("no whole-split predictions: run the probe with a WholeSplitConfig")
    out = []
    for s, g in long.groupby("set", sort=False):
        g = g.set_index("embedder")
        for a, b in pairs:
            if a not in g.index or b not in g.index:
                continue
            d = paired_difference(g.loc[a, "whole_true"], g.loc[a, "whole_pred"], g.loc[b, "whole_pred"], n_boot,
                                  level, seed)
            out.append({"set": s, "a": a, "b": b, "n_test": len(g.loc[a, "whole_true"]),
                        **{_KEY[k]: v for k, v in d.items()}})
    return pd.DataFrame(out)


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


def sweep_embedders(source: PrefillRunner | LayerPooler, layer_choices: Sequence[str] = SWEEP_LAYERS,
                    parts: Sequence[str] = ("keys", "values", "both"), tokens: str = "mean") -> list:
    """KV embedders for each layer choice x part, named ``"sweep:<layers>/<part>"``.

    Given a KV :class:`LayerPooler`, they are :class:`RecipeEmbedder` s derived from its per-layer vectors
    (``tokens`` is then the pooler's); given a :class:`Prefill`, :class:`KVEmbedder` s pooled in its pass.
    """
    if isinstance(source, LayerPooler):
        return [RecipeEmbedder(source, layers=lc, part=p, name=f"sweep:{lc}/{p}") for lc in layer_choices
                for p in parts]
    return [KVEmbedder(source, KVPooling(layers=lc, part=p, tokens=tokens), name=f"sweep:{lc}/{p}")
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


def layer_sweep(ts: TextSet, prefill: PrefillRunner, layer_choices: Sequence[str] = SWEEP_LAYERS,
                parts: Sequence[str] = ("keys", "values", "both"), tokens: str = "mean",
                config: ProbeConfig = ProbeConfig(), whole: WholeSplitConfig | None = None) -> pd.DataFrame:
    """Probe scores of the KV embedding for each layer choice x part, all derived from one prefill per text."""
    embedders = sweep_embedders(LayerPooler(prefill, "kv", tokens), layer_choices, parts)
    return sweep_frame(probe_textset(ts, embedders, config, whole), embedders)
