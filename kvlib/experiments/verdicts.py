"""Verdicts: one row per claim of the paper, read by code from the committed tables of every model.

Each claim gets the evidence measured here (numbers with their 95% intervals, copied from the tables named in the
row) and one of four verdicts, decided by a rule written next to it:

* ``holds``: the paired intervals support the claim (pooled over models, sets and baselines: see :func:`_rule`);
* ``does not hold at this scale``: they contradict it more often than they support it;
* ``mixed``: neither;
* ``not shown at this scale``: (switching) the KV methods are level with the equal-token control, no better;
* ``cannot be tested here`` / ``not measured``: the table that would decide it is missing (with the reason).

The rules read paired differences only (a difference whose interval excludes 0), never a single score, so a
claim is never decided by run-to-run noise of one number. Notebook 06 writes the table for the profile it runs
(``tables/gpu/verdicts.*`` for the ``gpu`` profile); the README copies it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["Verdict", "CLAIMS", "NO_SOURCE", "verdicts", "verdicts_table", "verdicts_markdown", "verdicts_caption",
           "tally", "committed_path"]

HOLDS, FAILS, MIXED, NOT_MEASURED = "holds", "does not hold at this scale", "mixed", "not measured"
NOT_SHOWN = "not shown at this scale"
UNTESTABLE = "cannot be tested here"


@dataclass(frozen=True)
class Verdict:
    """One claim's reading: ``evidence`` is Markdown with numbers copied from ``source`` (table paths)."""

    claim: str
    paper: str
    evidence: str
    verdict: str
    source: str


CLAIMS = {
    "embedding": ("KV embeddings are competitive sentence embeddings",
                  "Table 1: pooled KV cache close to hidden states and embedding models on MTEB classification"),
    "coe_output": ("KV-CoE beats output-based self-evaluation",
                   "Table 2: KV-CoE-C AUROC 84.1 vs MaxProb 12.4 (Qwen2-7B, MATH)"),
    "coe_hidden": ("KV-CoE matches hidden-state CoE",
                   "Table 2: KV-CoE on par with or above CoE-C 76.7 (Qwen2-7B, MATH)"),
    "switching": ("KV switching saves tokens at a small accuracy cost",
                  "Table 3: KV-Generative 5.7x fewer tokens at -3.2 points (Qwen3-8B, MATH-500)"),
    "overhead": ("Near-zero overhead", "reading the cache during decoding costs almost nothing"),
    "memory": ("Memory: the KV cache is free, hidden states are not",
               "Fig. 1: keeping hidden states costs memory the KV cache does not"),
}


def _read(folder: Path, name: str) -> pd.DataFrame | None:
    path = Path(folder) / f"{name}.csv"
    return pd.read_csv(path) if path.exists() else None


def tally(lo: pd.Series, hi: pd.Series) -> tuple[int, int, int]:
    """``(above, below, neither)``: how many paired intervals lie above 0, below 0, or include it."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    above, below = int(((lo > 0) & ok).sum()), int(((hi < 0) & ok).sum())
    return above, below, int(ok.sum()) - above - below


def _rule(above: int, below: int, n: int, claim_is_better: bool = True) -> str:
    """The verdict from the paired intervals of every (model, set, baseline) cell a claim reads, pooled: ``above``
    and ``below`` 0 out of ``n``. ``claim_is_better``: the claim says the difference is > 0 (holds: above on most
    cells and below on none; does not hold: below on more cells than above); else it says "not below 0" (holds:
    below on none; does not hold: below on most)."""
    if n == 0:
        return NOT_MEASURED
    if claim_is_better:
        return HOLDS if above > n / 2 and below == 0 else FAILS if below > above else MIXED
    return HOLDS if below == 0 else FAILS if below > n / 2 else MIXED


def _pool(counts: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    return tuple(int(sum(c[i] for c in counts)) for i in range(3)) if counts else (0, 0, 0)


def _ci(x, lo, hi, scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * x:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _pairs(df: pd.DataFrame, a_col: str, b_col: str, a: str, b: str, value: str, lo: str, hi: str,
           scale: float = 1.0, digits: int = 1) -> tuple[list[str], pd.DataFrame]:
    rows = df[(df[a_col] == a) & (df[b_col] == b)].dropna(subset=[value, lo, hi])
    return [f"{r['set']} {_ci(r[value], r[lo], r[hi], scale, digits)}" for _, r in rows.iterrows()], rows


def _embedding(model: str, folder: Path) -> tuple[tuple[int, int, int], str]:
    diffs = _read(folder, "table1_differences")
    if diffs is None or "a" not in diffs:
        return (0, 0, 0), f"{model}: no whole-split Table 1 yet"
    parts, verdicts = [], []
    for b in ("hidden states", "bag-of-words"):
        cells, rows = _pairs(diffs, "a", "b", "KV cache", b, "accuracy", "accuracy_lo", "accuracy_hi", 100.0)
        above, below, same = tally(rows["accuracy_lo"], rows["accuracy_hi"])
        verdicts.append((above, below, len(rows)))
        parts.append(f"KV − {b}: below on {below}, level on {same}, above on {above} of {len(rows)} sets "
                     f"({'; '.join(cells)} accuracy points)")
    return _pool(verdicts), f"{model}: " + "; ".join(parts)


def _coe(model: str, folder: Path, baselines: tuple[str, ...], score: str = "KV-CoE-C (V)"
         ) -> tuple[tuple[int, int, int], str]:
    diffs = _read(folder, "table2_differences")
    if diffs is None:
        return (0, 0, 0), f"{model}: no Table 2"
    parts, verdicts = [], []
    for b in baselines:
        cells, rows = _pairs(diffs, "score", "baseline", score, b, "AUROC difference", "lo", "hi")
        if rows.empty:
            continue
        above, below, _ = tally(rows["lo"], rows["hi"])
        verdicts.append((above, below, len(rows)))
        parts.append(f"{score} − {b}: above on {above}, below on {below} of {len(rows)} sets ({'; '.join(cells)})")
    best = _read(folder, "table2_best_variant")
    if best is not None and "chosen" in best and len(best):
        chosen = best.loc[best["chosen"].astype(bool), "score"]
        if len(chosen):
            parts.append(f"variant picked on a validation half: {chosen.iloc[0]}")
    if not parts:
        return (0, 0, 0), f"{model}: Table 2 has no {score} vs {', '.join(baselines)} row"
    return _pool(verdicts), f"{model}: " + "; ".join(parts)


def _switching(model: str, folder: Path) -> tuple[str, str]:
    vs = _read(folder, "table3_vs_budget")
    if vs is None:
        return NOT_MEASURED, f"{model}: no equal-token budget curve yet{_versus_random(folder)}"
    kv = vs[vs["method"].isin(["KV-Generative", "KV-Classification"])].dropna(subset=["difference", "lo", "hi"])
    if kv.empty:
        return NOT_MEASURED, f"{model}: no KV method within the budget curve's token range"
    above, below, same = tally(kv["lo"], kv["hi"])
    cells = [f"{r['set']} {r['method']} {_ci(r['difference'], r['lo'], r['hi'])} at {r['mean_tokens']:.0f} tok"
             for _, r in kv.iterrows()]
    verdict = (HOLDS if above > len(kv) / 2 and below == 0 else FAILS if below > len(kv) / 2
               else NOT_SHOWN if above == 0 else MIXED)
    return verdict, (f"{model}: accuracy points vs stopping the answer at the same mean tokens: above on {above}, "
                     f"level on {same}, below on {below} of {len(kv)} ({'; '.join(cells)})"
                     f"{_versus_random(folder)}")


def _versus_random(folder: Path) -> str:
    """``"; ... threshold sweep vs random routing: ..."``: the KV-Classification sweep read against random routing
    (:func:`kvlib.experiments.budget_curve.sweep_vs_random`, from ``table3_pareto_points``), or ``""``."""
    from .budget_curve import sweep_vs_random

    points = _read(folder, "table3_pareto_points")
    found = sweep_vs_random(points) if points is not None else None
    if found is None or found.empty:
        return ""
    counts = "; ".join(f"{r['set']} {r['above']} above, {r['below']} below of {r['sweep points']}"
                       for _, r in found.iterrows())
    return (f"; KV-Classification's threshold sweep vs random routing at the same share of slow answers "
            f"(more than 0.5 points over / under its line): {counts}")


def _overhead(root: Path) -> tuple[str, str]:
    df = _read(root, "overhead")
    if df is None or "ratio_from_costs" not in df:
        return NOT_MEASURED, "no overhead benchmark"
    cells = [f"{r['device']} batch {r['batch']}: {r['ratio_from_costs']:.3f}x" for _, r in df.iterrows()]
    worst = float(df["ratio_from_costs"].min())
    verdict = HOLDS if worst >= 0.98 else MIXED if worst >= 0.9 else FAILS
    return verdict, ("decode throughput with a difficulty check every 32 tokens / without, from timed parts: "
                     + "; ".join(cells))


def _memory(folders: list[Path]) -> tuple[str, str]:
    df = next((d for d in (_read(f, "fig1_vram") for f in folders) if d is not None), None)
    if df is None:
        return NOT_MEASURED, "no Fig. 1 table"
    scale = df[(df["panel"] == "scale") & (df["source"] == "estimate")]
    if scale.empty:
        return NOT_MEASURED, "no Fig. 1 scale panel"
    n = scale["context_length"].max()
    at = scale[scale["context_length"] == n].set_index("quantity")["gb"]
    model = scale["model"].iloc[0]
    measured = df[(df["panel"] == "scale") & df["source"].str.startswith("measured") & (df["context_length"] == n)]
    m = measured.set_index("quantity")["gb"] if len(measured) else pd.Series(dtype=float)
    text = (f"{model} at {n:,} tokens: KV cache {at['kv_cache']:.1f} GB (held by inference anyway), all hidden states "
            f"{at['hidden_states']:.1f} GB more")
    if {"peak", "peak_hidden"} <= set(m.index):
        text += f"; measured peak {m['peak']:.1f} GB without, {m['peak_hidden']:.1f} GB with hidden states"
    return HOLDS, text


NO_SOURCE = "no table yet"  # the ``from`` cell of a claim none of whose tables exists


def committed_path(path: str | Path, repo: str | Path = ".") -> str:
    """Where ``path`` lies in the checkout once its run is published: a file under a ``tables/`` folder (a run's
    stage, ``build/publish/<profile>/<model>/tables/gpu/m/x.csv``, or the checkout's own) is shown as
    ``tables/<the rest>``; any other path relative to ``repo``. A link into a run folder would not exist in the
    repository."""
    path = Path(path)
    for parent in path.parents:
        if parent.name == "tables":
            return (Path("tables") / path.relative_to(parent)).as_posix()
    return Path(os.path.relpath(path, repo)).as_posix()


def verdicts(model_dirs: Mapping[str, Path], root: str | Path = "tables", repo: str | Path = ".") -> list[Verdict]:
    """The verdict of every claim over ``model_dirs`` (model name -> its tables folder); ``root`` holds the
    benchmark tables (``overhead``) and a ``fig1_vram`` to fall back on; ``repo`` is what the ``from`` column's
    paths are relative to."""
    root = Path(root)

    def shown(folder, name):
        return committed_path(Path(folder) / f"{name}.csv", repo)

    out = []
    rows = {
        "embedding": [_embedding(m, f) for m, f in model_dirs.items()],
        "coe_output": [_coe(m, f, ("MaxProb", "Entropy", "Length")) for m, f in model_dirs.items()],
        "coe_hidden": [_coe(m, f, ("CoE-C", "CoE-C [paper]")) for m, f in model_dirs.items()],
        "switching": [_switching(m, f) for m, f in model_dirs.items()],
    }
    tables = {"embedding": "table1_differences", "coe_output": "table2_differences", "coe_hidden": "table2_differences",
              "switching": "table3_vs_budget"}
    better = {"embedding": False, "coe_output": True, "coe_hidden": False}
    for key, results in rows.items():
        if key in better:
            verdict = _rule(*_pool([c for c, _ in results]), claim_is_better=better[key])
        else:
            known = {v for v, _ in results if v != NOT_MEASURED}
            verdict = NOT_MEASURED if not known else known.pop() if len(known) == 1 else MIXED
        evidence = "<br>".join(e for _, e in results)
        if key == "switching":
            verdict = f"{verdict}; the paper's thinking-model setting: {UNTESTABLE}"
            evidence += ("<br>No thinking model installs from the package index here: fast/slow are prompt "
                         "instructions for these instruct models. With a hub: `make reproduce PROFILE=full "
                         "MODEL=Qwen/Qwen3-8B`.")
        read = [f for f in model_dirs.values() if (Path(f) / f"{tables[key]}.csv").exists()]
        source = ", ".join(shown(f, tables[key]) for f in read) or NO_SOURCE  # never a link to a missing table
        out.append(Verdict(*CLAIMS[key], evidence, verdict, source))
    folders = [*model_dirs.values(), root]
    memory_from = next((f for f in folders if (Path(f) / "fig1_vram.csv").exists()), root)
    out.append(Verdict(*CLAIMS["overhead"], _overhead(root)[1], _overhead(root)[0], shown(root, "overhead")))
    out.append(Verdict(*CLAIMS["memory"], _memory(folders)[1], _memory(folders)[0], shown(memory_from, "fig1_vram")))
    return out


def verdicts_table(rows: list[Verdict]) -> pd.DataFrame:
    """One row per claim: claim, the paper's number, the evidence here, the verdict, the tables it reads."""
    return pd.DataFrame([r.__dict__ for r in rows])[["claim", "paper", "evidence", "verdict", "source"]]


def verdicts_markdown(table: pd.DataFrame, caption: str) -> str:
    """The table as Markdown (cells may hold ``<br>``; the tables read are links, relative to the repository
    root as the README shows them), with ``caption`` above it."""
    table = table.assign(source=[src if src == NO_SOURCE else ", ".join(f"[{p}]({p})" for p in str(src).split(", "))
                                 for src in table["source"]])
    shown = table.rename(columns={"claim": "claim", "paper": "the paper", "evidence": "evidence here (95% intervals)",
                                  "verdict": "verdict", "source": "from"})
    return caption + "\n\n" + shown.to_markdown(index=False) + "\n"


def verdicts_caption(profile: str, model_dirs: Mapping[str, Path]) -> str:
    """What the verdicts read: the profile and models, and the rules that decide them."""
    return (f"Verdicts, profile {profile}; models: {', '.join(model_dirs)}. Each verdict pools the paired 95% "
            "intervals of every model, set and baseline a claim reads (tables in the last column). A claim that the "
            "KV score is better (KV-CoE vs output baselines) holds when the intervals lie above 0 on most cells and "
            "below on none, and does not hold when they lie below 0 on more cells than above; a claim that it is not "
            "worse (Table 1 vs hidden states and bag-of-words; KV-CoE vs hidden-state CoE in both forms) holds when "
            "no interval lies below 0 and does not hold when most do; otherwise mixed. Switching is judged against "
            "forced-answer budgets at the same mean token count (not shown = level with them). Table 1 reads the "
            "whole-split protocol.")
