"""Notebook 04's experiment, the fast/slow switch (Table 3): training data, classifier, every method on the same
items, and its tables and figures. Notebook 05 (:mod:`kvlib.experiments.budget_sweep`) shares the set-up.

Flow (notebooks 04 and 05 call these in order):

1. :func:`switching_setup`: the profile's :class:`SwitchingPlan`, the seeded items, and for every set
   :func:`answer_pairs` (graded fast and slow answers, :func:`kvlib.answers.answer_records`, stored once and shared
   with notebook 03; each slow record carries the pooled prompt KV sums) and :func:`label_frame` (one row per
   question with the paper's label, :func:`kvlib.difficulty.difficulty_label`, and the prompt features of the
   decision prompt: the slow prompt, see :mod:`kvlib.adaptive`).
2. :func:`fit_classifiers`: one MLP per ``(N, L)`` grid point, train / validation split by question text, every
   evaluation question excluded from training (asserted); the point with the lowest validation RMSE is used.
3. :func:`evaluate_methods`: every method on the same evaluation items. Rows that are pure routing between
   the stored fast and slow answers (fast, slow, KV-Classification, random at the same slow rate, oracle) are
   computed from those records: greedy decoding does not depend on batch composition, so a live
   KV-Classification run would reproduce them token for token (tested on a tiny model). KV-Generative,
   DEER-style early exit and token budgets change the text mid-answer and run live.
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

from ..adaptive import SwitchConfig, adaptive_generate
from ..difficulty import (PAPER_GRID, DifficultyClassifier, FeatureSpec, TrainConfig, difficulty_label, question_key,
                          record_features, split_by_question, train_classifier)
from ..early_exit import EarlyExitConfig, budget_generate, early_exit_generate
from ..generation import GenerationSettings
from ..records import AnswerRecord, GenerationRecord
from .labels import Method
from .report import run_label, set_label

__all__ = ["SwitchingPlan", "SwitchingRun", "switching_plan", "switching_setup", "switching_items", "answer_pairs",
           "AnswerPair", "label_frame", "fit_classifiers", "best_spec", "classifier_quality", "classifier_qualities",
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
        fast_tokens / slow_tokens: answer budgets; live runs use ``slow_tokens``.
        grid: ``(N tokens, L layers)`` points to train; ``spec``: force one instead of choosing on validation.
        tau, tau_fast, tau_slow, check_every: the paper's switch settings (table rows; chosen a priori).
        class_taus: thresholds of the KV-Classification sweep (from stored records: free).
        generative_sweep: ``(tau, tau_fast, tau_slow)`` points of the live KV-Generative sweep.
        budgets: token budgets (live); early_exit: DEER-style settings (live).
        grid_live_sets: sets where Table 4 runs KV-Generative live (``None``: every evaluation set).
        live_sets: sets where Table 3 runs the live methods (``None``: every evaluation set).
        random_seeds: draws averaged for random routing.
        replay: the live methods replay the stored plain fast/slow answers of the same prompts and decode only
            from where their controller changes them (:mod:`kvlib.replay`: the same records, in a fraction of the
            time); ``False`` decodes every token live.
    """

    train_sets: Mapping[str, int]
    test_sets: Mapping[str, int]
    fast_tokens: int = 64
    slow_tokens: int = 384
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
    budgets: tuple[int, ...] = (64, 128)
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
                    fast_tokens=profile.fast_tokens, slow_tokens=profile.slow_tokens, batch_size=profile.batch_size,
                    generative_sweep=tuple(profile.generative_sweep), budgets=tuple(profile.budgets),
                    grid_live_sets=profile.grid_live_sets, live_sets=profile.live_sets)
        return cls(**{**base, **overrides})

    def with_sizes(self, **kw) -> "SwitchingPlan":
        return replace(self, **kw)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.slow_tokens)


def _capped(name: str, n, cap: int | None):
    """``n`` items of evaluation set ``name`` (an int, or ``None`` / ``"all"``) cut at ``cap`` (``None``: no cap)."""
    if not cap:
        return n
    if n not in (None, "all"):
        return min(int(n), cap)
    from ..data import load_math

    try:  # the whole set, capped: its size decides
        return min(len(load_math(name, "test")), cap)
    except (FileNotFoundError, ValueError):  # a set read from DATA_DIR: the selection will say what is missing
        return cap


def grade(record: GenerationRecord, item) -> bool:
    """Whether a live record answers ``item`` (unfinished = wrong), with :func:`kvlib.grading.is_correct`."""
    from ..grading import is_correct

    return bool(is_correct(record["output"], item.answer, item.dataset, finished=record["finish_reason"] == "stop"))


def answer_pairs(model, tokenizer, model_name: str, items_by_set: Mapping[str, Sequence], plan: SwitchingPlan,
                 root=None, progress: bool = True) -> dict[str, AnswerPair]:
    """``{set: (fast records, slow records)}`` in item order (generated once, then read from the store)."""
    from ..answers import answer_records

    out = {}
    for name, items in items_by_set.items():
        fast, slow = (answer_records(model, tokenizer, model_name, name, items, mode=mode, max_new_tokens=budget,
                                     root=root, batch_size=plan.batch_size, progress=progress)
                      for mode, budget in (("fast", plan.fast_tokens), ("slow", plan.slow_tokens)))
        out[name] = (fast, slow)
    return out


def label_frame(pairs: Mapping[str, AnswerPair], short: int = 128) -> tuple[pd.DataFrame, list[AnswerRecord]]:
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


def fit_classifiers(frame: pd.DataFrame, records: Sequence[GenerationRecord], plan: SwitchingPlan,
                    exclude_questions: Sequence[str]) -> dict[tuple[int, int], DifficultyClassifier]:
    """One classifier per grid point (or ``plan.spec``), split by question; evaluation questions never enter.

    Each classifier's ``info`` holds the split sizes, validation RMSE and training sets.
    """
    banned = {question_key(q) for q in exclude_questions}
    splits = split_by_question(frame["question"].tolist(), {"train": 1 - plan.val_fraction, "val": plan.val_fraction},
                               seed=plan.seed, exclude=exclude_questions)
    tr, va = splits["train"], splits["val"]
    seen = {question_key(q) for q in frame["question"].iloc[np.concatenate([tr, va])]}
    if seen & banned:
        raise AssertionError("an evaluation question reached the training data")
    y = frame["label"].to_numpy(np.float32)
    out = {}
    for n_tokens, n_layers in [plan.spec] if plan.spec else plan.grid:
        spec = FeatureSpec(n_tokens, n_layers)
        x = record_features(records, spec)
        info = {"decision_prompt": "slow", "train_sets": sorted(frame["set"].unique()),
                "label_counts": {int(k): int(v) for k, v in frame["label"].iloc[tr].value_counts().items()}}
        out[(n_tokens, n_layers)] = train_classifier(x[tr], y[tr], x[va], y[va], spec, plan.train, info)
    return out


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


def live_row(rows: list, method: str, name: str, items, records: Sequence[GenerationRecord], slow_mean: float,
             **extra) -> list:
    correct = [grade(r, it) for r, it in zip(records, items)]
    switched = float(np.mean([bool(r["switches"]) for r in records]))
    rows.append(method_row(method, name, correct, [r["n_tokens"] for r in records], slow_mean,
                           switched_share=switched, **extra))
    return rows


def stored_answers(fast: Sequence[AnswerRecord], slow: Sequence[AnswerRecord]
                   ) -> dict[str, dict[str, AnswerRecord]]:
    """``{"fast": {item id: record}, "slow": {...}}``: the stored plain answers the live methods replay."""
    return {"fast": {r["item_id"]: r for r in fast}, "slow": {r["item_id"]: r for r in slow}}


def _sweep(plan: SwitchingPlan) -> list[tuple[float, float, float]]:
    main = (plan.tau, plan.tau_fast, plan.tau_slow)
    return sorted(set(plan.generative_sweep) | {main}, key=lambda p: (p != main, p))


def evaluate_methods(model, tokenizer, model_name: str, test_items: Mapping[str, Sequence],
                     pairs: Mapping[str, AnswerPair], classifier: DifficultyClassifier,
                     plan: SwitchingPlan, root=None, live: bool = True, progress: bool = True
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 3 rows and Pareto points for every method on the same evaluation items.

    Returns ``(table, pareto)``: ``table`` has one row per (method, set) at the a-priori settings;
    ``pareto`` every swept point (``method, set, param, accuracy, mean_tokens``). ``live=False`` skips
    the live methods (KV-Generative, DEER, budgets).
    """
    rows, points = [], []
    settings = plan.generation()
    common = dict(model_name=model_name, settings=settings, root=root, batch_size=plan.batch_size, progress=progress)
    for name, items in test_items.items():
        fast, slow = pairs[name]
        slow_mean = float(np.mean([s["n_tokens"] for s in slow]))
        prefill = float(np.mean([len(tokenizer(s["prompt"], add_special_tokens=False).input_ids) for s in slow]))
        d0 = classifier.predict(record_features(slow, classifier.spec))
        n = len(items)
        for method, to_slow in ((Method.FAST, np.zeros(n)), (Method.SLOW, np.ones(n))):
            rows.append(method_row(method, name, *route(fast, slow, to_slow), slow_mean, slow_share=to_slow.mean()))
        for tau in sorted(set(plan.class_taus) | {plan.tau}):
            c, t = route(fast, slow, d0 > tau)
            points.append({"method": Method.KV_CLASSIFICATION, "set": name, "param": f"tau={tau:g}",
                           "accuracy": c.mean(), "mean_tokens": t.mean()})
        rate_slow = d0 > plan.tau
        rows.append(method_row(Method.KV_CLASSIFICATION, name, *route(fast, slow, rate_slow), slow_mean,
                               slow_share=rate_slow.mean(), decision_prefill_tokens=prefill, tau=plan.tau))
        rng = np.random.default_rng(plan.seed)
        k = int(rate_slow.sum())
        draws = []
        for _ in range(plan.random_seeds):
            pick = np.zeros(n, bool)
            pick[rng.choice(n, size=k, replace=False)] = True
            draws.append([x.mean() for x in route(fast, slow, pick)])
        acc, tok = np.mean(draws, axis=0)
        rows.append({**method_row(Method.RANDOM, name, [acc], [tok], slow_mean), "n": n,
                     "slow_share": k / n, "accuracy_sd": float(np.std([d[0] for d in draws]))})
        oracle = ~np.array([f["correct"] for f in fast], bool)
        rows.append(method_row(Method.ORACLE, name, *route(fast, slow, oracle), slow_mean,
                               slow_share=oracle.mean()))
        if not live or (plan.live_sets is not None and name not in plan.live_sets):
            continue
        refs = stored_answers(fast, slow) if plan.replay else None
        for tau, tf, ts in _sweep(plan):
            cfg = SwitchConfig.generative(tau, tf, ts, plan.check_every, fast_tokens=plan.fast_tokens)
            recs = adaptive_generate(model, tokenizer, items, classifier, cfg, dataset=name, references=refs,
                                     **common)
            probe = live_row([], Method.KV_GENERATIVE, name, items, recs, slow_mean)[0]
            points.append({"method": Method.KV_GENERATIVE, "set": name, "param": f"tau={tau:g},{tf:g},{ts:g}",
                           "accuracy": probe["accuracy"], "mean_tokens": probe["mean_tokens"]})
            if (tau, tf, ts) == (plan.tau, plan.tau_fast, plan.tau_slow):
                rows.append({**probe, "slow_share": float(np.mean([r["start_mode"] == "slow" for r in recs])),
                             "decision_prefill_tokens": prefill, "tau": tau, "tau_fast": tf, "tau_slow": ts})
        recs = early_exit_generate(model, tokenizer, items, plan.early_exit, dataset=name,
                                   references=refs and refs["slow"], **common)
        live_row(rows, Method.DEER, name, items, recs, slow_mean,
              trial_tokens=float(np.mean([r["trial_tokens"] for r in recs])), threshold=plan.early_exit.threshold)
        points.append({**{k: rows[-1][k] for k in ("method", "set", "accuracy", "mean_tokens")},
                       "param": f"p>={plan.early_exit.threshold:g}"})
        for b in plan.budgets:
            recs = budget_generate(model, tokenizer, items, b, dataset=name, references=refs and refs["slow"],
                                   **common)
            live_row(rows, Method.budget(b), name, items, recs, slow_mean, budget=b)
            points.append({"method": Method.TOKEN_BUDGET, "set": name, "param": f"B={b}",
                           "accuracy": rows[-1]["accuracy"], "mean_tokens": rows[-1]["mean_tokens"]})
    for r in rows:
        if r["method"] in (Method.FAST, Method.SLOW, Method.ORACLE, Method.RANDOM):  # fixed points, no sweep
            points.append({"method": r["method"], "set": r["set"], "param": "", "accuracy": r["accuracy"],
                           "mean_tokens": r["mean_tokens"]})
    return pd.DataFrame(rows), pd.DataFrame(points)


def switching_items(sizes: Mapping[str, int], split: str, seed: int = 0, data_dir=None):
    """``{set: items}``: the seeded subset of each set's ``split`` (a set with one split, such as MATH-500, uses
    it), as a :class:`kvlib.data.SelectedSets` from :func:`kvlib.data.select_sets`: an optional set without its
    file in ``data_dir`` is left out and listed in ``.skipped`` (the table caption names it); an empty set, a
    size larger than its set and repeated item ids are errors naming the set."""
    from ..data import select_sets

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
        train_items / test_items: :class:`kvlib.data.SelectedSets` of the training and evaluation splits.
        train_pairs / test_pairs: ``{set: (fast records, slow records)}`` (:func:`answer_pairs`).
        frame / test_frame: :func:`label_frame` of each; train_records / test_records: the matching slow records.
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

    @property
    def evaluation_questions(self) -> list[str]:
        """Every evaluation question's text: none of them may reach the classifier's training data."""
        return self.test_frame["question"].tolist()

    def label_counts(self) -> pd.DataFrame:
        """Questions per label (columns) for each split and set (rows)."""
        labels = pd.concat({"train": self.frame, "evaluation": self.test_frame}, names=["split"]).reset_index(level=0)
        return labels.groupby(["split", "set"])["label"].value_counts().unstack(fill_value=0)

    def caption(self, classifier, what: str, **kwargs) -> str:
        """:func:`caption` for this run (``kwargs``: its ``features`` and ``live``)."""
        return caption(self.model_name, self.profile, self.plan, self.test_items, classifier, what,
                       hardware=self.hardware, **kwargs)


def switching_setup(profile, model, tokenizer, seed: int = 0, smoke: bool = False, data_dir=None, root=None,
                    progress: bool = True) -> SwitchingRun:
    """The set-up of notebooks 04 and 05: the profile's :func:`switching_plan`, the seeded items of every
    training and evaluation set (:func:`switching_items`), their graded fast and slow answers (generated once,
    then read from the store; :func:`answer_pairs`) and their labelled rows (:func:`label_frame`). Logs the plan's
    sizes first."""
    plan = switching_plan(profile, seed=seed, smoke=smoke)
    _log.info("%s, %s: train %s, test %s, fast/slow budgets %d/%d, grid (N, L) %s", profile.name, profile.model,
              dict(plan.train_sets), dict(plan.test_sets), plan.fast_tokens, plan.slow_tokens, list(plan.grid))
    train_items = switching_items(plan.train_sets, "train", seed=seed, data_dir=data_dir)
    test_items = switching_items(plan.test_sets, "test", seed=seed, data_dir=data_dir)
    train_pairs = answer_pairs(model, tokenizer, profile.model, train_items, plan, root=root, progress=progress)
    test_pairs = answer_pairs(model, tokenizer, profile.model, test_items, plan, root=root, progress=progress)
    frame, train_records = label_frame(train_pairs)
    test_frame, test_records = label_frame(test_pairs)
    return SwitchingRun(profile.model, profile.name, profile.hardware(), plan, train_items, test_items, train_pairs,
                        test_pairs, frame, train_records, test_frame, test_records)


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
    from ..store import default_store_dir

    folder = Path(folder) if folder is not None else default_store_dir() / "classifiers"
    spec = classifier.spec
    path = classifier.save(folder / f"{Path(model_name).name}-N{spec.n_tokens}-L{spec.n_layers}.safetensors")
    return DifficultyClassifier.load(path), path


# --- tables and figures (Table 3 in the paper's layout) -------------------------------------------------------------
# Table 3 cells read ``accuracy / mean tokens (change vs slow)`` as in the paper; the CSV keeps one row per
# (method, set) with every number. The Pareto figure puts every method on one accuracy-vs-tokens plot per set: the
# KV-Classification threshold sweep, the KV-Generative sweep, token budgets, DEER-style early exit, and the fixed
# points (fast, slow, oracle); random routing lies on the dashed fast-slow line in expectation.

TABLE3 = "Accuracy / mean generated tokens per item (change vs always-slow)."
PARETO = "Every swept point."


def _skipped(test_items: Mapping, plan, classifier) -> list[str]:
    """``"Label (reason)"`` for every evaluation set the selection skipped and every training set of the plan
    that the classifier never saw (its ``info["train_sets"]``)."""
    out = [f"{set_label(s.name)} ({s.reason})" for s in getattr(test_items, "skipped", ())]
    trained = (getattr(classifier, "info", None) or {}).get("train_sets")
    if trained is not None:
        out += [f"{set_label(k)} (no training items)" for k in plan.train_sets if k not in set(trained)]
    return out


def caption(model_name: str, profile: str, plan, test_items: Mapping, classifier, what: str,
            hardware: str = "", features: bool = True, live: bool = True) -> str:
    """One line: model, profile, sets and sizes, budgets, classifier settings, what the table shows, and the
    sets left out (``test_items.skipped`` from :func:`switching_items`, training sets the classifier did not see).

    ``features=False`` leaves out the classifier's features (a table that compares several); ``live=False`` the
    note on the sets where the live methods ran (``plan.live_sets``)."""
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
                 "show the offline rows only.")
    feats = f"features: last {spec.n_tokens} tokens x last {spec.n_layers} layers; " if features else ""
    return (f"{run_label(model_name, profile, hardware)}; greedy; fast answers <= {plan.fast_tokens} and "
            f"slow/adaptive <= {plan.slow_tokens} new tokens; evaluation sets: {sets}; classifier trained on the "
            f"train splits of {train} (split by question, evaluation questions excluded), {feats}"
            f"tau={plan.tau:g}, tau_fast={plan.tau_fast:g}, tau_slow={plan.tau_slow:g}, check every "
            f"{plan.check_every} tokens.{note} {what}")


def _order(methods) -> list[str]:
    known = [m for m in Method.TABLE3_ORDER if m in set(methods)]
    rest = set(methods) - set(known)
    return known + sorted(rest, key=lambda m: (Method.budget_tokens(m) is None, Method.budget_tokens(m) or 0, m))


def table3_markdown(table: pd.DataFrame, caption_line: str) -> str:
    """``accuracy / tokens (change vs slow)`` per method (rows) and set (columns), plus overhead notes."""
    sets = list(dict.fromkeys(table["set"]))
    out = pd.DataFrame(index=_order(table["method"].unique()), columns=[set_label(s) for s in sets], dtype=object)
    for _, r in table.iterrows():
        change = "" if r["method"] == Method.SLOW else f" ({r['token_change_vs_slow_pct']:+.1f}%)"
        cell = f"{r['accuracy']:.3f} / {r['mean_tokens']:.0f}{change}"
        if pd.notna(r.get("trial_tokens", np.nan)):
            cell += f" [+{r['trial_tokens']:.0f} trial]"
        out.loc[r["method"], set_label(r["set"])] = cell
    out.index.name = "method"
    notes = ("Cells: accuracy / mean generated tokens per item (injected switch text included) and the change vs "
             "always-slow. [+k trial]: mean tokens per item that DEER-style trial answers spent (overhead, rolled "
             "back). KV methods also prefill the decision prompt once more per item (see the CSV).")
    return f"{caption_line}\n\n{out.fillna('').to_markdown()}\n\n{notes}\n"


def classifier_table(classifiers: Mapping, qualities: Mapping | None = None,
                     chosen: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per grid point: validation RMSE, epochs, and evaluation-set quality (``qualities`` from
    :func:`classifier_qualities`); with ``chosen``, a column that marks that grid point."""
    rows = []
    for key, clf in classifiers.items():
        row = {"tokens": key[0], "layers": key[1], "train_rows": clf.info["train_rows"],
               "val_rows": clf.info["val_rows"], "val_rmse": clf.info["val_rmse"], "epochs": clf.info["best_epoch"]}
        for name, q in (qualities or {}).get(key, {}).items():
            row.update({f"{set_label(name)} {k}": v for k, v in q.items() if k != "n"})
        if chosen is not None:
            row["chosen"] = tuple(key) == tuple(chosen)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_figure(points: pd.DataFrame, title: str | None = None):
    """Accuracy vs mean generated tokens, one panel per set, every method on it (``title`` above the panels)."""
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(points["set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    style = {Method.KV_CLASSIFICATION: ("C0", "o", "-"), Method.KV_GENERATIVE: ("C3", "s", "-"),
             Method.TOKEN_BUDGET: ("C2", "^", "-"), Method.DEER: ("C4", "D", ""),
             Method.FAST: ("k", "<", ""), Method.SLOW: ("k", ">", ""), Method.ORACLE: ("C1", "*", ""),
             Method.RANDOM: ("grey", "x", "")}
    for ax, name in zip(axes[0], sets):
        df = points[points["set"] == name]
        ends = df[df["method"].isin([Method.FAST, Method.SLOW])].sort_values("mean_tokens")
        ax.plot(ends["mean_tokens"], ends["accuracy"], ls="--", c="grey", lw=1,
                label="random routing (expected)")
        for method, sub in df.groupby("method", sort=False):
            c, m, ls = style.get(method, ("C5", "v", "-"))
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
    """Per set and method: times fewer tokens than always-slow and the accuracy change in points (x100)."""
    rows = []
    for name, df in table.groupby("set", sort=False):
        slow = df[df["method"] == Method.SLOW].iloc[0]
        for m in methods:
            hit = df[df["method"] == m]
            if hit.empty:
                continue
            r = hit.iloc[0]
            rows.append({"set": set_label(name), "method": m, "slow accuracy": slow["accuracy"],
                         "accuracy": r["accuracy"],
                         "accuracy change (points)": 100 * (r["accuracy"] - slow["accuracy"]),
                         "slow tokens": slow["mean_tokens"], "tokens": r["mean_tokens"],
                         "x fewer tokens": slow["mean_tokens"] / max(r["mean_tokens"], 1e-9)})
    return pd.DataFrame(rows)
