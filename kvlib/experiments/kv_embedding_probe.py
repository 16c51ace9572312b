"""Notebook 02's experiment (Table 1): which model and sizes, the representations, Table 1 in two protocols, the
paired differences, the verdict, the layer sweep and their figures.

Representations (Table 1's rows per set): the KV cache in three pooling recipes (the last 4 layers, the paper's
code and the default; every layer, the paper's text; heads kept apart), hidden states of the same layers (and
of every layer), random vectors of the KV size, the dedicated embedder, the bag-of-words control, and the
majority class. All KV and hidden recipes are derived from one prefill per text
(:class:`kvlib.embedding.embedders.LayerPooler`). Each is scored under MTEB's few-shot protocol and the whole-split
protocol (:mod:`kvlib.embedding.mteb_classification`).

The protocol lives in :mod:`kvlib.embedding.mteb_classification`, the embedders in :mod:`kvlib.embedding.embedders`,
the data in
:mod:`kvlib.embedding.textsets`; this module wires them for one run so that the notebook stays a few short cells.

Sizes per profile (caps on the pool each set's training samples are drawn from and on its test split
come from :class:`kvlib.profiles.Profile`, ``probe_train`` / ``probe_test``): texts are cut to
``max_tokens`` tokens (64 in ``small``: a BBC article's headline and lead; the other sets are
shorter), the smoke profile runs 3 experiments of 4 samples per label on ~40 texts per set.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.phases import phase
from ..embedding.embedders import (KV_RECIPES, BagOfWords, KVEmbedder, LayerPooler, PrefillRunner, PrefillConfig,
                                   RandomEmbedder, RecipeEmbedder, SentenceTransformerEmbedder)
from ..embedding.mteb_classification import ProbeConfig, WholeSplitConfig, differences, run_probe_table
from ..profiles import hardware_label

__all__ = ["PAPER_TABLE1", "ProbeRun", "probe_run", "load_lm", "standard_embedders", "sweep_set", "add_size_models",
           "main_rows", "table1", "table1_markdown", "table1_differences", "table1_verdict", "table1_reading",
           "paper_ordering",
           "layer_table", "layer_pivot", "plot_table1", "plot_sweep", "release", "MAJORITY", "DIFFERENCE_PAIRS"]

_log = logging.getLogger(__name__)

# The paper's Table 1 (Llama-3.1-8B-Instruct KV cache, gemini-embedding-001), accuracy.
PAPER_TABLE1 = {
    "AmazonCounterfactual": (0.3530, 0.8820),
    "DBpedia": (0.5937, 0.9476),
    "FinancialPhrasebank": (0.6254, 0.8864),
    "TweetTopicSingle": (0.3714, 0.7111),
}
COLUMNS = ("KV cache", "hidden states", "random", "dedicated embedder")
BOW = "bag-of-words"
MAJORITY = "majority class"
# the paired whole-split differences of Table 1 (a - b)
DIFFERENCE_PAIRS = (("KV cache", "hidden states"), ("KV cache", BOW), ("KV cache (every layer)", "KV cache"))
LAYER_COLUMNS = ["set", "layers", "layer_ids", "part", "accuracy_mean", "accuracy_std", "f1_mean", "f1_std",
                 "whole_accuracy", "whole_accuracy_lo", "whole_accuracy_hi", "whole_f1", "whole_f1_lo", "whole_f1_hi",
                 "dim", "n_test", "whole_n_train", "whole_n_test", "samples_per_label", "n_experiments"]
_TOKENS = {"smoke": 32, "small": 64}


@dataclass(frozen=True)
class ProbeRun:
    """Everything that sizes one run of notebook 02.

    Attributes:
        profile: profile name; model: the model whose cache is probed.
        max_train / max_test: caps per set (``None``: no cap).
        prefill: how texts go through the model.
        config: the MTEB protocol settings (``seed = 42 + SEED``).
        whole: the whole-split protocol's settings (``seed = SEED``).
        size_models: further models for the model-size column.
    """

    profile: str
    model: str
    max_train: int | None
    max_test: int | None
    prefill: PrefillConfig
    config: ProbeConfig
    whole: WholeSplitConfig = field(default_factory=WholeSplitConfig)
    size_models: tuple[str, ...] = field(default_factory=tuple)
    placement: dict = field(default_factory=dict, compare=False)



def probe_run(profile, model: str = "", seed: int = 0, max_train: int = 0, max_test: int = 0) -> ProbeRun:
    """The run for a :class:`kvlib.profiles.Profile` (``model``/``max_*`` override it when non-empty/non-zero)."""
    smoke = profile.name == "smoke"
    name = model or profile.model
    placement = profile.placement()
    batch = 16 if placement["device"] == "cpu" else 128  # a GPU prefills many texts at once
    config = ProbeConfig(n_experiments=3, samples_per_label=4, seed=42 + seed) if smoke else ProbeConfig(seed=42 + seed)
    return ProbeRun(
        profile=profile.name, model=name,
        max_train=max_train or profile.probe_train, max_test=max_test or profile.probe_test,
        prefill=PrefillConfig(batch_size=batch, max_tokens=_TOKENS.get(profile.name, 512)), config=config,
        # a GPU machine's CPU cores fit the cross-validation folds side by side
        whole=WholeSplitConfig(seed=seed, n_boot=200 if smoke else 1000,
                               n_jobs=1 if placement["device"] == "cpu" else 8),
        size_models=tuple(m for m in profile.probe_models if m != name), placement=placement,
    )


def load_lm(name: str, device=None, dtype=None):
    """``(model, tokenizer)``: ``"tiny-<arch>"`` builds an in-process random model, anything else goes to
    :func:`kvlib.core.models.load_model` with ``device`` / ``dtype`` (e.g. ``**run.placement``)."""
    if name.startswith("tiny-"):
        from ..core.tiny import tiny_model

        model, tok = tiny_model(name[5:])
        return model.to(device=device or "cpu", dtype=dtype or model.dtype), tok
    from ..core.models import load_model

    return load_model(name, device=device, dtype=dtype)


def standard_embedders(model, tokenizer, run: ProbeRun, seed: int = 0, dedicated: bool = True) -> list:
    """Table 1's representations: the KV cache in :data:`kvlib.embedding.embedders.KV_RECIPES` (first: the paper's code,
    the default), hidden states of the same layers and of every layer (all derived from one prefill per text),
    random (the KV size), the dedicated embedder and the bag-of-words control."""
    prefill = PrefillRunner(model, tokenizer, run.prefill)
    kv_layers, hidden_layers = LayerPooler(prefill, "kv"), LayerPooler(prefill, "hidden")
    kvs = [RecipeEmbedder(kv_layers, layers=layers, heads=heads, name=name) for name, layers, heads in KV_RECIPES]
    out = [*kvs, RecipeEmbedder(hidden_layers, layers=kvs[0].pooling.layers, name=COLUMNS[1]),
           RecipeEmbedder(hidden_layers, layers="all", name=f"{COLUMNS[1]} (every layer)"),
           RandomEmbedder(kvs[0].dim, seed=seed, name=COLUMNS[2])]
    if dedicated:
        out.append(SentenceTransformerEmbedder(name=COLUMNS[3], device=str(next(model.parameters()).device)))
    return [*out, BagOfWords(name=BOW)]


def sweep_set(data_dir=None) -> str:
    """The set the layer sweep runs on: FinancialPhrasebank when ``data_dir`` holds it, else Rotten Tomatoes."""
    return "FinancialPhrasebank" if data_dir else "RottenTomatoes"


@phase("model-size column")
def add_size_models(long: pd.DataFrame, sets, run: ProbeRun) -> pd.DataFrame:
    """``long`` plus one ``KV cache (<model>)`` column per model of ``run.size_models`` (the model-size column).

    Each model is loaded in turn and released; a model that cannot be loaded (its optional package is not
    installed, say) is skipped with a logged warning."""
    for name in run.size_models:
        try:
            model, tok = load_lm(name, **run.placement)
        except Exception as err:  # the larger model is optional: its package may not be installed
            _log.warning("model-size column skipped: %s is not available (%s: %s)", name, type(err).__name__, err)
            continue
        kv = KVEmbedder(PrefillRunner(model, tok, run.prefill), name=f"KV cache ({name})")
        long = pd.concat([long, run_probe_table(sets, [kv], run.config, whole=run.whole)], ignore_index=True)
        release(model, tok)
    return long


def main_rows(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of Table 1's embedders (the layer sweep's ``sweep:`` rows left out)."""
    return long[~long.embedder.str.startswith("sweep:")]


def release(*objects) -> None:
    """Drop references to a model and collect, before loading the next one."""
    del objects
    gc.collect()


_NUM = {"accuracy_mean": "few_shot_accuracy", "accuracy_std": "few_shot_accuracy_std", "f1_mean": "few_shot_f1",
        "f1_std": "few_shot_f1_std", **{f"whole_{k}": f"whole_{k}" for k in (
            "accuracy", "accuracy_lo", "accuracy_hi", "f1", "f1_lo", "f1_hi", "C")}}
_SET_COLS = ("n_labels", "n_test", "n_train_pool", "n_train_embedded", "samples_per_label", "n_experiments",
             "majority_acc", "majority_f1", "whole_n_train", "whole_n_test", "whole_one_split")


def _rows(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (set, representation) with the numeric columns of the CSV, the majority class included."""
    long = long.reindex(columns=list(dict.fromkeys([*long.columns, *_NUM, *_SET_COLS, "whole_majority_accuracy",
                                                     "whole_majority_accuracy_lo", "whole_majority_accuracy_hi",
                                                     "whole_majority_f1", "whole_majority_f1_lo",
                                                     "whole_majority_f1_hi"])))
    parts = []
    for s, g in long.groupby("set", sort=False):
        first = g.iloc[0]
        maj = {"set": s, "stands_for": first.stands_for, "representation": MAJORITY, "dim": 0,
               "few_shot_accuracy": first.majority_acc, "few_shot_accuracy_std": 0.0,
               "few_shot_f1": first.majority_f1, "few_shot_f1_std": 0.0,
               **{f"whole_{k}": first[f"whole_majority_{k}"] for k in (
                   "accuracy", "accuracy_lo", "accuracy_hi", "f1", "f1_lo", "f1_hi")}, "whole_C": float("nan")}
        g = g.rename(columns={**_NUM, "embedder": "representation"})
        parts.append(pd.concat([g[list(maj)], pd.DataFrame([maj])], ignore_index=True)
                     .assign(**{k: first[k] for k in _SET_COLS}))
    rows = pd.concat(parts, ignore_index=True)
    # at the majority level: few-shot mean - std does not clear the majority class's accuracy; whole split: the
    # accuracy's 95% interval reaches down to it
    rows["few_shot_at_majority"] = rows.few_shot_accuracy - rows.few_shot_accuracy_std <= rows.majority_acc + 1e-12
    maj_whole = rows.set.map(rows[rows.representation == MAJORITY].set_index("set").whole_accuracy)
    rows["whole_at_majority"] = (rows.whole_accuracy_lo <= maj_whole + 1e-12) & rows.whole_accuracy.notna()
    rows.loc[rows.representation == MAJORITY, ["few_shot_at_majority", "whole_at_majority"]] = True
    ranked = rows[~rows.representation.isin([MAJORITY, COLUMNS[2]])]
    for proto in ("few_shot", "whole"):
        flat = ranked.groupby("set", sort=False)[f"{proto}_at_majority"].all()
        if proto == "whole":
            flat &= ranked.groupby("set", sort=False).whole_accuracy.apply(lambda a: a.notna().any())
        rows[f"set_at_majority_{proto}"] = rows.set.map(flat)
    return rows


def _ci(m, lo, hi, digits):
    return "—" if pd.isna(m) else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _cis(df: pd.DataFrame, col: str, digits: int) -> list[str]:
    return [_ci(*v, digits) for v in zip(df[col], df[f"{col}_lo"], df[f"{col}_hi"])]


def _pm(mean, std, digits: int) -> list[str]:
    return [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean, std)]


def table1(long: pd.DataFrame, run: ProbeRun, digits: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(markdown table, csv table, caption)``: per set, one row per representation and one for the majority class.

    Columns: few-shot accuracy and macro-F1 (mean ± std over the MTEB experiments), whole-split accuracy and
    macro-F1 with 95% bootstrap intervals, the ``C`` chosen on the training split, where the row is at the
    majority-class level, and the paper's numbers. A set whose every representation but random is at the
    majority level in a protocol is marked after its name (it cannot rank representations there). The CSV
    holds the numbers (:func:`_rows`) and the run's model, profile and sizes.
    """
    rows = _rows(long)
    has_whole = rows.whole_accuracy.notna().any()
    marks = []
    for fs, wh in zip(rows.few_shot_at_majority, rows.whole_at_majority):
        marks.append(", ".join(p for p, on in (("few-shot", fs), ("whole split", wh and has_whole)) if on))
    md = pd.DataFrame({
        "few-shot accuracy": _pm(rows.few_shot_accuracy, rows.few_shot_accuracy_std, digits),
        "few-shot macro-F1": _pm(rows.few_shot_f1, rows.few_shot_f1_std, digits),
        "whole-split accuracy [95% CI]": _cis(rows, "whole_accuracy", digits),
        "whole-split macro-F1 [95% CI]": _cis(rows, "whole_f1", digits),
        "C (CV)": ["—" if pd.isna(c) else f"{c:g}" for c in rows.whole_C],
        "at majority level": marks,
        "paper: Llama-3.1-8B KV / gemini": [
            f"{PAPER_TABLE1[s][0]:.3f}" if r == COLUMNS[0] and s in PAPER_TABLE1 else
            f"{PAPER_TABLE1[s][1]:.3f}" if r == COLUMNS[3] and s in PAPER_TABLE1 else ""
            for s, r in zip(rows.set, rows.representation)],
    })
    if not has_whole:
        md = md.drop(columns=["whole-split accuracy [95% CI]", "whole-split macro-F1 [95% CI]", "C (CV)"])
    set_label = []
    for s, fs, wh in zip(rows.set, rows.set_at_majority_few_shot, rows.set_at_majority_whole):
        flat = [p for p, on in (("few-shot", fs), ("whole split", wh)) if on is True]
        set_label.append(f"{s} (all at majority: {', '.join(flat)})" if flat else s)
    md.index = pd.MultiIndex.from_arrays([set_label, rows.representation], names=["set", "representation"])
    csv = rows.assign(model=run.model, profile=run.profile, max_tokens=run.prefill.max_tokens)
    csv = csv.drop(columns=[c for c in ("scores", "f1_scores", "whole_pred", "whole_true") if c in csv])
    c, w = run.config, run.whole
    sample = (f"{c.samples_per_label} training texts per label" if c.samples_per_label else
              "MTEB's per-task training sample (8 texts per label; 32 for AmazonCounterfactual)")
    firsts = rows.drop_duplicates("set").set_index("set")
    sets = list(firsts.index)
    whole_line = ""
    if has_whole:
        splits = [f"{s} {int(firsts.loc[s, 'whole_n_train'])}/{int(firsts.loc[s, 'whole_n_test'])}"
                  + (" (its one split halved)" if firsts.loc[s, "whole_one_split"] is True else "") for s in sets]
        whole_line = (
            f" Whole split: logistic regression on every training text (dense features standardised; C from "
            f"{', '.join(f'{x:g}' for x in w.cs)} chosen by {w.folds}-fold stratified cross-validation on the "
            f"training split only, log-loss), scored on the test split with {w.level:.0%} bootstrap intervals over "
            f"test texts ({w.n_boot} resamples); train/test texts: " + ", ".join(splits) + ". Sets with one split "
            "(FinancialPhrasebank) and the stand-ins use a fixed stratified half/half split (random_state=0). "
            "At majority level: the interval's lower end reaches the majority class's accuracy.")
    caption = (
        f"Table 1 (reproduction). Few-shot: accuracy and macro-F1, mean ± std over {c.n_experiments} MTEB "
        f"classification experiments (logistic regression, max_iter {c.max_iter}, fitted on {sample}); at majority "
        f"level: mean − std ≤ the majority class's accuracy.{whole_line} KV cache: keys ++ values, mean over tokens, "
        f"KV heads and the last 4 layers (the paper's code), L2-normalised; (every layer): all layers (the paper's "
        f"text); (heads apart): the last 4 layers, KV heads concatenated; hidden states: the same layers; random: "
        f"Gaussian vector of the KV size; dedicated embedder: all-MiniLM-L6-v2; bag-of-words: TF-IDF of word uni- "
        f"and bigrams fitted on each fit's training texts; majority class: the test split's largest class. "
        f"Model {run.model}, profile {run.profile}, raw text cut to {run.prefill.max_tokens} tokens; test texts "
        "per set (few-shot): " + ", ".join(f"{s} {int(firsts.loc[s, 'n_test'])}" for s in sets)
        + (f"; computed on {hardware_label(**run.placement)}." if run.placement else ".")
    )
    return md, csv, caption


def table1_markdown(table: pd.DataFrame, caption: str) -> str:
    """Table 1's Markdown file (or its difference table's): the caption, then the table (its index as columns)."""
    return f"{caption}\n\n{table.reset_index().to_markdown(index=False)}\n"


def table1_differences(long: pd.DataFrame, run: ProbeRun, pairs=DIFFERENCE_PAIRS, digits: int = 3
                       ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(markdown table, csv table, caption)`` of the paired whole-split differences ``a − b`` per set
    (:func:`kvlib.embedding.mteb_classification.differences`): accuracy and macro-F1 with paired bootstrap 95%
    intervals."""
    w = run.whole
    diff = differences(long, pairs, w.n_boot, w.level, w.seed)
    md = pd.DataFrame({
        "accuracy difference [95% CI]": _cis(diff, "accuracy", digits),
        "macro-F1 difference [95% CI]": _cis(diff, "f1", digits),
        "n test": diff.n_test.to_numpy(),
    }, index=pd.MultiIndex.from_arrays([diff.set, [f"{a} − {b}" for a, b in zip(diff.a, diff.b)]],
                                       names=["set", "difference"]))
    csv = diff.assign(model=run.model, profile=run.profile)
    caption = (f"Table 1, paired differences (whole-split protocol). Score(a) − score(b) on the same test texts, "
               f"{w.level:.0%} paired bootstrap intervals over test texts ({w.n_boot} resamples, seed {w.seed}); an "
               f"interval that excludes 0 separates the two. Model {run.model}, profile {run.profile}.")
    return md, csv, caption


def _cell(r, proto):
    if proto == "few_shot":
        return f"{r.few_shot_accuracy:.3f} / {r.few_shot_f1:.3f}"
    return f"{r.whole_accuracy:.3f} [{r.whole_accuracy_lo:.3f}, {r.whole_accuracy_hi:.3f}] / {r.whole_f1:.3f}"


def table1_verdict(table: pd.DataFrame, diffs: pd.DataFrame | None = None) -> str:
    """The Table 1 verdict, written from the CSVs of :func:`table1` and :func:`table1_differences` (e.g. read
    back from ``table1_kv_probe.csv`` / ``table1_differences.csv``): what each protocol shows for the KV cache
    against the hidden states, the bag-of-words control and the majority class, numbers copied from the tables
    (accuracy / macro-F1; whole split: accuracy with its 95% interval)."""
    parts = table1_reading(table, diffs)
    out = [f"{parts[p]} {parts[p + ' numbers']}" for p in ("few_shot", "whole") if p in parts]
    if "differences" in parts:
        out.append(parts["differences"])
    if "sum" in parts:
        out.append(parts["sum"])
    return "\n\n".join(out)


def table1_reading(table: pd.DataFrame, diffs: pd.DataFrame | None = None) -> dict[str, str]:
    """The pieces of :func:`table1_verdict`: ``few_shot`` and ``whole`` (what each protocol shows: the sets where
    the KV cache clears the majority class, the sets that cannot rank representations), ``<protocol> numbers`` (the
    cells per set), ``differences`` (paired whole-split differences) and ``sum`` (their tally); a piece whose
    columns are missing is absent."""
    names = (COLUMNS[0], COLUMNS[1], BOW, MAJORITY)
    out = {}
    for proto, label in (("few_shot", "Few-shot (MTEB) protocol"), ("whole", "Whole-split protocol")):
        key = "few_shot_accuracy" if proto == "few_shot" else "whole_accuracy"
        if key not in table or table[key].isna().all():
            continue
        lines, above, flat = [], [], []
        for s, g in table.groupby("set", sort=False):
            g = g.set_index("representation")
            if not set(names) <= set(g.index):
                continue
            (flat if g.loc[COLUMNS[0]][f"{proto}_at_majority"] else above).append(s)
            lines.append(f"{s}: " + ", ".join(f"{n} {_cell(g.loc[n], proto)}" for n in names))
        if not lines:
            continue
        head = (f"{label} (accuracy / macro-F1): the KV cache is above the majority class on {len(above)} of "
                f"{len(above) + len(flat)} sets" + (f" ({', '.join(above)})" if above else "")
                + (f" and at its level on {', '.join(flat)}" if flat else "") + ".")
        sets_flat = sorted(set(table.loc[table[f"set_at_majority_{proto}"] == True, "set"]))  # noqa: E712
        if sets_flat:
            head += f" Every representation but random is at the majority level on {', '.join(sets_flat)}: " \
                    "those sets cannot rank representations under this protocol."
        out[proto], out[f"{proto} numbers"] = head, "; ".join(lines) + "."
        if proto == "whole" and diffs is not None and len(diffs):
            out.update(_difference_reading(diffs))
    return out


def _difference_reading(diffs: pd.DataFrame) -> dict[str, str]:
    """``differences`` and ``sum`` of :func:`table1_reading`: KV cache minus hidden states and minus bag-of-words."""
    parts = []
    for r in diffs.itertuples():
        if r.a != COLUMNS[0] or r.b not in (COLUMNS[1], BOW):
            continue
        verdict = ("higher" if r.accuracy_lo > 0 else "lower" if r.accuracy_hi < 0 else "not separable")
        parts.append(f"{r.set}: KV cache − {r.b} {r.accuracy:+.3f} [{r.accuracy_lo:+.3f}, "
                     f"{r.accuracy_hi:+.3f}] ({verdict})")
    if not parts:
        return {}
    out = {"differences": "Paired whole-split accuracy differences with 95% intervals: " + "; ".join(parts) + "."}
    tally = []
    for b in (COLUMNS[1], BOW):
        d = diffs[(diffs.a == COLUMNS[0]) & (diffs.b == b)]
        if len(d):
            tally.append(f"below {b} on {int((d.accuracy_hi < 0).sum())} of {len(d)} sets, above on "
                         f"{int((d.accuracy_lo > 0).sum())}")
    if tally:
        out["sum"] = "In sum, with the whole training split the KV cache is " + "; ".join(tally) + "."
    return out


def paper_ordering(main: pd.DataFrame) -> pd.DataFrame:
    """Per set, the paper's ordering read off :func:`main_rows`: KV cache below the dedicated embedder, above
    random, and its gaps to random and to the hidden states."""
    acc = main.pivot(index="set", columns="embedder", values="accuracy_mean")
    return pd.DataFrame({
        "KV < dedicated": acc["KV cache"] < acc["dedicated embedder"],
        "KV > random": acc["KV cache"] > acc["random"],
        "KV - random": (acc["KV cache"] - acc["random"]).round(3),
        "KV - hidden": (acc["KV cache"] - acc["hidden states"]).round(3),
    })


def layer_table(layers: pd.DataFrame, run: ProbeRun) -> pd.DataFrame:
    """The layer sweep's CSV: :data:`LAYER_COLUMNS` of :func:`kvlib.embedding.mteb_classification.sweep_frame`, with
    the model and profile."""
    return layers.reindex(columns=LAYER_COLUMNS).assign(model=run.model, profile=run.profile)


def layer_pivot(layers: pd.DataFrame, value: str = "accuracy_mean") -> pd.DataFrame:
    """``value`` (few-shot mean accuracy by default; e.g. ``whole_accuracy``) per pooled-layer choice (rows, in
    sweep order) and cache part (columns)."""
    return layers.pivot(index="layers", columns="part", values=value).loc[list(dict.fromkeys(layers.layers))]


def plot_table1(long: pd.DataFrame, ax=None):
    """Grouped bars: accuracy per set and embedder, error bars = std over experiments, ticks at the majority class."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    runs = long.explode("scores").assign(accuracy=lambda d: d.scores.astype(float))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 1.6 * runs.set.nunique()), 4))
    sns.barplot(data=runs, x="set", y="accuracy", hue="embedder", errorbar="sd", ax=ax, capsize=0.1)
    sets = list(dict.fromkeys(long.set))
    major = long.drop_duplicates("set").set_index("set").loc[sets, "majority_acc"]
    ax.scatter(range(len(sets)), major, marker="_", s=900, color="black", zorder=5, label="majority class")
    ax.set(ylim=(0, 1), xlabel="", ylabel="probe accuracy (test split)\nmean ± std over experiments")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return ax


def plot_sweep(sweep: pd.DataFrame, ax=None):
    """Accuracy vs which layers are pooled, one line per part (keys / values / both), std as error bars."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    order = list(dict.fromkeys(sweep.layers))
    for k, (part, g) in enumerate(sweep.groupby("part", sort=False)):
        g = g.set_index("layers").loc[order]
        ax.errorbar(np.arange(len(order)) + 0.06 * (k - 1), g.accuracy_mean, yerr=g.accuracy_std, marker="o",
                    capsize=3, label=part)
    layer_ids = sweep.drop_duplicates("layers").set_index("layers").loc[order, "layer_ids"]
    ax.set_xticks(np.arange(len(order)), [f"{o}\n{ids}" for o, ids in zip(order, layer_ids)], fontsize=7)
    ax.set(xlabel="pooled layers (layer indices)", ylabel="probe accuracy (mean ± std)",
           title=f"KV embedding on {sweep.set.iloc[0]}")
    ax.legend(title="cache part")
    return ax
