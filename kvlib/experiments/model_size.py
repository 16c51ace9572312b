"""Notebook 06's experiment, the model-size axis: the same tables of several models side by side, read from their
result folders.

A profile with a ``results_dir`` (``gpu``) writes each model's tables to ``tables/<results_dir>/<model>/``
(:meth:`kvlib.profiles.Profile.output_dirs`); this module reads every such folder and lines the models up:
Table 1 (accuracy per set and embedder), Table 2 (AUROC with its interval per set and score) and Table 3
(accuracy / mean generated tokens per set and method). Models are ordered by parameter count when the
name says it (``0.5b`` < ``1.5b`` < ``8B``), else by name. Nothing is recomputed: every number is copied
from a table that a notebook wrote, and a missing table or model is simply absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .budget_curve import VS_RANDOM
from .labels import Method
from .report import flat_columns, set_label

__all__ = ["model_dirs", "table1_by_model", "table1_readings", "table2_by_model", "differences_by_model",
           "table3_by_model", "sweep_vs_random_by_model", "size_figure", "caption", "flat_table", "KEY_COMPARISONS",
           "CAPTIONS"]

TABLE2_SCORES = ("MaxProb", "PPL", "Entropy", "Length", "CoE-C", "CoE-C [paper]", "KV-CoE-R (V)", "KV-CoE-C (V)",
                 "KV-CoE-C (K)", "KV-CoE-C (V, prompt+answer)", "KV-probe", "Output-probe", "Output+KV")
KEY_COMPARISONS = (("Output+KV", "Output-probe"), ("KV-probe", "Output-probe"), ("KV-probe", "MaxProb"),
                   ("KV-CoE-C (V)", "MaxProb"), ("KV-CoE-C (V)", "Length"), ("KV-CoE-C (V)", "CoE-C"),
                   ("KV-CoE-C (V)", "CoE-C [paper]"))
# what each of notebook 06's tables shows, after the caption's profile and models
CAPTIONS = {"table1": "Table 1: accuracy per representation, few-shot (MTEB, mean) and whole split.",
            "table1_readings": "Table 1, read per model and protocol from its committed tables (accuracy / macro-F1; "
                               "the paired whole-split intervals are in each model's table1_differences).",
            "table2": "Table 2: AUROC x100 [95% CI].",
            "differences": "AUROC differences x100 with paired bootstrap 95% intervals.",
            "table3": "Table 3: accuracy / mean generated tokens.",
            "sweep_vs_random": VS_RANDOM}
TABLE3_METHODS = (Method.FAST, Method.SLOW, Method.KV_CLASSIFICATION, Method.KV_GENERATIVE, Method.DEER,
                  Method.RANDOM, Method.ORACLE)


def caption(profile: str, dirs: dict[str, Path], table: str | None = None) -> str:
    """Profile and models of notebook 06's tables, and (``table``: a key of :data:`CAPTIONS`) what one shows."""
    line = (f"Profile {profile}; models: {', '.join(dirs) or 'none yet'}; each cell copied from that model's table "
            f"(its caption gives sets, sizes and hardware).")
    if table is None:
        return line
    if table not in CAPTIONS:
        raise ValueError(f"unknown table {table!r}: choose one of {', '.join(CAPTIONS)}")
    return f"{line} {CAPTIONS[table]}"


def flat_table(table: pd.DataFrame, names=None) -> pd.DataFrame:
    """A by-model table ready for a CSV: ``(set, model)`` columns joined as ``"set · model"``, the index turned into
    columns (named ``names``); an empty table as it is."""
    if not len(table):
        return table
    return flat_columns(table).reset_index(names=names)


def _size(name: str) -> float:
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", name.replace("_", " ").replace("-", " "))
    return float(m.group(1)) if m else float("inf")


_TABLES = ("table1_kv_probe.csv", "table2_kv_coe.csv", "table3_switching.csv")


def _has_tables(folder: Path) -> bool:
    return any((folder / name).exists() for name in _TABLES)


def model_dirs(tables_root: str | Path, default_model: str = "") -> dict[str, Path]:
    """``{model: folder}`` for every sub-folder of ``tables_root`` holding Table 1, 2 or 3, smallest model first.

    A ``tables_root`` that holds the tables itself (a profile without ``results_dir``) is one model,
    ``default_model``."""
    root = Path(tables_root)
    found = [p for p in root.iterdir() if p.is_dir() and _has_tables(p)] if root.is_dir() else []
    if not found and root.is_dir() and _has_tables(root):
        return {default_model or root.name: root}
    return {p.name: p for p in sorted(found, key=lambda p: (_size(p.name), p.name))}


def _read(dirs: dict[str, Path], name: str) -> dict[str, pd.DataFrame]:
    return {m: pd.read_csv(d / f"{name}.csv") for m, d in dirs.items() if (d / f"{name}.csv").exists()}


TABLE1_PROTOCOLS = {"few-shot": "few_shot_accuracy", "whole split": "whole_accuracy"}


def _table1_long(df: pd.DataFrame) -> pd.DataFrame:
    """A model's ``table1_kv_probe.csv`` as rows ``(set, representation)`` with one accuracy column per protocol
    (:data:`TABLE1_PROTOCOLS`); a table of the earlier wide layout (one column per embedder, few-shot only) too."""
    if "representation" in df:
        cols = [c for c in TABLE1_PROTOCOLS.values() if c in df]
        return df.set_index(["set", "representation"])[cols].rename(columns={v: k for k, v in
                                                                            TABLE1_PROTOCOLS.items()})
    reps = [c for c in df.columns if f"{c} std" in df.columns]
    return (df.melt(id_vars="set", value_vars=reps, var_name="representation", value_name="few-shot")
            .set_index(["set", "representation"]))


def table1_by_model(dirs: dict[str, Path], columns=("KV cache", "hidden states", "random", "dedicated embedder",
                                                     "bag-of-words", "majority class"),
                    protocols=tuple(TABLE1_PROTOCOLS)) -> pd.DataFrame:
    """Rows ``(set, model)``; columns ``(representation, protocol)``: the accuracy of each representation in
    ``columns`` under each protocol (few-shot mean; whole split) as the model's Table 1 gives it; a
    representation or protocol no model has is left out, ``nan`` where one model lacks it."""
    parts = []
    for model, df in _read(dirs, "table1_kv_probe").items():
        long = _table1_long(df)
        long = long[long.index.get_level_values("representation").isin(columns)]
        wide = long.reindex(columns=[p for p in protocols if p in long]).unstack("representation")
        wide = wide.swaplevel(axis=1)
        wide.index = pd.MultiIndex.from_arrays([wide.index, [model] * len(wide)], names=["set", "model"])
        parts.append(wide)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts).sort_index(level=0, sort_remaining=False)
    order = [(c, p) for c in columns for p in protocols if (c, p) in out.columns]
    out = out[order]
    out.columns = pd.MultiIndex.from_tuples(order, names=["representation", "protocol"])
    return out


def table1_readings(dirs: dict[str, Path]) -> pd.DataFrame:
    """One row per model: what each Table 1 protocol shows for its KV cache (the sets where it clears the majority
    class, the sets that cannot rank representations) and the tally of its paired whole-split differences to the
    hidden states and to bag-of-words (:func:`kvlib.experiments.kv_embedding_probe.table1_reading`, written from the
    model's committed ``table1_kv_probe.csv`` and ``table1_differences.csv``); a model without them is absent."""
    from .kv_embedding_probe import table1_reading

    rows = []
    for model, table in _read(dirs, "table1_kv_probe").items():
        if "representation" not in table:  # the earlier layout: no protocols to read
            continue
        diffs = _read({model: dirs[model]}, "table1_differences").get(model)
        parts = table1_reading(table, diffs)
        reading = {k: parts[k].split(": ", 1)[-1] for k in ("few_shot", "whole", "sum") if k in parts}  # no label
        rows.append({"model": model, "few-shot (MTEB) protocol": reading.get("few_shot", ""),
                     "whole-split protocol": " ".join(reading.get(k, "") for k in ("whole", "sum")).strip()})
    return pd.DataFrame(rows, columns=["model", "few-shot (MTEB) protocol", "whole-split protocol"])


def table2_by_model(dirs: dict[str, Path], scores=TABLE2_SCORES) -> pd.DataFrame:
    """Rows: scores; columns ``(set, model)``: ``AUROC [lo, hi]`` (``–`` where a class was too small), followed by
    ``(below chance)`` where the model's table flags it (the flipped score's 95% interval lies above 50)."""
    cols = {}
    for model, df in _read(dirs, "table2_kv_coe").items():
        df = df.set_index("method")
        sets = [c[: -len(" AUROC")] for c in df.columns if c.endswith(" AUROC")]
        for s in sets:
            n = f"{int(df[f'{s} n correct'].max())}✓/{int(df[f'{s} n wrong'].max())}✗"
            cells = {}
            for method in scores:
                if method not in df.index:
                    continue
                a, lo, hi = (df.loc[method, f"{s} AUROC{x}"] for x in ("", " lo", " hi"))
                flag = f"{s} below chance" in df and str(df.loc[method, f"{s} below chance"]) in ("True", "1", "1.0")
                cells[method] = "–" if pd.isna(a) else f"{a:.1f} [{lo:.1f}, {hi:.1f}]" + (" (below chance)" * flag)
            cols[(s, f"{model} ({n})")] = pd.Series(cells)
    out = pd.DataFrame(cols)
    return out.reindex([s for s in scores if s in out.index]) if len(out) else out


def differences_by_model(dirs: dict[str, Path], pairs=KEY_COMPARISONS) -> pd.DataFrame:
    """Rows ``score − baseline``; columns ``(set, model)``: paired AUROC difference ``d [lo, hi]`` (x100, paired
    bootstrap 95% interval from each model's ``table2_differences``); ``–`` where a class was too small."""
    cols = {}
    for model, df in _read(dirs, "table2_differences").items():
        for s in dict.fromkeys(df["set"]):
            sub = df[df["set"] == s].set_index(["score", "baseline"])
            cell = {}
            for a, b in pairs:
                if (a, b) in sub.index:
                    r = sub.loc[(a, b)]
                    d, lo, hi = r["AUROC difference"], r["lo"], r["hi"]
                    cell[f"{a} − {b}"] = "–" if pd.isna(d) else f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            cols[(s, model)] = pd.Series(cell)
    out = pd.DataFrame(cols)
    order = [f"{a} − {b}" for a, b in pairs]
    return out.reindex([k for k in order if k in out.index]) if len(out) else out


def table3_by_model(dirs: dict[str, Path], methods=TABLE3_METHODS) -> pd.DataFrame:
    """Rows ``(set, method)``; columns per model: ``accuracy / mean tokens``, and where the model's table has it the
    difference to its forced-answer budget curve, ``(vs curve +d [lo, hi])`` in accuracy points. Budget rows (fixed
    budgets and the curve's levels) follow; a DEER-style row keeps the name of what ran (:meth:`Method.deer`)."""
    cols = {}
    for model, df in _read(dirs, "table3_switching").items():
        df = df[df["method"].isin(methods) | df["method"].str.startswith(Method.BUDGET_PREFIX)
                | df["method"].map(Method.is_deer)]
        cells = {}
        for r in df.to_dict("records"):
            if r["method"] == Method.DEER and "trial_tokens" in r:  # a table written before DEER rows were named
                r["method"] = Method.deer(float(r["trial_tokens"]) if pd.notna(r["trial_tokens"]) else 0.0)
            cell = f"{r['accuracy']:.3f} / {r['mean_tokens']:.0f}"
            if pd.notna(r.get("at_cap_share", float("nan"))) and pd.notna(r.get("cap", float("nan"))):
                cell += f" [{100 * r['at_cap_share']:.1f}% at cap {r['cap']:.0f}]"
            if pd.notna(r.get("vs_curve", float("nan"))):
                cell += f" (vs curve {r['vs_curve']:+.1f} [{r['vs_curve_lo']:+.1f}, {r['vs_curve_hi']:+.1f}])"
            cells[(r["set"], r["method"])] = cell
        cols[_table3_label(model, df)] = pd.Series(cells, dtype=object)
    out = pd.DataFrame(cols)
    if not len(out):
        return out
    order = {m: i for i, m in enumerate(methods)}
    order.update({m: order[Method.DEER] for m in out.index.get_level_values(1) if Method.is_deer(m)}
                 if Method.DEER in order else {})
    return out.loc[sorted(out.index, key=lambda k: (k[0], order.get(k[1], len(order)), k[1]))].fillna("–")


def sweep_vs_random_by_model(dirs: dict[str, Path]) -> pd.DataFrame:
    """:func:`kvlib.experiments.budget_curve.sweep_vs_random` of each model's Table 3 Pareto points
    (``table3_pareto_points.csv``), one block per model (a ``model`` column first; the model's Table 3 label, as
    :func:`table3_by_model` names it); a model without the points is absent."""
    from .budget_curve import sweep_vs_random

    parts = []
    for model, points in _read(dirs, "table3_pareto_points").items():
        table = _read({model: dirs[model]}, "table3_switching").get(model, pd.DataFrame())
        found = sweep_vs_random(points)
        parts.append(found.assign(set=found["set"].map(set_label)).assign(model=_table3_label(model, table)))
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    return out[["model", *[c for c in out.columns if c != "model"]]]


def _table3_label(model: str, table: pd.DataFrame) -> str:
    """The column name of ``model`` in :func:`table3_by_model`: the model, marked when its Table 3 comes from a run
    that predates the fast cap picked from training answers and the equal-token budget curve (its cells are then
    not comparable with a current run's: fast answers were cut at a fixed cap, and no curve was measured)."""
    missing = [what for what, col in (("no cap shares", "at_cap_share"), ("no budget curve", "vs_curve"))
               if col not in table or table[col].isna().all()]
    return f"{model} (earlier protocol: {', '.join(missing)})" if missing else model


def size_figure(dirs: dict[str, Path], scores=("MaxProb", "Entropy", "KV-CoE-C (V)", "KV-probe", "Output+KV")):
    """Two panels: Table 1 accuracy per embedder, and Table 2 AUROC (with its interval) per score, each against
    the models in ``dirs`` (one line per set)."""
    import matplotlib.pyplot as plt

    t1 = table1_by_model(dirs)
    t2 = _read(dirs, "table2_kv_coe")
    models = list(dirs)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    # the mean over the sets every model has: a set only one model ran would move that model's point alone
    shared = sorted(set.intersection(*(set(t1.xs(m, level="model").index) for m in models
                                       if m in t1.index.get_level_values("model")))) if len(t1) else []
    for emb, color in zip(("KV cache", "hidden states", "dedicated embedder", "random"), ("C0", "C3", "C2", "gray")):
        col = (emb, "few-shot")
        ys = [t1.xs(m, level="model").loc[shared, col].mean() if col in t1 and m in t1.index.get_level_values("model")
              else float("nan") for m in models]
        ax.plot(models, ys, "o-", color=color, label=emb)
    ax.set(ylabel=f"few-shot accuracy (mean over {len(shared)} shared sets)", title="Table 1: probe accuracy by model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for k, score in enumerate(scores):
        for j, model in enumerate(models):
            if model not in t2:
                continue
            df = t2[model].set_index("method")
            sets = [c[: -len(" AUROC")] for c in df.columns if c.endswith(" AUROC")]
            for i, s in enumerate(sets):
                if score not in df.index or pd.isna(df.loc[score, f"{s} AUROC"]):
                    continue
                x = k + (j - (len(models) - 1) / 2) * 0.3
                a, lo, hi = (df.loc[score, f"{s} AUROC{x_}"] for x_ in ("", " lo", " hi"))
                bx.errorbar(x + 0.05 * i, a, yerr=[[a - lo], [hi - a]], fmt="os^Dv"[i % 5], color=f"C{j}", ms=5,
                            capsize=2, label=f"{model}, {s}" if k == 0 else None)
    bx.axhline(50, color="gray", ls=":", lw=1)
    bx.set_xticks(range(len(scores)), scores, rotation=20, fontsize=8)
    bx.set(ylabel="AUROC x100 (95% CI)", title="Table 2: telling right from wrong answers")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7, ncol=2)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return fig
