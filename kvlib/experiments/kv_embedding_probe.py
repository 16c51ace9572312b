"""Notebook 02's experiment (Table 1): which model and sizes, the four embedders, Table 1, the layer sweep and their
figures.

The protocol lives in :mod:`kvlib.probe`, the embedders in :mod:`kvlib.embedding`, the data in
:mod:`kvlib.textsets`; this module wires them for one run so that the notebook stays a few short cells.

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

from ..embedding import (HiddenStateEmbedder, KVEmbedder, KVPooling, Prefill, PrefillConfig, RandomEmbedder,
                         SentenceTransformerEmbedder)
from ..probe import ProbeConfig, run_probe_table
from ..profiles import hardware_label

__all__ = ["PAPER_TABLE1", "ProbeRun", "probe_run", "load_lm", "standard_embedders", "sweep_set", "add_size_models",
           "main_rows", "table1", "table1_markdown", "paper_ordering", "layer_table", "layer_pivot", "plot_table1",
           "plot_sweep", "release"]

_log = logging.getLogger(__name__)

# The paper's Table 1 (Llama-3.1-8B-Instruct KV cache, gemini-embedding-001), accuracy.
PAPER_TABLE1 = {
    "AmazonCounterfactual": (0.3530, 0.8820),
    "DBpedia": (0.5937, 0.9476),
    "FinancialPhrasebank": (0.6254, 0.8864),
    "TweetTopicSingle": (0.3714, 0.7111),
}
COLUMNS = ("KV cache", "hidden states", "random", "dedicated embedder")
LAYER_COLUMNS = ["set", "layers", "layer_ids", "part", "accuracy_mean", "accuracy_std", "dim", "n_test",
                 "samples_per_label", "n_experiments"]
_TOKENS = {"smoke": 32, "small": 64}


@dataclass(frozen=True)
class ProbeRun:
    """Everything that sizes one run of notebook 02.

    Attributes:
        profile: profile name; model: the model whose cache is probed.
        max_train / max_test: caps per set (``None``: no cap).
        prefill: how texts go through the model.
        config: the MTEB protocol settings (``seed = 42 + SEED``).
        size_models: further models for the model-size column.
    """

    profile: str
    model: str
    max_train: int | None
    max_test: int | None
    prefill: PrefillConfig
    config: ProbeConfig
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
        size_models=tuple(m for m in profile.probe_models if m != name), placement=placement,
    )


def load_lm(name: str, device=None, dtype=None):
    """``(model, tokenizer)``: ``"tiny-<arch>"`` builds an in-process random model, anything else goes to
    :func:`kvlib.models.load_model` with ``device`` / ``dtype`` (e.g. ``**run.placement``)."""
    if name.startswith("tiny-"):
        from ..tiny import tiny_model

        model, tok = tiny_model(name[5:])
        return model.to(device=device or "cpu", dtype=dtype or model.dtype), tok
    from ..models import load_model

    return load_model(name, device=device, dtype=dtype)


def standard_embedders(model, tokenizer, run: ProbeRun, seed: int = 0, dedicated: bool = True) -> list:
    """Table 1's columns: KV cache (paper recipe), hidden states (same layers), random (same size), dedicated."""
    prefill = Prefill(model, tokenizer, run.prefill)
    kv = KVEmbedder(prefill, KVPooling(), name=COLUMNS[0])
    out = [kv, HiddenStateEmbedder(prefill, layers=kv.pooling.layers, name=COLUMNS[1]),
           RandomEmbedder(kv.dim, seed=seed, name=COLUMNS[2])]
    if dedicated:
        out.append(SentenceTransformerEmbedder(name=COLUMNS[3], device=str(next(model.parameters()).device)))
    return out


def sweep_set(data_dir=None) -> str:
    """The set the layer sweep runs on: FinancialPhrasebank when ``data_dir`` holds it, else Rotten Tomatoes."""
    return "FinancialPhrasebank" if data_dir else "RottenTomatoes"


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
        kv = KVEmbedder(Prefill(model, tok, run.prefill), name=f"KV cache ({name})")
        long = pd.concat([long, run_probe_table(sets, [kv], run.config)], ignore_index=True)
        release(model, tok)
    return long


def main_rows(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of Table 1's embedders (the layer sweep's ``sweep:`` rows left out)."""
    return long[~long.embedder.str.startswith("sweep:")]


def release(*objects) -> None:
    """Drop references to a model and collect, before loading the next one."""
    del objects
    gc.collect()


def table1(long: pd.DataFrame, run: ProbeRun, digits: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(markdown table, csv table, caption)``: rows are sets, columns the embedders (mean ± std).

    The CSV holds numbers (``<column>`` mean and ``<column> std``) and the run's model, profile and sizes.
    """
    cols = list(dict.fromkeys(long.embedder))
    sets = list(dict.fromkeys(long.set))
    first = long.drop_duplicates("set").set_index("set").loc[sets]
    mean = long.pivot(index="set", columns="embedder", values="accuracy_mean").loc[sets, cols]
    std = long.pivot(index="set", columns="embedder", values="accuracy_std").loc[sets, cols]
    md = mean.copy().astype(object)
    for c in cols:
        md[c] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean[c], std[c])]
    md.insert(0, "stands for", first.stands_for)
    md["majority class"] = first.majority_acc.round(digits)
    md["paper: KV (Llama-3.1-8B) / gemini"] = [
        "{:.3f} / {:.3f}".format(*PAPER_TABLE1[s]) if s in PAPER_TABLE1 else "—" for s in sets]
    md.columns.name, md.index.name = None, "set"
    csv = pd.concat([mean, std.add_suffix(" std")], axis=1)[[c for col in cols for c in (col, f"{col} std")]]
    csv.insert(0, "stands_for", first.stands_for)
    for k in ("n_labels", "n_test", "n_train_pool", "n_train_embedded", "samples_per_label", "n_experiments",
              "majority_acc"):
        csv[k] = first[k]
    csv["model"], csv["profile"], csv["max_tokens"] = run.model, run.profile, run.prefill.max_tokens
    csv.columns.name = None
    c = run.config
    sample = (f"{c.samples_per_label} training texts per label" if c.samples_per_label else
              "MTEB's per-task training sample (8 texts per label; 32 for AmazonCounterfactual)")
    caption = (
        f"Table 1 (reproduction). Accuracy, mean ± std over {c.n_experiments} MTEB classification experiments "
        f"(logistic regression, max_iter {c.max_iter}, fitted on {sample}). KV cache: keys ++ values, "
        f"mean over tokens, KV heads and the last 4 layers, L2-normalised; hidden states: the same layers; "
        f"random: Gaussian vector of the KV size; dedicated embedder: all-MiniLM-L6-v2. Model {run.model}, "
        f"profile {run.profile}, raw text cut to "
        f"{run.prefill.max_tokens} tokens; test texts per set: "
        + ", ".join(f"{s} {int(first.loc[s, 'n_test'])}" for s in sets)
        + (f"; computed on {hardware_label(**run.placement)}." if run.placement else ".")
    )
    return md, csv.reset_index(), caption


def table1_markdown(table: pd.DataFrame, caption: str) -> str:
    """Table 1's Markdown file: the caption, then the table of :func:`table1`."""
    return f"{caption}\n\n{table.to_markdown()}\n"


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
    """The layer sweep's CSV: :data:`LAYER_COLUMNS` of :func:`kvlib.probe.sweep_frame`, with the model and profile."""
    return layers[LAYER_COLUMNS].assign(model=run.model, profile=run.profile)


def layer_pivot(layers: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per pooled-layer choice (rows, in sweep order) and cache part (columns)."""
    return layers.pivot(index="layers", columns="part", values="accuracy_mean").loc[list(dict.fromkeys(layers.layers))]


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
