"""Notebook 04's experiment, the fast/slow switch (Table 3): training data, classifier, every method on the same
items, and its tables and figures. Notebook 05 (:mod:`kvlib.experiments.budget_sweep`) shares the set-up.

Flow (notebooks 04 and 05 call these in order):

1. :func:`switching_setup`: the profile's :class:`SwitchingPlan`, the seeded items, and for every set
   :func:`answer_pairs` (graded fast and slow answers, :func:`kvlib.switching.answers.answer_records`, stored once and
   shared
   with notebook 03; each slow record carries the pooled prompt KV sums) and :func:`label_frame` (one row per
   question with the paper's label, :func:`kvlib.switching.difficulty.difficulty_label`, and the prompt features of the
   decision prompt: the slow prompt, see :mod:`kvlib.switching.kv_switch`). The fast answers' cap is picked from the
   training
   split first (:func:`pick_fast_cap`: training fast answers generated with the profile's generous ``fast_tokens``,
   their 98th percentile rounded up, at least the labels' 128 tokens); :func:`cap_shares` reports how many fast and
   slow answers reach their caps.
2. :func:`fit_classifiers`: one MLP per ``(N, L)`` grid point, train / validation split by question text, every
   evaluation question excluded from training (asserted); the point with the lowest validation RMSE is used. Two
   baselines on the same split (a constant, the prompt's length alone) give that RMSE a scale.
3. :func:`evaluate_methods`: every method on the same evaluation items. Rows that are pure routing between
   the stored fast and slow answers (fast, slow, KV-Classification, random at the same slow rate, oracle) are
   computed from those records: greedy decoding does not depend on batch composition, so a live
   KV-Classification run would reproduce them token for token (tested on a tiny model). KV-Generative,
   DEER-style early exit and token budgets change the text mid-answer and run live, and so does the forced-answer
   budget curve, against which every method is compared at its own mean token count
   (:mod:`kvlib.experiments.budget_curve`; :func:`evaluate_switching` also returns the per-item outcomes). A
   DEER-style run in which no trial fired is named for what ran (:meth:`Method.deer`).
4. :func:`caption`, :func:`table3_markdown`, :func:`pareto_figure`, :func:`headline`: Table 3 in the paper's layout.

Tokens are generated tokens per item, injected switch text included; prefill compute (the decision prompt)
and DEER's trial answers are overhead columns, never mixed into the token counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.phases import phase
from ..profiles import check_set_tokens
from ..switching.kv_switch import SwitchConfig, adaptive_generate
from ..switching.difficulty import (PAPER_GRID, SHORT_ANSWER, DifficultyClassifier, FeatureSpec, TrainConfig,
                                    baseline_rmse, cap_records, difficulty_label, fast_cap, question_key,
                                    record_features, split_by_question, train_classifier)
from ..switching.early_exit import EarlyExitConfig, budget_generate, early_exit_generate
from ..runs.generation import GenerationSettings
from ..runs.records import AnswerRecord, GenerationRecord
from ..switching.thinking import protocol_for
from .budget_curve import VS_CURVE, budget_levels, versus_curve
from .labels import Method
from .report import run_label, set_label

__all__ = ["SwitchingPlan", "SwitchingRun", "switching_plan", "switching_setup", "switching_items", "answer_pairs",
           "AnswerPair", "label_frame", "fit_classifiers", "prompt_lengths", "pick_fast_cap", "cap_shares",
           "CAP_SHARES", "CLASSIFIERS", "SwitchingResult", "evaluate_switching", "best_spec", "classifier_quality",
           "classifier_qualities",
           "save_classifier", "route", "method_row", "live_row", "grade", "evaluate_methods", "TABLE3", "PARETO",
           "caption", "table3_markdown", "classifier_table", "pareto_figure", "headline"]

_log = logging.getLogger(__name__)

# one set's graded answers, aligned item by item: (fast records, slow records)
AnswerPair = tuple[list[AnswerRecord], list[AnswerRecord]]


@dataclass(frozen=True)
class SwitchingPlan:
    """Every size and threshold of the switching experiment.

    Attributes:
        train_sets / test_sets: data set -> items (training split / evaluation split).
        set_tokens: data set -> its own budget, for its fast and slow answers and its live runs alike (see
            :meth:`caps`); a set with one is left out of the fast-cap pick.
        fast_tokens / slow_tokens: answer budgets; live runs use ``slow_tokens``. With ``fast_cap_quantile``,
            ``fast_tokens`` is first the generous cap of the training fast answers, and :func:`switching_setup`
            replaces it by the cap it picks from them (:func:`kvlib.switching.difficulty.fast_cap`: that quantile of
            their
            lengths rounded up to 32, at least the labels' 128, at most the generous cap), keeping the generous
            one in ``fast_generous``; ``None`` takes ``fast_tokens`` as it is.
        curve_levels: budgets of the forced-answer budget curve (live; from the fast to the slow mean tokens of
            each set, :mod:`kvlib.experiments.budget_curve`); 0: no curve.
        grid: ``(N tokens, L layers)`` points to train; ``spec``: force one instead of choosing on validation.
        tau, tau_fast, tau_slow, check_every: the paper's switch settings (table rows; chosen a priori).
        class_taus: thresholds of the KV-Classification sweep (from stored records: free).
        generative_sweep: ``(tau, tau_fast, tau_slow)`` points of the live KV-Generative sweep.
        budgets: fixed token budgets (live) besides the curve; early_exit: DEER-style settings (live).
        grid_live_sets: sets where Table 4 runs KV-Generative live (``None``: every evaluation set).
        live_sets: sets where Table 3 runs the live methods (``None``: every evaluation set).
        random_seeds: draws averaged for random routing.
        replay: the live methods replay the stored plain fast/slow answers of the same prompts and decode only
            from where their controller changes them (:mod:`kvlib.runs.replay`: the same records, in a fraction of the
            time); ``False`` decodes every token live.
    """

    train_sets: Mapping[str, int]
    test_sets: Mapping[str, int]
    fast_tokens: int = 64
    slow_tokens: int = 384
    set_tokens: Mapping[str, int] = field(default_factory=dict)
    batch_size: int = 16
    grid: tuple[tuple[int, int], ...] = PAPER_GRID
    spec: tuple[int, int] | None = None
    tau: float = 50.0
    tau_fast: float = 30.0
    tau_slow: float = 70.0
    check_every: int = 32
    class_taus: tuple[float, ...] = tuple(float(t) for t in range(0, 101, 5))
    generative_sweep: tuple[tuple[float, float, float], ...] = ((50.0, 20.0, 70.0), (50.0, 30.0, 70.0),
                                                                (50.0, 45.0, 70.0))
    budgets: tuple[int, ...] = ()
    curve_levels: int = 5
    fast_cap_quantile: float | None = 0.98
    fast_generous: int | None = None
    grid_live_sets: tuple[str, ...] | None = None
    live_sets: tuple[str, ...] | None = None
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.2
    random_seeds: int = 200
    seed: int = 0
    replay: bool = True

    def __post_init__(self):
        if not self.train_sets or not self.test_sets:
            raise ValueError("need at least one training and one evaluation set")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.fast_cap_quantile is not None and not 0 < self.fast_cap_quantile <= 1:
            raise ValueError("fast_cap_quantile must be in (0, 1] (or None: keep fast_tokens)")
        check_set_tokens(self.set_tokens)
        if self.curve_levels and self.curve_levels < 5:
            raise ValueError("the budget curve needs at least 5 levels (curve_levels >= 5; 0 for none)")

    @classmethod
    def from_profile(cls, profile, max_items: int | None = -1, **overrides) -> "SwitchingPlan":
        """Sizes from a :class:`kvlib.profiles.Profile` (its switch sets and budgets), then ``overrides``.

        ``max_items`` caps every evaluation set (the first items of its seeded subset, whose fast and slow
        answers are therefore already stored by notebook 03); the default ``-1`` takes ``profile.live_items``
        (the live methods cost up to a slow answer per item and sweep point), ``None`` no cap.
        """
        cap = profile.live_items if max_items == -1 else max_items
        tests = {k: _capped(k, v, cap) for k, v in profile.switch_test_sets.items()}
        base = dict(train_sets=dict(profile.switch_train_sets), test_sets=tests,
                    fast_tokens=profile.fast_tokens, slow_tokens=profile.slow_tokens,
                    set_tokens=dict(getattr(profile, "set_tokens", {}) or {}), batch_size=profile.batch_size,
                    generative_sweep=tuple(profile.generative_sweep), budgets=tuple(profile.budgets),
                    grid_live_sets=profile.grid_live_sets, live_sets=profile.live_sets)
        return cls(**{**base, **overrides})

    def with_sizes(self, **kw) -> "SwitchingPlan":
        return replace(self, **kw)

    def caps(self, name: str) -> tuple[int, int]:
        """``(fast cap, slow cap)`` of set ``name``: its own budget for both when ``set_tokens`` gives one, else
        ``(fast_tokens, slow_tokens)``."""
        own = self.set_tokens.get(name)
        return (own, own) if own is not None else (self.fast_tokens, self.slow_tokens)

    def generation(self, name: str | None = None) -> GenerationSettings:
        """The live methods' settings: the slow cap of set ``name`` (:meth:`caps`), or ``slow_tokens``."""
        return GenerationSettings(max_new_tokens=self.slow_tokens if name is None else self.caps(name)[1])


def _capped(name: str, n, cap: int | None):
    """``n`` items of evaluation set ``name`` (an int, or ``None`` / ``"all"``) cut at ``cap`` (``None``: no cap)."""
    if not cap:
        return n
    if n not in (None, "all"):
        return min(int(n), cap)
    from ..assets.data import load_math

    try:  # the whole set, capped: its size decides
        return min(len(load_math(name, "test")), cap)
    except (FileNotFoundError, ValueError):  # a set read from DATA_DIR: the selection will say what is missing
        return cap


def grade(record: GenerationRecord, item) -> bool:
    """Whether a live record answers ``item`` (unfinished = wrong), with :func:`kvlib.assets.grading.is_correct`."""
    from ..assets.grading import is_correct

    return bool(is_correct(record["output"], item.answer, item.dataset, finished=record["finish_reason"] == "stop"))


def answer_pairs(model, tokenizer, model_name: str, items_by_set: Mapping[str, Sequence], plan: SwitchingPlan,
                 root=None, progress: bool = True) -> dict[str, AnswerPair]:
    """``{set: (fast records, slow records)}`` in item order (generated once, then read from the store)."""
    from ..switching.answers import answer_records

    out = {}
    for name, items in items_by_set.items():
        fast, slow = (answer_records(model, tokenizer, model_name, name, items, mode=mode, max_new_tokens=budget,
                                     root=root, batch_size=plan.batch_size, progress=progress)
                      for mode, budget in zip(("fast", "slow"), plan.caps(name)))
        out[name] = (fast, slow)
    return out


def label_frame(pairs: Mapping[str, AnswerPair], short: int = SHORT_ANSWER) -> tuple[pd.DataFrame, list[AnswerRecord]]:
    """One row per question: ``set, item_id, question, fast_correct, fast_tokens, slow_correct, slow_tokens, label``;
    and the matching slow records (whose prompt features the classifier reads)."""
    rows, feats = [], []
    for name, (fast, slow) in pairs.items():
        for f, s in zip(fast, slow):
            if f["item_id"] != s["item_id"]:
                raise ValueError(f"fast and slow records of {name} are not aligned ({f['item_id']} vs {s['item_id']})")
            rows.append({"set": name, "item_id": s["item_id"], "question": s["question"],
                         "fast_correct": bool(f["correct"]), "fast_tokens": f["n_tokens"],
                         "slow_correct": bool(s["correct"]), "slow_tokens": s["n_tokens"],
                         "label": difficulty_label(f["correct"], f["n_tokens"], s["correct"], short)})
            feats.append(s)
    return pd.DataFrame(rows), feats


def prompt_lengths(records: Sequence[GenerationRecord], tokenizer=None) -> np.ndarray:
    """``[n]`` length of each record's prompt: tokens with ``tokenizer``, else characters."""
    if tokenizer is None:
        return np.array([len(r["prompt"]) for r in records], float)
    return np.array([len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in records], float)


@phase("classifier fit")
def fit_classifiers(frame: pd.DataFrame, records: Sequence[GenerationRecord], plan: SwitchingPlan,
                    exclude_questions: Sequence[str], tokenizer=None, reuse: str | Path | None = "default"
                    ) -> dict[tuple[int, int], DifficultyClassifier]:
    """One classifier per grid point (or ``plan.spec``), split by question; evaluation questions never enter.

    Each classifier's ``info`` holds the split sizes, validation RMSE and training sets, and ``baseline_rmse``:
    the validation RMSE on the same split of a constant prediction (the training labels' mean) and of a
    regressor of the decision prompt's length alone (:func:`kvlib.switching.difficulty.baseline_rmse`; the length in
    tokens of ``tokenizer``, in characters without one, as ``info["prompt_length_unit"]`` says).

    ``reuse``: the folder of fitted classifiers (``"default"``: ``classifiers/fits/`` of the generation store;
    ``None``: always fit): a fit is stored under a hash of its exact inputs (features, labels, split, grid point,
    training settings, torch version) and read back, so notebook 05 uses 04's classifiers instead of fitting them
    again, and a fresh fit and a reused one are the same file.
    """
    banned = {question_key(q) for q in exclude_questions}
    splits = split_by_question(frame["question"].tolist(), {"train": 1 - plan.val_fraction, "val": plan.val_fraction},
                               seed=plan.seed, exclude=exclude_questions)
    tr, va = splits["train"], splits["val"]
    seen = {question_key(q) for q in frame["question"].iloc[np.concatenate([tr, va])]}
    if seen & banned:
        raise AssertionError("an evaluation question reached the training data")
    y = frame["label"].to_numpy(np.float32)
    lengths = prompt_lengths(records, tokenizer)
    baselines = baseline_rmse(y[tr], y[va], lengths[tr], lengths[va])
    out = {}
    for n_tokens, n_layers in [plan.spec] if plan.spec else plan.grid:
        spec = FeatureSpec(n_tokens, n_layers)
        x = record_features(records, spec)
        info = {"decision_prompt": "slow", "train_sets": sorted(frame["set"].unique()),
                "label_counts": {int(k): int(v) for k, v in frame["label"].iloc[tr].value_counts().items()},
                "baseline_rmse": baselines, "prompt_length_unit": "characters" if tokenizer is None else "tokens"}
        out[(n_tokens, n_layers)] = _fit_or_reuse((x[tr], y[tr], x[va], y[va]), spec, plan.train, info, reuse)
    return out


def _fit_or_reuse(data: tuple[np.ndarray, ...], spec: FeatureSpec, config: TrainConfig, info: dict,
                  reuse: str | Path | None) -> DifficultyClassifier:
    """:func:`~kvlib.switching.difficulty.train_classifier` on ``data`` (x_train, y_train, x_val, y_val), or the
    classifier a fit on the same inputs stored in ``reuse`` (see :func:`fit_classifiers`)."""
    import hashlib
    import json
    import os
    from dataclasses import asdict

    import torch

    if reuse is None:
        return train_classifier(*data, spec, config, info)
    from ..runs.store import default_store_dir

    folder = default_store_dir() / "classifiers" / "fits" if reuse == "default" else Path(reuse)
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "train": asdict(config), "info": info,
                                   "torch": torch.__version__}, sort_keys=True, default=str).encode())
    for a in data:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    path = folder / f"N{spec.n_tokens}-L{spec.n_layers}-{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        try:
            return DifficultyClassifier.load(path)
        except Exception as err:  # noqa: BLE001 -- a damaged file is refitted, never trusted
            _log.warning("fitted classifier %s is unreadable (%s: %s); fitting it again", path.name,
                         type(err).__name__, err)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    train_classifier(*data, spec, config, info).save(tmp)
    os.replace(tmp, path)  # whole or absent
    return DifficultyClassifier.load(path)


def best_spec(classifiers: Mapping[tuple[int, int], DifficultyClassifier]) -> tuple[int, int]:
    """The grid point with the lowest validation RMSE."""
    return min(classifiers, key=lambda k: classifiers[k].info["val_rmse"])


def classifier_quality(classifier: DifficultyClassifier, frame: pd.DataFrame,
                       records: Sequence[GenerationRecord]) -> dict:
    """On evaluation items: RMSE to the label, Spearman rho, and AUROC of d for "the fast answer is wrong"."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    d = classifier.predict(record_features(records, classifier.spec))
    y = frame["label"].to_numpy(float)
    hard = ~frame["fast_correct"].to_numpy(bool)
    return {"n": len(y), "rmse": float(np.sqrt(np.mean((d - y) ** 2))),
            "spearman": float(spearmanr(d, y).statistic) if np.std(y) > 0 and np.std(d) > 0 else float("nan"),
            "auroc_fast_wrong": float(roc_auc_score(hard, d)) if 0 < hard.sum() < len(hard) else float("nan"),
            "mean_d": float(d.mean())}


def route(fast: Sequence[AnswerRecord], slow: Sequence[AnswerRecord], to_slow: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Correctness and tokens per item when item ``i`` takes its slow answer iff ``to_slow[i]``."""
    to_slow = np.asarray(to_slow, bool)
    correct = np.where(to_slow, [s["correct"] for s in slow], [f["correct"] for f in fast]).astype(bool)
    tokens = np.where(to_slow, [s["n_tokens"] for s in slow], [f["n_tokens"] for f in fast]).astype(float)
    return correct, tokens


def method_row(method: str, name: str, correct, tokens, slow_tokens: float, **extra) -> dict:
    """One table row: accuracy, mean generated tokens and their change vs always-slow (percent)."""
    tokens = np.asarray(tokens, float)
    mean = float(tokens.mean())
    return {"method": method, "set": name, "n": len(tokens), "accuracy": float(np.mean(correct)),
            "mean_tokens": mean, "token_change_vs_slow_pct": 100.0 * (mean / slow_tokens - 1.0), **extra}


def live_row(method: str, name: str, items, records: Sequence[GenerationRecord], slow_mean: float, **extra) -> dict:
    """One table row of a live method's records: :func:`method_row` plus the share of items it switched."""
    correct = [grade(r, it) for r, it in zip(records, items)]
    switched = float(np.mean([bool(r["switches"]) for r in records]))
    return method_row(method, name, correct, [r["n_tokens"] for r in records], slow_mean, switched_share=switched,
                      **extra)


def stored_answers(fast: Sequence[AnswerRecord], slow: Sequence[AnswerRecord]
                   ) -> dict[str, dict[str, AnswerRecord]]:
    """``{"fast": {item id: record}, "slow": {...}}``: the stored plain answers the live methods replay."""
    return {"fast": {r["item_id"]: r for r in fast}, "slow": {r["item_id"]: r for r in slow}}


def _sweep(plan: SwitchingPlan) -> list[tuple[float, float, float]]:
    main = (plan.tau, plan.tau_fast, plan.tau_slow)
    return sorted(set(plan.generative_sweep) | {main}, key=lambda p: (p != main, p))


@dataclass(frozen=True)
class SwitchingResult:
    """Every method on the same evaluation items (:func:`evaluate_switching`).

    Attributes:
        table: one row per (method, set) at the a-priori settings (Table 3), with the difference to the budget
            curve (``vs_curve``, ``vs_curve_lo``, ``vs_curve_hi``: accuracy points x100) where it was measured.
        points: every swept point (``method, set, param, accuracy, mean_tokens``) for the Pareto figure; the
            curve's points have method :attr:`Method.BUDGET_CURVE`.
        items: one row per (method, set, item): ``correct`` (0/1; random routing: its expectation over draws) and
            ``tokens``, for the paired comparisons.
        vs_budget: :func:`kvlib.experiments.budget_curve.versus_curve` of ``items``.
    """

    table: pd.DataFrame
    points: pd.DataFrame
    items: pd.DataFrame
    vs_budget: pd.DataFrame


def evaluate_methods(model, tokenizer, model_name: str, test_items: Mapping[str, Sequence],
                     pairs: Mapping[str, AnswerPair], classifier: DifficultyClassifier,
                     plan: SwitchingPlan, root=None, live: bool = True, progress: bool = True
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, pareto)`` of :func:`evaluate_switching` (same arguments)."""
    res = evaluate_switching(model, tokenizer, model_name, test_items, pairs, classifier, plan, root=root, live=live,
                             progress=progress)
    return res.table, res.points


def _item_rows(method: str, name: str, item_ids, correct, tokens, **extra) -> list[dict]:
    return [{"method": method, "set": name, "item_id": i, "correct": float(c), "tokens": float(t), **extra}
            for i, c, t in zip(item_ids, correct, tokens)]


@dataclass
class _Evaluation:
    """What :func:`evaluate_switching` collects, set by set, in table order: table rows, Pareto points and
    per-item outcomes."""

    rows: list[dict] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)
    outcomes: list[dict] = field(default_factory=list)

    def add(self, row: dict, outcomes: list[dict]) -> dict:
        self.rows.append(row)
        self.outcomes += outcomes
        return row

    def point(self, method: str, name: str, param: str, accuracy, mean_tokens) -> None:
        self.points.append({"method": method, "set": name, "param": param, "accuracy": accuracy,
                            "mean_tokens": mean_tokens})


@dataclass(frozen=True)
class _SetAnswers:
    """One evaluation set's stored fast and slow answers and what the rows compare against."""

    name: str
    items: Sequence
    fast: Sequence[AnswerRecord]
    slow: Sequence[AnswerRecord]

    @property
    def ids(self) -> list[str]:
        return [s["item_id"] for s in self.slow]

    @property
    def slow_mean(self) -> float:
        return float(np.mean([s["n_tokens"] for s in self.slow]))

    @property
    def fast_mean(self) -> float:
        return float(np.mean([f["n_tokens"] for f in self.fast]))

    def routed(self, ev: _Evaluation, method: str, to_slow, **extra) -> tuple[np.ndarray, np.ndarray]:
        """Add the row and outcomes of routing item ``i`` to its slow answer iff ``to_slow[i]``."""
        c, t = route(self.fast, self.slow, to_slow)
        ev.add(method_row(method, self.name, c, t, self.slow_mean, **extra),
               _item_rows(method, self.name, self.ids, c, t))
        return c, t


def _fixed_routes(ev: _Evaluation, s: _SetAnswers, plan: SwitchingPlan) -> None:
    """Always fast and always slow: the stored answers themselves."""
    n = len(s.items)
    fast_limit, slow_limit = plan.caps(s.name)
    for method, to_slow, cap in ((Method.FAST, np.zeros(n), fast_limit), (Method.SLOW, np.ones(n), slow_limit)):
        c, t = route(s.fast, s.slow, to_slow)
        ev.add(method_row(method, s.name, c, t, s.slow_mean, slow_share=to_slow.mean(), cap=cap,
                          at_cap_share=float(np.mean(t >= cap))), _item_rows(method, s.name, s.ids, c, t))


def _classification_routes(ev: _Evaluation, s: _SetAnswers, d0: np.ndarray, plan: SwitchingPlan,
                           prefill: float) -> np.ndarray:
    """KV-Classification: its threshold sweep (points) and its row at ``plan.tau``; returns who goes slow."""
    for tau in sorted(set(plan.class_taus) | {plan.tau}):
        c, t = route(s.fast, s.slow, d0 > tau)
        ev.point(Method.KV_CLASSIFICATION, s.name, f"tau={tau:g}", c.mean(), t.mean())
    rate_slow = d0 > plan.tau
    s.routed(ev, Method.KV_CLASSIFICATION, rate_slow, slow_share=rate_slow.mean(), decision_prefill_tokens=prefill,
             tau=plan.tau)
    return rate_slow


def _random_routes(ev: _Evaluation, s: _SetAnswers, k: int, plan: SwitchingPlan) -> None:
    """Random routing of ``k`` items to slow: the mean over ``plan.random_seeds`` draws; per item, the expectation
    over draws (slow with probability ``k / n``)."""
    n = len(s.items)
    rng = np.random.default_rng(plan.seed)
    draws = []
    for _ in range(plan.random_seeds):
        pick = np.zeros(n, bool)
        pick[rng.choice(n, size=k, replace=False)] = True
        draws.append([x.mean() for x in route(s.fast, s.slow, pick)])
    acc, tok = np.mean(draws, axis=0)
    share = k / n
    (fc, ft), (sc, st) = route(s.fast, s.slow, np.zeros(n)), route(s.fast, s.slow, np.ones(n))
    ev.add({**method_row(Method.RANDOM, s.name, [acc], [tok], s.slow_mean), "n": n, "slow_share": share,
            "accuracy_sd": float(np.std([d[0] for d in draws]))},
           _item_rows(Method.RANDOM, s.name, s.ids, share * sc + (1 - share) * fc, share * st + (1 - share) * ft))


def _offline_rows(ev: _Evaluation, s: _SetAnswers, tokenizer, classifier: DifficultyClassifier,
                  plan: SwitchingPlan) -> float:
    """Every offline method of one set (routes between the stored answers); returns the mean prompt length."""
    prefill = float(np.mean([len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in s.slow]))
    d0 = classifier.predict(record_features(s.slow, classifier.spec))
    _fixed_routes(ev, s, plan)
    rate_slow = _classification_routes(ev, s, d0, plan, prefill)
    _random_routes(ev, s, int(rate_slow.sum()), plan)
    oracle = ~np.array([f["correct"] for f in s.fast], bool)
    s.routed(ev, Method.ORACLE, oracle, slow_share=oracle.mean())
    return prefill


def _add_live(ev: _Evaluation, s: _SetAnswers, method: str, recs, **extra) -> dict:
    """The row and per-item outcomes of a live method's records."""
    return ev.add(live_row(method, s.name, s.items, recs, s.slow_mean, **extra),
                  _item_rows(method, s.name, [r["item_id"] for r in recs],
                             [grade(r, it) for r, it in zip(recs, s.items)], [r["n_tokens"] for r in recs],
                             **({"budget": extra["budget"]} if "budget" in extra else {})))


def _live_rows(ev: _Evaluation, s: _SetAnswers, model, tokenizer, classifier: DifficultyClassifier,
               plan: SwitchingPlan, prefill: float, common: dict) -> None:
    """The live methods of one set: the budget curve on every set; KV-Generative's sweep, DEER-style early exit
    and the fixed budgets on ``plan.live_sets``."""
    refs = stored_answers(s.fast, s.slow) if plan.replay else None
    slow_refs = refs and refs["slow"]
    levels = budget_levels(s.fast_mean, s.slow_mean, plan.curve_levels) if plan.curve_levels else []
    for level, b in enumerate(levels, 1):
        with phase("budget curve"):
            recs = budget_generate(model, tokenizer, s.items, b, dataset=s.name, references=slow_refs, **common)
        _add_live(ev, s, Method.curve_level(level), recs, budget=b)
    if plan.live_sets is not None and s.name not in plan.live_sets:
        return
    for tau, tf, ts in _sweep(plan):
        cfg = SwitchConfig.generative(tau, tf, ts, plan.check_every, fast_tokens=plan.caps(s.name)[0])
        with phase("KV-Generative"):
            recs = adaptive_generate(model, tokenizer, s.items, classifier, cfg, dataset=s.name, references=refs,
                                     **common)
        probe = live_row(Method.KV_GENERATIVE, s.name, s.items, recs, s.slow_mean)
        ev.point(Method.KV_GENERATIVE, s.name, f"tau={tau:g},{tf:g},{ts:g}", probe["accuracy"], probe["mean_tokens"])
        if (tau, tf, ts) == (plan.tau, plan.tau_fast, plan.tau_slow):
            _add_live(ev, s, Method.KV_GENERATIVE, recs,
                      slow_share=float(np.mean([r["start_mode"] == "slow" for r in recs])),
                      decision_prefill_tokens=prefill, tau=tau, tau_fast=tf, tau_slow=ts)
    with phase("early exit"):
        recs = early_exit_generate(model, tokenizer, s.items, plan.early_exit, dataset=s.name, references=slow_refs,
                                   **common)
    trial = float(np.mean([r["trial_tokens"] for r in recs]))
    row = _add_live(ev, s, Method.deer(trial, plan.early_exit.think_ratio), recs, trial_tokens=trial,
                    threshold=plan.early_exit.threshold)
    ev.point(row["method"], row["set"], f"p>={plan.early_exit.threshold:g}", row["accuracy"], row["mean_tokens"])
    for b in plan.budgets:
        with phase("token budgets"):
            recs = budget_generate(model, tokenizer, s.items, b, dataset=s.name, references=slow_refs, **common)
        row = _add_live(ev, s, Method.budget(b), recs, budget=b)
        ev.point(Method.TOKEN_BUDGET, s.name, f"B={b}", row["accuracy"], row["mean_tokens"])


def _curve_points(ev: _Evaluation, vs: pd.DataFrame) -> None:
    """The fixed points (fast, slow, oracle, random), then the budget curve as one line (fast, the budget levels,
    slow) on the sets where it ran."""
    for r in ev.rows:
        if r["method"] in (Method.FAST, Method.SLOW, Method.ORACLE, Method.RANDOM):  # fixed points, no sweep
            ev.point(r["method"], r["set"], "", r["accuracy"], r["mean_tokens"])
    curve_sets = set(vs["set"]) | {r["set"] for r in ev.rows if Method.curve_index(r["method"])}
    for r in ev.rows:
        if r["set"] in curve_sets and (r["method"] in (Method.FAST, Method.SLOW) or Method.curve_index(r["method"])):
            ev.point(Method.BUDGET_CURVE, r["set"],
                     f"B={r['budget']:g}" if Method.curve_index(r["method"]) else r["method"],
                     r["accuracy"], r["mean_tokens"])


@phase("switching evaluation")
def evaluate_switching(model, tokenizer, model_name: str, test_items: Mapping[str, Sequence],
                       pairs: Mapping[str, AnswerPair], classifier: DifficultyClassifier,
                       plan: SwitchingPlan, root=None, live: bool = True, progress: bool = True) -> SwitchingResult:
    """Table 3 rows, Pareto points and per-item outcomes for every method on the same evaluation items.

    Offline rows route between the stored answers. The forced-answer budget curve (``plan.curve_levels`` budgets
    from the fast to the slow mean tokens, :func:`kvlib.experiments.budget_curve.budget_levels`) runs live on every
    set, and KV-Generative's sweep, DEER-style early exit and the profile's fixed budgets where the live methods run
    (``plan.live_sets``); ``live=False`` runs nothing live. A DEER-style run in which no trial was decoded
    is named for what ran (:meth:`Method.deer`). See :class:`SwitchingResult`.
    """
    ev = _Evaluation()
    for name, items in test_items.items():
        s = _SetAnswers(name, items, *pairs[name])
        prefill = _offline_rows(ev, s, tokenizer, classifier, plan)
        if live:
            common = dict(model_name=model_name, settings=plan.generation(name), root=root,
                          batch_size=plan.batch_size, progress=progress)
            _live_rows(ev, s, model, tokenizer, classifier, plan, prefill, common)
    items_frame = pd.DataFrame(ev.outcomes)
    table = pd.DataFrame(ev.rows)
    vs = versus_curve(items_frame, seed=plan.seed)
    _curve_points(ev, vs)
    if len(vs):
        keyed = vs.rename(columns={"difference": "vs_curve", "lo": "vs_curve_lo", "hi": "vs_curve_hi"})
        table = table.merge(keyed[["set", "method", "curve_accuracy", "vs_curve", "vs_curve_lo", "vs_curve_hi"]],
                            on=["set", "method"], how="left")
    return SwitchingResult(table, pd.DataFrame(ev.points), items_frame, vs)


def switching_items(sizes: Mapping[str, int], split: str, seed: int = 0, data_dir=None):
    """``{set: items}``: the seeded subset of each set's ``split`` (a set with one split, such as MATH-500, uses
    it), as a :class:`kvlib.assets.data.SelectedSets` from :func:`kvlib.assets.data.select_sets`: an optional set
    without its
    file in ``data_dir`` is left out and listed in ``.skipped`` (the table caption names it); an empty set, a
    size larger than its set and repeated item ids are errors naming the set."""
    from ..assets.data import select_sets

    return select_sets(sizes, split, data_dir, seed)


def switching_plan(profile, seed: int = 0, smoke: bool = False) -> SwitchingPlan:
    """The plan of notebooks 04 and 05: :meth:`SwitchingPlan.from_profile`; ``smoke`` shrinks every live budget
    (check every 8 tokens, one budget of 8, one KV-Generative point, short DEER trials, 20 random draws) so that
    every code path runs in minutes on a CPU."""
    plan = SwitchingPlan.from_profile(profile, seed=seed)
    if smoke:
        plan = plan.with_sizes(check_every=8, budgets=(8,), generative_sweep=((50.0, 30.0, 70.0),),
                               early_exit=EarlyExitConfig(min_gap=8, trial_tokens=4), random_seeds=20)
    return plan


@dataclass(frozen=True)
class SwitchingRun:
    """What notebooks 04 and 05 share (:func:`switching_setup`): the plan, the seeded items, the graded fast and
    slow answers of every training and evaluation set, and one labelled row per question.

    Attributes:
        model_name, profile, hardware: what captions name.
        train_items / test_items: :class:`kvlib.assets.data.SelectedSets` of the training and evaluation splits.
        train_pairs / test_pairs: ``{set: (fast records, slow records)}`` (:func:`answer_pairs`).
        frame / test_frame: :func:`label_frame` of each; train_records / test_records: the matching slow records.
        train_fast_generous: ``{set: fast records}`` of the training split at the generous cap the fast cap was
            picked from (``None`` when the plan keeps its ``fast_tokens``); ``train_pairs`` holds them cut at the
            picked cap (:func:`kvlib.switching.difficulty.cap_records`).
        protocol_form: the thinking protocol's form (:func:`kvlib.switching.thinking.protocol_for`): ``"prompt"`` (fast
        and
            slow are prompt instructions) or ``"native"`` (a thinking model's ``<think>`` tokens).
    """

    model_name: str
    profile: str
    hardware: str
    plan: SwitchingPlan
    train_items: Mapping[str, Sequence]
    test_items: Mapping[str, Sequence]
    train_pairs: Mapping[str, AnswerPair]
    test_pairs: Mapping[str, AnswerPair]
    frame: pd.DataFrame
    train_records: list[AnswerRecord]
    test_frame: pd.DataFrame
    test_records: list[AnswerRecord]
    train_fast_generous: Mapping[str, list[AnswerRecord]] | None = None
    protocol_form: str = "prompt"

    @property
    def evaluation_questions(self) -> list[str]:
        """Every evaluation question's text: none of them may reach the classifier's training data."""
        return self.test_frame["question"].tolist()

    def label_counts(self) -> pd.DataFrame:
        """Questions per label (columns) for each split and set (rows)."""
        labels = pd.concat({"train": self.frame, "evaluation": self.test_frame}, names=["split"]).reset_index(level=0)
        return labels.groupby(["split", "set"])["label"].value_counts().unstack(fill_value=0)

    def cap_shares(self) -> pd.DataFrame:
        """:func:`cap_shares` of this run."""
        return cap_shares(self)

    def caption(self, classifier, what: str, **kwargs) -> str:
        """:func:`caption` for this run (``kwargs``: its ``features`` and ``live``)."""
        return caption(self.model_name, self.profile, self.plan, self.test_items, classifier, what,
                       hardware=self.hardware, form=self.protocol_form, **kwargs)


@phase("switching setup")
def switching_setup(profile, model, tokenizer, seed: int = 0, smoke: bool = False, data_dir=None, root=None,
                    progress: bool = True) -> SwitchingRun:
    """The set-up of notebooks 04 and 05: the profile's :func:`switching_plan`, the seeded items of every
    training and evaluation set (:func:`switching_items`), their graded fast and slow answers (generated once,
    then read from the store; :func:`answer_pairs`) and their labelled rows (:func:`label_frame`). Logs the plan's
    sizes first.

    The fast cap is picked from the training split (:func:`pick_fast_cap`) before any evaluation answer is
    generated: the training fast answers are generated at the profile's generous ``fast_tokens``, the training
    labels read them cut at the picked cap, and the evaluation fast answers are generated at it."""
    plan = switching_plan(profile, seed=seed, smoke=smoke)
    _log.info("%s, %s: train %s, test %s, fast/slow budgets %d/%d%s, grid (N, L) %s", profile.name, profile.model,
              dict(plan.train_sets), dict(plan.test_sets), plan.fast_tokens, plan.slow_tokens,
              "".join(f", {k} {v}/{v}" for k, v in plan.set_tokens.items()), list(plan.grid))
    train_items = switching_items(plan.train_sets, "train", seed=seed, data_dir=data_dir)
    test_items = switching_items(plan.test_sets, "test", seed=seed, data_dir=data_dir)
    train_pairs = answer_pairs(model, tokenizer, profile.model, train_items, plan, root=root, progress=progress)
    generous = None
    if plan.fast_cap_quantile is not None:
        generous = {k: list(fast) for k, (fast, _) in train_pairs.items()}
        plan = pick_fast_cap(plan, generous)
        _log.info("fast cap %d tokens: the %g quantile of %d training fast answers generated with <= %d, rounded up "
                  "to 32, at least %d and at most %d", plan.fast_tokens, plan.fast_cap_quantile,
                  sum(len(v) for v in generous.values()), plan.fast_generous, SHORT_ANSWER, plan.fast_generous)
        train_pairs = {k: (cap_records(fast, plan.caps(k)[0]), slow) for k, (fast, slow) in train_pairs.items()}
    test_pairs = answer_pairs(model, tokenizer, profile.model, test_items, plan, root=root, progress=progress)
    frame, train_records = label_frame(train_pairs)
    test_frame, test_records = label_frame(test_pairs)
    return SwitchingRun(profile.model, profile.name, profile.hardware(), plan, train_items, test_items, train_pairs,
                        test_pairs, frame, train_records, test_frame, test_records, generous,
                        protocol_for(tokenizer).form)


def pick_fast_cap(plan: SwitchingPlan, train_fast: Mapping[str, Sequence[AnswerRecord]]) -> SwitchingPlan:
    """``plan`` with ``fast_tokens`` set to :func:`kvlib.switching.difficulty.fast_cap` of the training fast answers'
    lengths (generated at the plan's ``fast_tokens``, the generous cap, which moves to ``fast_generous``)."""
    if plan.fast_cap_quantile is None:
        return plan
    lengths = [r["n_tokens"] for name, recs in train_fast.items() if name not in plan.set_tokens for r in recs]
    if not lengths:  # every training set has its own budget: there is no shared cap to pick
        return plan
    cap = fast_cap(lengths, plan.fast_cap_quantile, minimum=SHORT_ANSWER, ceiling=plan.fast_tokens)
    return plan.with_sizes(fast_tokens=cap, fast_generous=plan.fast_tokens)


def cap_shares(run: SwitchingRun) -> pd.DataFrame:
    """Per split and set: how many fast and slow answers reach their cap (``n_tokens >= cap``: cut, or ending on
    its last token), as a share. Training rows also give the share at the generous cap the fast cap was picked
    under. The fast cap fits when fewer than 5% of evaluation fast answers reach it."""
    plan = run.plan
    rows = []
    for split, pairs in (("train", run.train_pairs), ("evaluation", run.test_pairs)):
        for name, (fast, slow) in pairs.items():
            ft = np.array([r["n_tokens"] for r in fast], float)
            st = np.array([r["n_tokens"] for r in slow], float)
            fast_limit, slow_limit = plan.caps(name)
            row = {"split": split, "set": name, "n": len(ft), "fast cap": fast_limit,
                   "fast at cap": float(np.mean(ft >= fast_limit)), "fast mean tokens": float(ft.mean()),
                   "slow cap": slow_limit, "slow at cap": float(np.mean(st >= slow_limit)),
                   "slow mean tokens": float(st.mean())}
            if (split == "train" and run.train_fast_generous is not None and plan.fast_generous is not None
                    and name not in plan.set_tokens):
                gen = np.array([r["n_tokens"] for r in run.train_fast_generous[name]], float)
                row.update({"generous fast cap": plan.fast_generous,
                            "fast at generous cap": float(np.mean(gen >= plan.fast_generous))})
            rows.append(row)
    return pd.DataFrame(rows)


def classifier_qualities(classifiers: Mapping[tuple[int, int], DifficultyClassifier], frame: pd.DataFrame,
                         records: Sequence[GenerationRecord]) -> dict[tuple[int, int], dict[str, dict]]:
    """``{grid point: {set: classifier_quality(...)}}`` on the evaluation rows ``frame`` (and their slow
    ``records``, in the same order), set by set."""
    sets = frame["set"].to_numpy()
    return {key: {name: classifier_quality(clf, frame[sets == name], [r for r, s in zip(records, sets) if s == name])
                  for name in dict.fromkeys(sets)} for key, clf in classifiers.items()}


def save_classifier(classifier: DifficultyClassifier, model_name: str, folder=None
                    ) -> tuple[DifficultyClassifier, Path]:
    """Write ``classifier`` to ``folder`` (default: ``classifiers/`` of the generation store) as
    ``<model>-N<tokens>-L<layers>.safetensors`` and read it back: ``(the classifier as saved, its path)``, so that
    the runs use what the file holds."""
    from ..runs.store import default_store_dir

    folder = Path(folder) if folder is not None else default_store_dir() / "classifiers"
    spec = classifier.spec
    path = classifier.save(folder / f"{Path(model_name).name}-N{spec.n_tokens}-L{spec.n_layers}.safetensors")
    return DifficultyClassifier.load(path), path


# --- tables and figures (Table 3 in the paper's layout) -------------------------------------------------------------
# Table 3 cells read ``accuracy / mean tokens (change vs slow)`` as in the paper; the CSV keeps one row per
# (method, set) with every number. The Pareto figure puts every method on one accuracy-vs-tokens plot per set: the
# KV-Classification threshold sweep, the KV-Generative sweep, token budgets, DEER-style early exit, and the fixed
# points (fast, slow, oracle); random routing lies on the dashed fast-slow line in expectation.

TABLE3 = ("Accuracy / mean generated tokens per item (change vs always-slow); each method's accuracy difference to "
          "the forced-answer budget curve at its own mean token count, with a paired bootstrap 95% interval.")
PARETO = ("Every swept point; the forced-answer budget curve (always-fast, the slow answer cut at each budget and "
          "forced to answer, always-slow).")
CLASSIFIERS = ("Difficulty classifiers, one per (N tokens, L layers) point: validation RMSE (difficulty points) beside "
               "two baselines on the same split, a constant (the training labels' mean) and a regressor of the "
               "decision prompt's length alone; then each evaluation set's RMSE, Spearman rho and AUROC of d for "
               "'the fast answer is wrong'.")
CAP_SHARES = ("Share of fast and of slow answers that reach their token cap (n_tokens >= cap), per split and set; "
              "the fast cap fits when fewer than 5% of evaluation fast answers reach it.")


def _skipped(test_items: Mapping, plan, classifier) -> list[str]:
    """``"Label (reason)"`` for every evaluation set the selection skipped and every training set of the plan
    that the classifier never saw (its ``info["train_sets"]``)."""
    out = [f"{set_label(s.name)} ({s.reason})" for s in getattr(test_items, "skipped", ())]
    trained = (getattr(classifier, "info", None) or {}).get("train_sets")
    if trained is not None:
        out += [f"{set_label(k)} (no training items)" for k in plan.train_sets if k not in set(trained)]
    return out


def caption(model_name: str, profile: str, plan, test_items: Mapping, classifier, what: str,
            hardware: str = "", features: bool = True, live: bool = True, form: str = "prompt") -> str:
    """One line: model, profile, sets and sizes, budgets, classifier settings, what the table shows, and the
    sets left out (``test_items.skipped`` from :func:`switching_items`, training sets the classifier did not see).

    ``features=False`` leaves out the classifier's features (a table that compares several); ``live=False`` the
    note on the sets where the live methods ran (``plan.live_sets``). ``form``: the thinking protocol's form; the
    prompt form (a non-thinking model) is named with the text a switch to fast injects."""
    sets = ", ".join(f"{set_label(k)} n={len(v)}" for k, v in test_items.items())
    trained = (getattr(classifier, "info", None) or {}).get("train_sets")
    train = ", ".join(f"{k} {'all' if v in (None, 'all') else v}" for k, v in plan.train_sets.items()
                      if trained is None or k in set(trained))
    spec = classifier.spec
    skipped = _skipped(test_items, plan, classifier)
    note = f" Skipped: {'; '.join(skipped)}." if skipped else ""
    live_sets = getattr(plan, "live_sets", None)
    if live and live_sets is not None:
        note += (f" Live methods ({Method.KV_GENERATIVE}, {Method.DEER}, token budgets) run on "
                 f"{', '.join(set_label(k) for k in live_sets if k in test_items) or 'no set'}; the other sets "
                 "show the offline rows and the budget curve only.")
    feats = f"features: last {spec.n_tokens} tokens x last {spec.n_layers} layers; " if features else ""
    generous = getattr(plan, "fast_generous", None)
    picked = (f" (the {getattr(plan, 'fast_cap_quantile', 0):g} quantile of the training fast answers generated "
              f"with <= {generous}, rounded up to 32, at least {SHORT_ANSWER} and at most {generous})"
              if generous is not None else "")
    own = getattr(plan, "set_tokens", {}) or {}
    own_note = "".join(f" ({set_label(k)}: fast, slow and adaptive <= {v}, its own budget)" for k, v in own.items()
                       if k in test_items or k in plan.train_sets)
    return (f"{run_label(model_name, profile, hardware)}; greedy; fast answers <= {plan.fast_tokens}{picked} and "
            f"slow/adaptive <= {plan.slow_tokens} new tokens{own_note}; {_protocol_note(form)}evaluation sets: "
            f"{sets}; classifier trained on the "
            f"train splits of {train} (split by question, evaluation questions excluded), {feats}"
            f"tau={plan.tau:g}, tau_fast={plan.tau_fast:g}, tau_slow={plan.tau_slow:g}, check every "
            f"{plan.check_every} tokens.{note} {what}")


def _protocol_note(form: str) -> str:
    """What fast and slow are for ``form``: for the prompt form, prompt instructions and the switch-to-fast text
    (:data:`kvlib.switching.thinking.PROMPT`) that a switch injects."""
    from ..switching.thinking import NATIVE, PROMPT

    if form == "prompt":
        return (f"fast and slow are prompt instructions to this non-thinking model and a switch to fast injects "
                f"'{PROMPT.to_fast.strip()}'; ")
    return f"fast and slow are the model's own thinking mode and a switch to fast injects '{NATIVE.to_fast.strip()}'; "


def _order(methods) -> list[str]:
    known = [m for m in Method.TABLE3_ORDER if m in set(methods)]
    rest = set(methods) - set(known)
    return known + sorted(rest, key=lambda m: (Method.budget_tokens(m) is None, Method.budget_tokens(m) or 0,
                                               Method.curve_index(m) or 0, m))


def table3_markdown(table: pd.DataFrame, caption_line: str) -> str:
    """``accuracy / tokens (change vs slow)`` per method (rows) and set (columns), plus overhead notes."""
    sets = list(dict.fromkeys(table["set"]))
    out = pd.DataFrame(index=_order(table["method"].unique()), columns=[set_label(s) for s in sets], dtype=object)
    for _, r in table.iterrows():
        change = "" if r["method"] == Method.SLOW else f" ({r['token_change_vs_slow_pct']:+.1f}%)"
        cell = f"{r['accuracy']:.3f} / {r['mean_tokens']:.0f}{change}"
        if pd.notna(r.get("trial_tokens", np.nan)):
            cell += f" [+{r['trial_tokens']:.0f} trial]"
        if Method.curve_index(r["method"]) is not None:
            cell += f" [B={r['budget']:.0f}]"
        if pd.notna(r.get("at_cap_share", np.nan)):
            cell += f" [{100 * r['at_cap_share']:.1f}% at cap {r['cap']:.0f}]"
        out.loc[r["method"], set_label(r["set"])] = cell
    out.index.name = "method"
    notes = ("Cells: accuracy / mean generated tokens per item (injected switch text included) and the change vs "
             "always-slow. [+k trial]: mean tokens per item that DEER-style trial answers spent (overhead, rolled "
             "back). [x% at cap c]: share of the fast / slow answers that reach their token cap. [B=b]: the "
             "forced-answer budget of a budget-curve level (each set has its own levels, from its fast to its slow "
             "mean tokens). KV methods also prefill the decision prompt once more per item (see the CSV).")
    md = f"{caption_line}\n\n{out.fillna('').to_markdown()}\n\n{notes}\n"
    if "vs_curve" in table and table["vs_curve"].notna().any():
        vs = pd.DataFrame(index=[m for m in out.index if m in set(table.loc[table["vs_curve"].notna(), "method"])],
                          columns=out.columns, dtype=object)
        for _, r in table[table["vs_curve"].notna()].iterrows():
            vs.loc[r["method"], set_label(r["set"])] = (f"{r['vs_curve']:+.1f} [{r['vs_curve_lo']:+.1f}, "
                                                        f"{r['vs_curve_hi']:+.1f}]")
        vs.index.name = "method"
        md += f"\n{vs.fillna('').to_markdown()}\n\n{VS_CURVE}\n"
    return md


def classifier_table(classifiers: Mapping, qualities: Mapping | None = None,
                     chosen: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per grid point: validation RMSE beside the two baselines' on the same split (``constant
    val_rmse``: the training labels' mean; ``prompt-length val_rmse``: a regressor of the prompt's length alone;
    see :func:`fit_classifiers`), epochs, and evaluation-set quality (``qualities`` from
    :func:`classifier_qualities`); with ``chosen``, a column that marks that grid point."""
    rows = []
    for key, clf in classifiers.items():
        base = clf.info.get("baseline_rmse", {})
        row = {"tokens": key[0], "layers": key[1], "train_rows": clf.info["train_rows"],
               "val_rows": clf.info["val_rows"], "val_rmse": clf.info["val_rmse"],
               "constant val_rmse": base.get("constant", np.nan),
               "prompt-length val_rmse": base.get("prompt_length", np.nan), "epochs": clf.info["best_epoch"]}
        for name, q in (qualities or {}).get(key, {}).items():
            row.update({f"{set_label(name)} {k}": v for k, v in q.items() if k != "n"})
        if chosen is not None:
            row["chosen"] = tuple(key) == tuple(chosen)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_figure(points: pd.DataFrame, title: str | None = None):
    """Accuracy vs mean generated tokens, one panel per set, every method on it (``title`` above the panels): the
    forced-answer budget curve (:attr:`Method.BUDGET_CURVE`) and the sweeps as lines, every other method (oracle,
    random routing, DEER-style, the a-priori settings) as points; legends name each method as its table row does."""
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(points["set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    style = {Method.KV_CLASSIFICATION: ("C0", "o", "-"), Method.KV_GENERATIVE: ("C3", "s", "-"),
             Method.TOKEN_BUDGET: ("olive", "v", ""), Method.DEER: ("C4", "D", ""),
             Method.FAST: ("k", "<", ""), Method.SLOW: ("k", ">", ""), Method.ORACLE: ("C1", "*", ""),
             Method.RANDOM: ("grey", "x", ""), Method.BUDGET_CURVE: ("C2", "^", "-")}
    for ax, name in zip(axes[0], sets):
        df = points[points["set"] == name]
        ends = df[df["method"].isin([Method.FAST, Method.SLOW])].sort_values("mean_tokens")
        ax.plot(ends["mean_tokens"], ends["accuracy"], ls="--", c="grey", lw=1,
                label="random routing (expected)")
        for method, sub in df.groupby("method", sort=False):
            c, m, ls = style.get(method, ("C4", "D", "") if Method.is_deer(method) else ("C5", "v", "-"))
            sub = sub.sort_values("mean_tokens")
            ax.plot(sub["mean_tokens"], sub["accuracy"], marker=m, ls=ls or "none", c=c, label=method,
                    ms=9 if m == "*" else 6, lw=1.5)
        ax.set_title(set_label(name))
        ax.set_xlabel("mean generated tokens per item")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    seen = {}  # one legend for every panel: a method drawn on any set is listed (live methods skip some sets)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    axes[0][-1].legend(seen.values(), seen.keys(), fontsize=8, loc="best")
    fig.tight_layout()
    if title:
        fig.suptitle(title, y=1.02)
    return fig


def headline(table: pd.DataFrame,
             methods=(Method.KV_GENERATIVE, Method.KV_CLASSIFICATION, Method.DEER)) -> pd.DataFrame:
    """Per set and method: times fewer tokens than always-slow and the accuracy change in points (x100), and
    (where measured) the difference to the forced-answer budget curve at the method's own tokens. Asking for
    :attr:`Method.DEER` also shows a DEER-style row under the name of what ran (:meth:`Method.deer`)."""
    rows = []
    for name, df in table.groupby("set", sort=False):
        slow = df[df["method"] == Method.SLOW].iloc[0]
        for want in methods:
            hit = df[df["method"].map(Method.is_deer)] if want == Method.DEER else df[df["method"] == want]
            if hit.empty:
                continue
            r = hit.iloc[0]
            m = r["method"]
            extra = ({"vs budget curve (points)": r["vs_curve"], "lo": r["vs_curve_lo"], "hi": r["vs_curve_hi"]}
                     if "vs_curve" in r else {})
            rows.append({"set": set_label(name), "method": m, "slow accuracy": slow["accuracy"],
                         "accuracy": r["accuracy"],
                         "accuracy change (points)": 100 * (r["accuracy"] - slow["accuracy"]),
                         "slow tokens": slow["mean_tokens"], "tokens": r["mean_tokens"],
                         "x fewer tokens": slow["mean_tokens"] / max(r["mean_tokens"], 1e-9), **extra})
    return pd.DataFrame(rows)
