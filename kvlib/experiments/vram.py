"""Notebook 01's experiment (Fig. 1): memory of long contexts, estimated and measured.

The estimates and measurements are library code (:mod:`kvlib.core.memory`); this module wires them for the figure:
the scale panel (:data:`SCALE_CONFIG` in bf16 over :data:`SCALE_LENGTHS`, beside the GPU measurements of
``benchmarks/gpu_vram.py`` when its CSV is there) and the model panel (real cache and hidden-state bytes of the
profile's model at :func:`model_lengths`). :func:`fig1_table` holds every number of the figure in one long table,
:func:`fig1_panels` pivots it into the two panels, :func:`fig1_figure` draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from ..core.memory import load_config, prefill_peak, vram_curve

__all__ = ["SCALE_CONFIG", "SCALE_LENGTHS", "GPU_CSV", "GPU_COLUMNS", "H200_BYTES", "model_lengths", "estimate_gb",
           "gpu_measurements", "gpu_table", "fig1_table", "fig1_caption", "fig1_panels", "fig1_markdown",
           "fig1_figure", "fig1_summary"]

SCALE_CONFIG = "Qwen3-32B"
SCALE_LENGTHS = [2**k for k in range(10, 18)]  # 1k ... 128k tokens
GPU_CSV = Path("benchmarks") / "results" / "fig1_vram_gpu.csv"  # under the repository root
GPU_COLUMNS = ["context_length", "output_hidden_states", "status", "seconds", "kv_cache_measured",
               "hidden_states_measured", "resident_measured", "peak_measured", "ratio_resident", "ratio_peak",
               "ratio_peak_model_kv"]
H200_BYTES = 143_771 * 2**20  # one H200's memory as torch reports it
_MODEL_LENGTHS = {"smoke": [16, 32, 64], "small": [256, 512, 1024, 2048]}
_ESTIMATE = ["weights", "kv_cache", "hidden_states", "activations", "model_kv", "model_kv_hidden"]


def model_lengths(profile: str) -> list[int]:
    """Context lengths at which the profile's model is measured (short for ``smoke`` and ``small``)."""
    return list(_MODEL_LENGTHS.get(profile, [1024, 2048, 4096, 8192]))


def estimate_gb(config=SCALE_CONFIG, lengths: Sequence[int] = SCALE_LENGTHS, dtype=torch.bfloat16) -> pd.DataFrame:
    """:func:`kvlib.core.memory.vram_curve` in GB, one row per context length: weights, KV cache, hidden states,
    prefill activations, and the totals model + KV and model + KV + hidden states."""
    return vram_curve(config, lengths, dtype).set_index("context_length")[_ESTIMATE] / 1e9


def gpu_measurements(csv: str | Path) -> pd.DataFrame:
    """The rows of ``benchmarks/gpu_vram.py``'s CSV (an empty frame when there is none)."""
    return pd.read_csv(csv) if Path(csv).exists() else pd.DataFrame()


def gpu_table(gpu: pd.DataFrame):
    """The GPU measurements' :data:`GPU_COLUMNS`, or a line saying how to make them."""
    return gpu[GPU_COLUMNS] if len(gpu) else "no GPU measurements: run benchmarks/gpu_vram.py on a GPU"


def fig1_table(config, lengths: Sequence[int], dtype=torch.bfloat16, gpu_csv=None, cpu_rows: Sequence[dict] = (),
               cpu_model: str = "", profile: str = ""):
    """Every number of Fig. 1 in one long table (pandas): ``panel, model, dtype, source, quantity, context_length,
    bytes, gb`` (after a first column ``profile`` when one is given).

    ``panel="scale"``: the estimate for ``config`` over ``lengths`` (weights, kv_cache, hidden_states, model_kv,
    model_kv_hidden, prefill_peak, prefill_peak_hidden) and, if ``gpu_csv`` (from benchmarks/gpu_vram.py) exists,
    its measured ``resident`` / ``peak`` bytes (with and without hidden states). ``panel="model"``: the rows of
    :func:`kvlib.core.memory.measure_cache_bytes` for ``cpu_model``, measured and estimated.
    """
    import pandas as pd

    cfg = load_config(config)
    name = str(config) if isinstance(config, str | Path) else cfg.get("_name_or_path", "config")
    dname = str(dtype).replace("torch.", "")
    rows = []
    for t, (_, est) in zip(lengths, vram_curve(cfg, lengths, dtype).iterrows()):
        for q in ("weights", "kv_cache", "hidden_states", "model_kv", "model_kv_hidden"):
            rows.append(("scale", name, dname, "estimate", q, t, int(est[q])))
        rows.append(("scale", name, dname, "estimate", "prefill_peak", t, prefill_peak(cfg, t, dtype)))
        rows.append(("scale", name, dname, "estimate", "prefill_peak_hidden", t,
                     prefill_peak(cfg, t, dtype, hidden_states=True)))
    if gpu_csv is not None and Path(gpu_csv).exists():
        gpu = pd.read_csv(gpu_csv)
        for _, r in gpu[gpu["status"] == "ok"].iterrows():
            suffix = "_hidden" if bool(r["output_hidden_states"]) else ""
            source = f"measured ({r['gpu']})"
            rows.append(("scale", r["config"], r["dtype"], source, "resident" + suffix, int(r["context_length"]),
                         int(r["resident_measured"])))
            rows.append(("scale", r["config"], r["dtype"], source, "peak" + suffix, int(r["context_length"]),
                         int(r["peak_measured"])))
    for r in cpu_rows:
        for q in ("weights", "kv_cache", "hidden_states"):
            for source in ("measured", "estimate"):
                rows.append(("model", cpu_model, r["dtype"], source, q, r["context_length"], int(r[f"{q}_{source}"])))
    df = pd.DataFrame(rows, columns=["panel", "model", "dtype", "source", "quantity", "context_length", "bytes"])
    df["gb"] = df["bytes"] / 1e9
    if profile:
        df.insert(0, "profile", profile)
    return df


def fig1_caption(gpu: pd.DataFrame, cpu_rows: Sequence[dict], cpu_lengths: Sequence[int], cpu_model: str,
                 hardware: str, profile: str, config: str = SCALE_CONFIG,
                 lengths: Sequence[int] = SCALE_LENGTHS) -> str:
    """Fig. 1's caption: what each panel shows, which model and hardware measured it, the profile."""
    gpu_note = f"; measured on {gpu['gpu'].iloc[0]} with random weights (benchmarks/gpu_vram.py)" if len(gpu) else ""
    return (f"Fig. 1 data. Panel 'scale': {config}, bf16, batch 1, kvlib.memory_estimate at {lengths[0]}-{lengths[-1]} "
            f"tokens{gpu_note}. Panel 'model': real cache and output_hidden_states bytes of {cpu_model} "
            f"({cpu_rows[0]['dtype']}) after prefills of {list(cpu_lengths)} tokens on {hardware}; "
            f"profile {profile}.")


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_axis([f"{source}: {quantity}" for source, quantity in df.columns], axis=1)


def fig1_panels(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(scale panel in GB, model panel in bytes)`` of :func:`fig1_table`: one row per context length, one column
    per ``"source: quantity"``."""
    def panel(name, values):
        return _flat(table[table.panel == name].pivot_table(index="context_length", columns=["source", "quantity"],
                                                            values=values))

    return panel("scale", "gb"), panel("model", "bytes").astype("int64")


def fig1_markdown(table: pd.DataFrame, caption: str) -> str:
    """``fig1_vram.md``: the caption, then both panels of :func:`fig1_panels`."""
    scale_gb, model_bytes = fig1_panels(table)
    return (f"{caption}\n\nPanel 'scale' (GB):\n\n{scale_gb.round(3).to_markdown()}\n\n"
            f"Panel 'model' (bytes):\n\n{model_bytes.to_markdown()}\n")


def fig1_figure(table: pd.DataFrame, cpu_model: str, cpu_lengths: Sequence[int], config: str = SCALE_CONFIG,
                lengths: Sequence[int] = SCALE_LENGTHS):
    """Fig. 1: memory vs context length of ``config`` in bf16, estimated and measured on a GPU (left), and the
    real cache and hidden-state bytes of ``cpu_model`` against their estimates (right)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    est = table[(table.panel == "scale") & (table.source == "estimate")].pivot(index="context_length",
                                                                               columns="quantity", values="gb")
    meas = table[(table.panel == "scale") & table.source.str.startswith("measured")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.7, 1]})
    ax.plot(est.index, est["model_kv"], "-", color="C0", lw=2, label="model + KV cache (estimate)")
    ax.plot(est.index, est["model_kv_hidden"], "-", color="C3", lw=2,
            label="model + KV cache + hidden states (estimate)")
    ax.plot(est.index, est["prefill_peak"], "--", color="C0", lw=0.9, label="prefill peak (estimate)")
    ax.plot(est.index, est["prefill_peak_hidden"], "--", color="C3", lw=0.9,
            label="prefill peak, hidden states kept (estimate)")
    ax.axhline(est["weights"].iloc[0], color="gray", ls=":", label=f"model weights ({est['weights'].iloc[0]:.1f} GB)")
    if len(meas):
        ax.axhline(H200_BYTES / 1e9, color="k", ls="--", lw=0.8, label="one H200 (143,771 MiB)")
    for q, color, marker, what in [("resident", "C0", "o", "held after prefill"),
                                   ("resident_hidden", "C3", "s", "held after prefill"),
                                   ("peak", "C0", "^", "prefill peak"), ("peak_hidden", "C3", "^", "prefill peak")]:
        pts = meas[meas.quantity == q]
        if len(pts):
            ax.scatter(pts.context_length, pts.gb, color=color, marker=marker, s=40, zorder=3,
                       facecolors=color if q.startswith("resident") else "none",
                       label=f"measured, {what}{' (hidden states kept)' if q.endswith('hidden') else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [f"{t // 1024}k" for t in lengths])
    ax.set(xlabel="context length (tokens)", ylabel="memory (GB)", title=f"{config}, bf16, batch 1")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    model = table[table.panel == "model"]
    small = model.pivot_table(index="context_length", columns=["quantity", "source"], values="bytes")
    for q, color, label in [("kv_cache", "C0", "KV cache"), ("hidden_states", "C3", "hidden states")]:
        bx.plot(small.index, small[(q, "estimate")] / 1e6, "-", color=color, label=f"{label}, estimate")
        bx.scatter(small.index, small[(q, "measured")] / 1e6, s=70, facecolors="none", edgecolors=color,
                   label=f"{label}, measured")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bx.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    bx.set_xticks(list(cpu_lengths), [str(t) for t in cpu_lengths])
    bx.set(xlabel="context length (tokens)", ylabel="bytes held (MB)",
           title=f"{cpu_model}, {model['dtype'].iloc[0]}, measured here")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def fig1_summary(gpu: pd.DataFrame, cpu_rows: Sequence[dict], cpu_model: str, config: str = SCALE_CONFIG,
                 at: int = 32768) -> str:
    """Three lines: the estimate at ``at`` tokens, the GPU measurements against it, and the largest gap between
    the measured and estimated bytes of ``cpu_model``."""
    e = estimate_gb(config, [at]).loc[at]
    lines = [f"{config} at {at // 1024}k tokens: weights {e.weights:.2f} GB, KV cache {e.kv_cache:.2f} GB, "
             f"hidden states {e.hidden_states:.2f} GB ({e.hidden_states / e.kv_cache:.1f}x the KV cache)"]
    if len(gpu):
        ok = gpu[gpu.status == "ok"]
        lines.append(f"GPU, {len(ok)} prefills up to {ok.context_length.max()} tokens: held/estimate "
                     f"{ok.ratio_resident.min():.4f}-{ok.ratio_resident.max():.4f}, peak/estimated peak "
                     f"{ok.ratio_peak.min():.4f}-{ok.ratio_peak.max():.4f}, peak/(model + KV) "
                     f"{ok.ratio_peak_model_kv.min():.3f}-{ok.ratio_peak_model_kv.max():.3f}")
    worst = max(abs(r[f"{q}_measured"] / r[f"{q}_estimate"] - 1) for r in cpu_rows
                for q in ("kv_cache", "hidden_states"))
    lines.append(f"{cpu_model}: largest relative gap between measured and estimated cache / hidden-state bytes: "
                 f"{worst:.2e}")
    return "\n".join(lines)
