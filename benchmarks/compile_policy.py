"""Eager vs captured decode step: what a compile costs and what it saves per step, at the notebooks' shapes.

On a GPU kvlib captures its decode step on a static cache unless ``KVLIB_COMPILE=0`` (or
``DecodeConfig(compile=False)``) keeps it eager (:func:`kvlib.core.decoding.compile_default`). A capture is paid
per batch size and cache capacity, so whether it pays depends on how many steps each shape decodes. For each batch
size this decodes ``--new-tokens`` steps after a ``--prompt``-token prompt (random ids, stop tokens off) on a
randomly initialised Qwen2 of an embedded model's dimensions, twice per mode: the first call's extra time over the
second is the compile (and capture), the second gives ms per step. Modes: eager, captured with symbolic shapes (the
default: the first shapes compile, later ones are only captured) and captured with one compile per shape
(``KVLIB_COMPILE=static``), each with kvlib's grouped decode attention and with transformers' ``sdpa``
(``--attention``). ``break_even_steps`` = that shape's compile seconds / step time saved against eager: a
shape that decodes more steps than that gains.

  python benchmarks/compile_policy.py --dims qwen2.5-1.5b --batches 64 512            # a GPU
  python benchmarks/compile_policy.py --dims tiny --batches 2 --new-tokens 4 --prompt 8   # CPU smoke (eager only)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvlib.core.attention import use_grouped_decode  # noqa: E402
from kvlib.core.decoding import DecodeConfig, decode  # noqa: E402

DIMS = {  # the embedded models' config.json dimensions
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=512),
}


def random_qwen2(dims: str, device: str, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{"vocab_size": 151936, "max_position_embeddings": 32768, **DIMS[dims]})
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def _timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


MODES = {"eager": ("0", False), "captured, symbolic shapes": ("1", True), "captured, one compile per shape":
         ("static", True)}


def measure(model, batch: int, prompt: int, new_tokens: int, mode: str, device: str) -> dict:
    """Decode twice at ``batch`` rows under ``mode`` (a key of :data:`MODES`): the first call's extra time is the
    compile and capture of this shape, the second gives ms per step."""
    setting, compiled = MODES[mode]
    os.environ["KVLIB_COMPILE"] = setting
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    cfg = DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(-1,), cache="static",
                       compile=compiled and device == "cuda")
    with torch.inference_mode():
        first = _timed(lambda: decode(model, ids, mask, cfg), device)
        second = _timed(lambda: decode(model, ids, mask, cfg), device)
    return {"batch": batch, "mode": mode, "first_call_s": first, "ms_per_step": 1e3 * second / new_tokens,
            "compile_s": max(first - second, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", choices=sorted(DIMS), default="qwen2.5-1.5b")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--attention", nargs="+", choices=["grouped", "sdpa"], default=["grouped", "sdpa"],
                    help="decode attention: kvlib's grouped one (what a model loaded on a GPU uses) and/or "
                         "transformers' sdpa (repeat_kv)")
    ap.add_argument("--out", default="", help="CSV (and .md beside it)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_qwen2(args.dims, device, torch.bfloat16 if device == "cuda" else torch.float32)
    rows = []
    for attn in args.attention:
        model.config._attn_implementation = "sdpa"
        if attn == "grouped":
            use_grouped_decode(model)
        for mode in (MODES if device == "cuda" else ["eager"]):  # each mode over every batch: its later shapes
            for b in args.batches:                                  # show what a new shape costs after the first
                rows.append({"attention": attn, **measure(model, b, args.prompt, args.new_tokens, mode, device)})
                print(rows[-1], flush=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    eager = df[df["mode"] == "eager"].set_index(["attention", "batch"]).ms_per_step
    base = pd.Series([eager.get((a, b), float("nan")) for a, b in zip(df.attention, df.batch)])
    saved = (base - df.ms_per_step) / 1e3
    df["break_even_steps"] = (df.compile_s / saved).where((saved > 0) & (df["mode"] != "eager"))
    import transformers

    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    caption = (f"Decode step of a random Qwen2 with {args.dims}'s dimensions, {args.prompt}-token prompt, "
               f"{args.new_tokens} steps, static cache, on {dev}, torch {torch.__version__}, transformers "
               f"{transformers.__version__} (`benchmarks/compile_policy.py`, one run).")
    table = caption + "\n\n" + df.round(3).to_markdown(index=False) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        Path(args.out).with_suffix(".md").write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
