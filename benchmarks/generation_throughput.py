"""Aggregate decode throughput of kvlib's batched, stored generation vs batch 1, in one run.

    python benchmarks/generation_throughput.py [--model qwen2.5-0.5b] [--new-tokens 128]

Every configuration decodes exactly ``--new-tokens`` tokens per item (stop tokens disabled), through
:func:`kvlib.generate` with a store in a temporary folder and the KV-trajectory extractor, so the
bookkeeping is included. Plain ``transformers`` greedy ``generate`` at the largest batch is measured
in the same run as a reference. Prints tokens/s and the ratios; writes tables/generation_throughput.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlib  # noqa: E402
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store  # noqa: E402
from kvlib.core.pooling import kv_trajectory_extractor  # noqa: E402


def _questions(n: int) -> list[str]:
    try:
        from kvlib.assets.data import load_math

        return [it.question for it in load_math("gsm8k", "test", n=n, seed=0)]
    except Exception:  # data package missing: synthetic prompts of similar length
        return [f"A shop sells {i} apples at {i + 3} dollars each and {2 * i} pears. How much money?" for i in range(n)]


def run(model, tok, batch: int, n_items: int, new_tokens: int, extractors: bool) -> float:
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = [Prompt(str(i), kvlib.render_prompt(tok, q, "slow")) for i, q in enumerate(_questions(n_items))]
    ex = {"kv": kv_trajectory_extractor()} if extractors else {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp, "bench", f"b{batch}", settings, ex)
        t0 = time.perf_counter()
        recs = generate(model, tok, prompts, store, settings, batch_size=batch, extractors=ex, progress=False)
        dt = time.perf_counter() - t0
    assert all(r["n_tokens"] == new_tokens for r in recs)
    return len(recs) * new_tokens / dt


def run_hf(model, tok, batch: int, new_tokens: int) -> float:
    texts = [kvlib.render_prompt(tok, q, "slow") for q in _questions(batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return batch * new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--out", default=str(ROOT / "tables" / "generation_throughput.csv"))
    args = ap.parse_args()
    model, tok = kvlib.load_model(args.model)
    run(model, tok, 2, 2, 8, True)  # warm-up
    rows = []
    for b in args.batches:
        n_items = max(b, 4) if b == 1 else b
        tps = run(model, tok, b, n_items, args.new_tokens, extractors=True)
        rows.append({"what": "kvlib.generate + store + kv extractor", "batch": b, "tok_s": tps})
        print(f"kvlib batch {b:>2}: {tps:6.1f} tok/s", flush=True)
    big = max(args.batches)
    hf = run_hf(model, tok, big, args.new_tokens)
    rows.append({"what": "transformers generate (reference)", "batch": big, "tok_s": hf})
    df = pd.DataFrame(rows)
    base = df[(df.batch == 1) & df.what.str.startswith("kvlib")].tok_s.iloc[0]
    df["ratio_vs_kvlib_batch1"] = df.tok_s / base
    df["model"], df["new_tokens"], df["threads"] = args.model, args.new_tokens, torch.get_num_threads()
    print(df.to_string(index=False))
    ours_big = df[(df.batch == big) & df.what.str.startswith("kvlib")].tok_s.iloc[0]
    print(f"batch {big} / batch 1 = {ours_big / base:.2f}x ; kvlib / transformers at batch {big} = {ours_big / hf:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.round(3).to_csv(args.out, index=False)
    caption = (f"Aggregate decode tokens/s of {args.model} on this CPU ({torch.get_num_threads()} threads), "
               f"{args.new_tokens} new tokens per item, greedy; batch {big} / batch 1 = {ours_big / base:.2f}x; "
               f"kvlib / transformers generate at batch {big} = {ours_big / hf:.2f}.")
    Path(args.out).with_suffix(".md").write_text(caption + "\n\n" + df.round(2).to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
