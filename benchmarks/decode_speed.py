"""Decode speed: kvlib's loop vs transformers ``generate`` (dynamic cache; static cache, compiled) vs the floor.

kvlib's loop is measured three times: on a static cache with the captured one-token step (``compile=True``, what
every notebook runs on a GPU), on the same cache eagerly (``KVLIB_COMPILE=0``, see
:func:`kvlib.core.decoding.compile_default`) and on a dynamic cache (``cache="dynamic"``, the CPU path).

Every configuration decodes exactly ``--new-tokens`` tokens per row after a ``--prompt``-token prompt (random
ids, stop tokens disabled), at each batch size, on a randomly initialised model (speed does not depend on the
weights). Reported per step: milliseconds, and the ratio to the compiled static-cache ``generate`` of the same
batch (the target of the GPU work: kvlib <= 1.1x). The floor is the memory-bandwidth bound: the bytes a step
must read (weights + the KV cache at the mean length) over the copy bandwidth measured in the same run.

  python benchmarks/decode_speed.py --shape qwen3-8b --batches 1 16 64      # a GPU (bf16); writes the CSV
  python benchmarks/decode_speed.py --shape tiny --batches 1 4 --new-tokens 16 --out /tmp/ds.csv  # a smoke run

With ``--real qwen2.5-0.5b`` it also decodes ``--real-prompts`` GSM8K questions (slow, reasoning prompts, real
stop tokens, up to ``--real-tokens`` new tokens) end to end in one batch, static vs dynamic: items per second.

Writes ``tables/decode_speed.csv`` (or ``--out``) and its Markdown rendering next to it (``.md``, which the
README shows), and prints the table. ``--render CSV`` only rewrites the Markdown of an existing CSV.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvlib.core.tiny import SHAPES  # noqa: E402

def _model(shape: str, device: str, dtype):
    from kvlib.core.models import load_model

    return load_model(f"random:{shape}", device, dtype)[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted once each)."""
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(_timed(lambda: y.copy_(x), device) for _ in range(5))
    return 2 * nbytes / seconds


def floor_ms(model, batch: int, prompt: int, new_tokens: int, bandwidth: float) -> float:
    """Milliseconds per step to read the weights once and every row's KV cache at its mean length."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    kv = batch * per_token * (prompt + new_tokens / 2)
    return 1e3 * (weights + kv) / bandwidth


def run(shape: str, batches: list[int], prompt: int, new_tokens: int, compile_static: bool) -> pd.DataFrame:
    from kvlib.core.decoding import DecodeConfig, decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(shape, device, dtype)
    bandwidth = copy_bandwidth(device, 1 << 28 if device == "cpu" else 1 << 30)
    rows = []
    for b in batches:
        ids = torch.randint(3, model.config.vocab_size, (b, prompt), device=device)
        mask = torch.ones_like(ids)
        cfg = DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(-1,), compile=device == "cuda")
        eager = DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(-1,), cache="static", compile=False)
        dyn = DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(-1,), cache="dynamic")
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
        arms = {
            "kvlib.decode": lambda: decode(model, ids, mask, cfg),
            "kvlib.decode (static cache, eager)": lambda: decode(model, ids, mask, eager),
            "kvlib.decode (dynamic cache)": lambda: decode(model, ids, mask, dyn),
            "generate (dynamic cache)": lambda: model.generate(input_ids=ids, attention_mask=mask, **gen),
        }
        if compile_static:
            arms["generate (static cache, compiled)"] = lambda: model.generate(
                input_ids=ids, attention_mask=mask, cache_implementation="static", **gen)
        for name, fn in arms.items():
            with torch.inference_mode():
                fn()  # warm-up (the compiled arm compiles here)
                seconds = min(_timed(fn, device) for _ in range(2))
            rows.append({"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "shape": shape,
                         "dtype": str(dtype).removeprefix("torch."), "batch": b, "prompt": prompt,
                         "new_tokens": new_tokens, "method": name, "ms_per_step": 1e3 * seconds / new_tokens})
        rows.append({**rows[-1], "method": "bandwidth floor",
                     "ms_per_step": floor_ms(model, b, prompt, new_tokens, bandwidth)})
    df = pd.DataFrame(rows)
    ref = "generate (static cache, compiled)" if compile_static else "generate (dynamic cache)"
    base = df[df.method == ref].set_index("batch").ms_per_step
    df["ratio_vs_" + ("static_compiled" if compile_static else "dynamic")] = df.ms_per_step / df.batch.map(base)
    return df


def run_real(name: str, n: int, new_tokens: int) -> pd.DataFrame:
    """The embedded model on ``n`` GSM8K test questions in one batch: static (as the notebooks) vs dynamic."""
    from kvlib.assets.data import load_math
    from kvlib.core.decoding import DecodeConfig, decode
    from kvlib.core.models import load_model
    from kvlib.switching.thinking import render_prompt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(name, device=device)
    texts = [render_prompt(tok, it.question, "slow") for it in load_math("gsm8k", "test", n=n, seed=0)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = []
    for label, cfg in (("kvlib.decode", DecodeConfig(max_new_tokens=new_tokens, compile=device == "cuda")),
                       ("kvlib.decode (static cache, eager)", DecodeConfig(max_new_tokens=new_tokens, cache="static",
                                                                           compile=False)),
                       ("kvlib.decode (dynamic cache)", DecodeConfig(max_new_tokens=new_tokens, cache="dynamic"))):
        with torch.inference_mode():
            decode(model, enc.input_ids, enc.attention_mask, cfg)  # warm-up (compiles)
            out = {}
            seconds = _timed(lambda: out.setdefault("r", decode(model, enc.input_ids, enc.attention_mask, cfg)),
                             device)
        steps = max(len(t) for t in out["r"].tokens)
        rows.append({"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "shape": f"{name} (real)",
                     "dtype": str(model.dtype).removeprefix("torch."), "batch": n, "prompt": enc.input_ids.shape[1],
                     "new_tokens": new_tokens, "method": label, "ms_per_step": 1e3 * seconds / steps,
                     "items_per_s": n / seconds, "seconds": seconds,
                     "tokens": sum(len(t) for t in out["r"].tokens)})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """The README's table: ms per step by batch and method, kvlib's ratio to the compiled static ``generate``,
    and the real-model rows (items per second)."""
    synth = df[~df["shape"].str.endswith("(real)")]
    first = synth.iloc[0]
    wide = synth.pivot_table(index="batch", columns="method", values="ms_per_step", sort=False)
    order = [m for m in ("kvlib.decode", "generate (static cache, compiled)", "kvlib.decode (static cache, eager)",
                         "kvlib.decode (dynamic cache)",
                         "generate (dynamic cache)", "bandwidth floor") if m in wide.columns]
    wide = wide[order].round(1)
    if "generate (static cache, compiled)" in wide.columns:
        wide["kvlib / compiled generate"] = (synth[synth.method == "kvlib.decode"].set_index("batch").ms_per_step
                                             / synth[synth.method == "generate (static cache, compiled)"]
                                             .set_index("batch").ms_per_step).round(2)
    lines = [f"Milliseconds per decoding step, {first['shape']} shape (random weights), {first['dtype']}, "
             f"{first['prompt']}-token prompt, {first['new_tokens']} new tokens per row, on {first['device']} "
             "(`benchmarks/decode_speed.py`, one run).", "", wide.reset_index().to_markdown(index=False)]
    real = df[df["shape"].str.endswith("(real)")]
    if len(real):
        r = real.iloc[0]
        cols = real[["method", "items_per_s", "seconds", "tokens", "ms_per_step"]].round(2)
        lines += ["", f"End to end: {r['shape'].removesuffix(' (real)')} on {int(r['batch'])} GSM8K test questions "
                  f"in one batch (reasoning prompts, real stop tokens, up to {int(r['new_tokens'])} new tokens).",
                  "", cols.to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache arm (CPU smoke runs)")
    ap.add_argument("--real", default="", help="also an embedded model end to end on GSM8K, e.g. qwen2.5-0.5b")
    ap.add_argument("--real-prompts", type=int, default=256)
    ap.add_argument("--real-tokens", type=int, default=384)
    ap.add_argument("--out", default=str(ROOT / "tables" / "decode_speed.csv"))
    ap.add_argument("--render", default="", help="only write the Markdown of this CSV (no measurement)")
    args = ap.parse_args()
    if args.render:
        Path(args.render).with_suffix(".md").write_text(to_markdown(pd.read_csv(args.render)), encoding="utf-8")
        return
    df = run(args.shape, args.batches, args.prompt, args.new_tokens, compile_static=not args.no_compile)
    if args.real:
        df = pd.concat([df, run_real(args.real, args.real_prompts, args.real_tokens)], ignore_index=True)
    print(df.round(3).to_string(index=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.round(4).to_csv(args.out, index=False)
    Path(args.out).with_suffix(".md").write_text(to_markdown(df.round(4)), encoding="utf-8")


if __name__ == "__main__":
    main()
