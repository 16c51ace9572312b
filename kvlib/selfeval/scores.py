"""Self-evaluation of generated answers (paper section 5): every score of every answer.

:func:`score_records` turns graded answer records (see :func:`kvlib.switching.answers.answer_records`) into one row
per answer holding every score; :mod:`kvlib.selfeval.metrics` evaluates a score (AUROC, FPR95, AUPR), and notebook 03's
Table 2 (:mod:`kvlib.experiments.kv_coe`) puts them together per data set.
Every score is oriented so that larger means "more likely correct" (the positive class):

============================  ====================================================================
score                         definition and orientation
============================  ====================================================================
``MaxProb``                   mean over sampled tokens of the max softmax probability (as is)
``PPL``                       ``1 / PPL = exp(mean log maxprob)``; the original's "PPL" is
                              ``-mean log maxprob``, so this ranks answers identically, reversed
``Entropy``                   ``-mean`` base-2 entropy of the next-token distribution
``Length``                    ``-n_tokens``, minus the answer's generated token count: a control that
                              reads nothing but length. Oriented shorter = more likely correct, fixed in
                              advance (an answer that runs to its budget is unfinished, hence wrong)
``CoE-R`` / ``CoE-C``         original CoE on hidden states (``hidden_traj``: layers of output-token
                              means), as is
``KV-CoE-R/C (V|K|KV)``       CoE over the answer's tokens of layer-averaged cached values, keys or
                              both concatenated (``traj_values``/``traj_keys``), as is
``KV-CoE-R/C (V, prompt+answer)``  the same over the prompt's tokens, then the answer's
                              (``traj_prompt_*`` then ``traj_*``; also K and KV)
``KV-probe``                  out-of-fold probability of "correct" from a logistic regression on the
                              answer's token-mean keys and values (beyond the paper)
``Output-probe``, ``Output+KV``  the same probe on the output statistics and log answer length, and on
                              those plus the KV-CoE scores and pooled keys/values
                              (:mod:`kvlib.selfeval.trained_probes`): what the cache adds beyond length and the
                              output distribution
============================  ====================================================================

Keys are cached after RoPE: a K trajectory rotates with each token's position, so position and answer
length can leak into a K score. The ``Length`` row and ``Output-probe`` (which has length as a feature)
are the controls for that.

CoE rows use ``form="reference"`` (the original CoE code, which the paper's experiments most likely ran);
the same rows with `` [paper]`` use the seed's equations (``alpha = beta = 1``). See :mod:`kvlib.selfeval.coe`.
:data:`METHODS` lists each `` [paper]`` row right after its reference row.
A CoE score is NaN for an undefined trajectory (fewer than 3 points, ...): such answers are dropped from
that row's metrics and counted in ``n_dropped``.

The probe is cross-validated by question: a ``StratifiedGroupKFold`` keeps every answer to one question
in one fold; inside each training fold the L2 strength ``C`` is chosen by a grouped inner CV on AUROC.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .trained_probes import answer_probes, grouped_folds, pooled_kv, probe_scores
from .coe import coe_scores
from ..runs.generation import record_array
from ..runs.records import AnswerRecord, GenerationRecord

__all__ = ["PARTS", "SPANS", "HEADLINE", "METHODS", "KV_COE_VARIANTS", "kv_coe_name", "output_scores",
           "length_score", "kv_coe_scores", "score_records", "kv_probe_features", "grouped_folds", "kv_probe_scores"]

PARTS = {"V": ("values",), "K": ("keys",), "KV": ("keys", "values")}
SPANS = ("answer", "prompt+answer")  # which tokens a KV trajectory runs over
_FORM_SUFFIX = {"reference": "", "paper": " [paper]"}


def kv_coe_name(score: str, part: str, span: str = "answer", form: str = "reference") -> str:
    """Column name of a KV-CoE score: ``kv_coe_name("C", "V", "prompt+answer", "paper")`` is
    ``"KV-CoE-C (V, prompt+answer) [paper]"``; the answer span is the default and not written."""
    where = "" if span == "answer" else f", {span}"
    return f"KV-CoE-{score} ({part}{where}){_FORM_SUFFIX[form]}"


HEADLINE = (["MaxProb", "PPL", "Entropy", "Length", "CoE-R", "CoE-C"]
            + [kv_coe_name(x, part, span) for span in SPANS for part in PARTS for x in "RC"]
            + ["KV-probe", "Output-probe", "Output+KV"])
METHODS = [n for m in HEADLINE for n in ((m, f"{m} [paper]") if "CoE" in m else (m,))]
KV_COE_VARIANTS = [m for m in METHODS if m.startswith("KV-CoE-")]


def output_scores(record: GenerationRecord) -> dict[str, float]:
    """MaxProb, 1/PPL and -Entropy from a record's per-token ``max_prob`` and ``entropy`` (NaN if empty)."""
    mp = np.asarray(record.get("max_prob", []), dtype=np.float64)
    ent = np.asarray(record.get("entropy", []), dtype=np.float64)
    if mp.size == 0:
        return {"MaxProb": np.nan, "PPL": np.nan, "Entropy": np.nan}
    return {"MaxProb": float(mp.mean()),
            "PPL": float(np.exp(np.log(np.clip(mp, 1e-300, 1.0)).mean())),
            "Entropy": float(-ent.mean()) if ent.size else np.nan}


def length_score(record: GenerationRecord) -> float:
    """The ``Length`` control: ``-n_tokens`` (shorter = judged more likely correct)."""
    return -float(record["n_tokens"])


def _traj(record: GenerationRecord, part: str, span: str = "answer") -> np.ndarray:
    """``[T, D]`` answer trajectory, or ``[P + T, D]`` prompt then answer for ``span="prompt+answer"``."""
    names = ("traj_prompt_", "traj_") if span == "prompt+answer" else ("traj_",)
    arrs = [np.concatenate([record_array(record, f"{n}{p}").astype(np.float64) for n in names], axis=0)
            for p in PARTS[part]]
    return np.concatenate(arrs, axis=-1)


def kv_coe_scores(record: GenerationRecord, forms: Sequence[str] = ("reference", "paper"),
                  spans: Sequence[str] = SPANS) -> dict[str, float]:
    """KV-CoE-R/C for parts V, K, KV, each span and each form (see :func:`kv_coe_name`).

    Needs ``traj_keys``/``traj_values``; the ``prompt+answer`` span also ``traj_prompt_keys``/``traj_prompt_values``
    (:func:`kvlib.core.pooling.kv_trajectory_extractor` with ``prompt=True``) and is left out of a record without them.
    """
    bad = set(spans) - set(SPANS)
    if bad:
        raise ValueError(f"unknown span(s) {sorted(bad)}: choose from {SPANS}")
    arrays = record.get("arrays", {})
    out = {}
    for span in spans:
        if span == "prompt+answer" and not {"traj_prompt_keys", "traj_prompt_values"} <= set(arrays):
            continue
        for part in PARTS:
            traj = _traj(record, part, span)
            for form in forms:
                s = coe_scores(traj, form=form)
                out[kv_coe_name("R", part, span, form)] = s["R"]
                out[kv_coe_name("C", part, span, form)] = s["C"]
    return out


def _hidden_coe(record: GenerationRecord, forms: Sequence[str]) -> dict[str, float]:
    traj = record_array(record, "hidden_traj")
    out = {}
    for form in forms:
        s = coe_scores(traj, form=form)
        out[f"CoE-R{_FORM_SUFFIX[form]}"], out[f"CoE-C{_FORM_SUFFIX[form]}"] = s["R"], s["C"]
    return out


def _costs(record: GenerationRecord) -> dict[str, float]:
    ex = record.get("extract_seconds", {})
    arrays = record.get("arrays", {})
    kv_bytes = sum(4 * record_array(record, n).size for n in ("traj_keys", "traj_values") if n in arrays)
    return {"kv_seconds": ex.get("kv", np.nan), "hidden_seconds": ex.get("hidden_coe", np.nan),
            "kv_bytes": kv_bytes if kv_bytes else np.nan,
            "hidden_bytes": (float(record_array(record, "hidden_bytes").reshape(-1)[0])
                             if "hidden_bytes" in arrays else np.nan),
            "gen_seconds": record.get("seconds", np.nan)}


def score_records(records: Sequence[AnswerRecord], forms: Sequence[str] = ("reference", "paper"),
                  probe: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per graded record: ``item_id``, ``correct``, ``n_tokens``, ``finish_reason``, every score
    (in the order of :data:`METHODS`), and the extraction costs (``kv_seconds``, ``hidden_seconds``,
    ``kv_bytes``, ``hidden_bytes``).

    Hidden-state and KV scores are computed when the record holds ``hidden_traj`` / ``traj_*`` arrays (the
    prompt+answer KV-CoE rows when it also holds ``traj_prompt_*``).
    ``probe=True`` adds the cross-validated ``KV-probe`` column (see :func:`kv_probe_scores`).
    """
    rows = []
    for rec in records:
        if "correct" not in rec:
            raise KeyError(f"record {rec.get('item_id')!r} is not graded: "
                           "read answers with kvlib.switching.answers.answer_records")
        arrays = rec.get("arrays", {})
        row = {"item_id": rec["item_id"], "correct": bool(rec["correct"]), "n_tokens": rec["n_tokens"],
               "finish_reason": rec.get("finish_reason"), **output_scores(rec), "Length": length_score(rec)}
        if "hidden_traj" in arrays:
            row.update(_hidden_coe(rec, forms))
        if "traj_values" in arrays and "traj_keys" in arrays:
            row.update(kv_coe_scores(rec, forms))
        rows.append({**row, **_costs(rec)})
    df = pd.DataFrame(rows)
    if probe and len(records) and "KV-CoE-R (V)" in df:
        for name, col in answer_probes(records, df, seed=seed).items():
            df[name] = col
    first = [c for c in ("item_id", "correct", "n_tokens", "finish_reason") if c in df]
    return df[first + [m for m in METHODS if m in df] + [c for c in df if c not in first and c not in METHODS]]


def kv_probe_features(record: GenerationRecord) -> np.ndarray:
    """``[2 * kv_heads * head_dim]``: token-mean of the answer's layer-averaged keys, then values (zeros if empty)."""
    return pooled_kv(record)


def kv_probe_scores(records: Sequence[AnswerRecord], groups: Sequence | None = None, n_splits: int = 5,
                    Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0), seed: int = 0) -> np.ndarray:
    """Out-of-fold P(correct) per record from a standardised logistic regression on :func:`kv_probe_features`
    (:func:`kvlib.selfeval.trained_probes.probe_scores`; groups default to ``item_id``, i.e. folds by question)."""
    X = np.stack([kv_probe_features(r) for r in records])
    y = np.array([bool(r["correct"]) for r in records], dtype=int)
    g = groups if groups is not None else [r["item_id"] for r in records]
    return probe_scores(X, y, g, n_splits=n_splits, Cs=Cs, seed=seed)
