"""Measure the GPU memory of long prefills at the real Qwen3-32B shape and set it beside kvlib.memory_estimate.

A randomly initialised model is built on the GPU from the shipped config (bf16, no weights needed: memory does
not depend on their values). For each context length it runs one prefill with ``logits_to_keep=1``, once
without and once with ``output_hidden_states``, resetting the allocator's peak in between, and records:

* ``peak``: ``torch.cuda.max_memory_allocated`` during the prefill (weights included);
* ``resident``: ``torch.cuda.memory_allocated`` right after it, while the output (cache, hidden states) is held;
* the ``nbytes`` of the cache tensors and of the hidden states the model returned;
* the estimates of ``kvlib.core.memory.memory_estimate`` for the same shape.

Run from the repository root (needs a CUDA GPU with ~140 GB for 64k tokens with hidden states)::

    python benchmarks/gpu_vram.py --out benchmarks/results/fig1_vram_gpu.csv

It imports ``kvlib.core.memory`` and ``kvlib.core.cache`` from the working tree; ``import kvlib`` loads nothing else
(its
names load lazily), so the machine needs only torch and transformers. ``--device cpu`` with a small
``--config`` JSON checks the logic without a GPU (allocator columns are then empty).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's kvlib, installed or not

from kvlib.core.cache import cache_layers, output_cache  # noqa: E402
from kvlib.core.memory import hf_config, load_config, memory_estimate, prefill_peak  # noqa: E402

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536,131072"
FIELDS = [
    "config", "gpu", "torch", "transformers", "attn_implementation", "dtype", "context_length",
    "output_hidden_states", "status", "seconds", "parameters", "weights_measured", "weights_estimate",
    "kv_cache_measured", "kv_cache_estimate", "hidden_states_measured", "hidden_states_estimate",
    "activations_estimate", "resident_measured", "peak_measured", "estimate_model_kv", "estimate_resident",
    "estimate_peak", "ratio_resident", "ratio_peak", "ratio_peak_model_kv",
]


def estimate_columns(cfg: dict, length: int, hidden: bool, dtype: torch.dtype) -> dict:
    """kvlib's estimates for one prefill, named as the CSV columns."""
    est = memory_estimate(cfg, length, dtype)
    kept = est["kv_cache"] + (est["hidden_states"] if hidden else 0)
    return {
        "weights_estimate": est["weights"], "kv_cache_estimate": est["kv_cache"],
        "hidden_states_estimate": est["hidden_states"] if hidden else 0,
        "activations_estimate": prefill_peak(cfg, length, dtype, hidden_states=hidden) - est["weights"] - kept,
        "estimate_model_kv": est["weights"] + est["kv_cache"],
        "estimate_resident": est["weights"] + kept,
        "estimate_peak": prefill_peak(cfg, length, dtype, hidden_states=hidden),
    }


def add_ratios(row: dict) -> dict:
    """Measured over estimated: resident memory, peak, and peak over the 'model + KV cache' curve."""
    if row.get("status") == "ok" and str(row.get("peak_measured", "")) not in ("", "None"):
        for name, num, den in (("ratio_resident", "resident_measured", "estimate_resident"),
                               ("ratio_peak", "peak_measured", "estimate_peak"),
                               ("ratio_peak_model_kv", "peak_measured", "estimate_model_kv")):
            row[name] = round(float(row[num]) / float(row[den]), 4)
    return row


def reestimate(path: Path) -> None:
    """Recompute the estimate and ratio columns of a results CSV in place (measured columns untouched)."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        cfg = load_config(row["config"])
        hidden = row["output_hidden_states"] == "True"
        row.update(estimate_columns(cfg, int(row["context_length"]), hidden, getattr(torch, row["dtype"])))
        add_ratios(row)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def build_model(config_name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = hf_config(config_name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prefill(model, length: int, hidden: bool, device: str, vocab: int) -> dict:
    """One prefill; returns measured bytes (allocator numbers only on CUDA)."""
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (1, length), device=device, generator=torch.Generator(device).manual_seed(length))
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=hidden, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {
        "seconds": round(seconds, 3),
        "kv_cache_measured": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache_layers(output_cache(out))),
        "hidden_states_measured": sum(h.nbytes for h in out.hidden_states) if hidden else 0,
        "resident_measured": torch.cuda.memory_allocated() if cuda else "",
        "peak_measured": torch.cuda.max_memory_allocated() if cuda else "",
    }
    del out, ids
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-32B", help="shipped config name or config.json path")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated context lengths")
    ap.add_argument("--hidden-max", type=int, default=65536, help="longest length also run with hidden states")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new prefills after this long")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fig1_vram_gpu.csv"))
    ap.add_argument("--reestimate", metavar="CSV", help="only recompute the estimate columns of an existing CSV")
    args = ap.parse_args(argv)
    if args.reestimate:
        reestimate(Path(args.reestimate))
        return 0

    import transformers

    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    model = build_model(args.config, args.device, dtype)
    weights = torch.cuda.memory_allocated() if cuda else sum(p.nbytes for p in model.parameters())
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else float("inf")
    meta = {
        "config": args.config, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation, "dtype": args.dtype,
        "parameters": sum(p.numel() for p in model.parameters()), "weights_measured": weights,
    }
    print(f"built {meta['parameters'] / 1e9:.3f} B parameters, {weights / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.1f} s on {meta['gpu']} ({meta['attn_implementation']})", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for length in (int(x) for x in args.lengths.split(",")):
            for hidden in (False, True):
                if hidden and length > args.hidden_max:
                    continue
                row = dict(meta, context_length=length, output_hidden_states=hidden,
                           **estimate_columns(cfg, length, hidden, dtype))
                if row["estimate_peak"] > 0.97 * capacity:
                    row["status"] = "skipped: estimate exceeds the GPU"
                elif time.perf_counter() - t0 > args.budget_s:
                    row["status"] = "skipped: time budget"
                else:
                    try:
                        row.update(prefill(model, length, hidden, args.device, int(cfg["vocab_size"])))
                        row["status"] = "ok"
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "out of memory"
                add_ratios(row)
                writer.writerow(row)
                fh.flush()
                print(f"T={length:>6} hidden={hidden!s:5} {row['status']:>8} "
                      f"peak={_gb(row.get('peak_measured'))} est_peak={_gb(row['estimate_peak'])} "
                      f"resident={_gb(row.get('resident_measured'))} est_resident={_gb(row['estimate_resident'])} "
                      f"kv={_gb(row.get('kv_cache_measured'))}/{_gb(row['kv_cache_estimate'])} "
                      f"hs={_gb(row.get('hidden_states_measured'))}/{_gb(row['hidden_states_estimate'])} "
                      f"t={row.get('seconds', '')}s", flush=True)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def _gb(x) -> str:
    return f"{x / 1e9:7.2f}" if isinstance(x, int | float) and x != "" else "      -"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
