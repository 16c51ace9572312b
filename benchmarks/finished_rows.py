"""Wall time of a batch of real slow answers when finished rows leave the batch vs when they stay, in one run.

    python benchmarks/finished_rows.py [--model qwen2.5-0.5b] [--set svamp] [--n 16] [--max-new 384]

Slow answers vary in length, so a batch that keeps every row pays for finished rows until its longest
answer ends. Both runs decode the same greedy answers (asserted) with EOS enabled. Prints the times, the
useful share of row-steps, and the speed-up; writes tables/finished_rows.csv.
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

import kvlib  # noqa: E402
from kvlib.assets.data import load_math  # noqa: E402
from kvlib.core.decoding import DecodeConfig, decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--set", default="svamp")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=384)
    ap.add_argument("--out", default=str(ROOT / "tables" / "finished_rows.csv"))
    args = ap.parse_args()
    model, tok = kvlib.load_model(args.model)
    tok.padding_side = "left"
    items = load_math(args.set, "test", n=args.n, seed=0)
    enc = tok([kvlib.render_prompt(tok, it.question, "slow") for it in items], return_tensors="pt", padding=True,
              add_special_tokens=False)
    cfg = DecodeConfig(max_new_tokens=args.max_new)
    decode(model, enc.input_ids[:2], enc.attention_mask[:2], DecodeConfig(max_new_tokens=4))  # warm-up
    times, results = {}, {}
    for name, hook in (("rows stay", None), ("finished rows leave", lambda part: None)):
        t0 = time.perf_counter()
        results[name] = decode(model, enc.input_ids, enc.attention_mask, cfg, on_finish=hook)
        times[name] = time.perf_counter() - t0
        print(f"{name:>20}: {times[name]:7.1f} s", flush=True)
    assert results["rows stay"].tokens == results["finished rows leave"].tokens, "outputs differ"
    lengths = [len(t) for t in results["rows stay"].tokens]
    useful = sum(lengths) / (len(lengths) * max(lengths))
    speedup = times["rows stay"] / times["finished rows leave"]
    print(f"answer lengths {min(lengths)}-{max(lengths)} (useful share of row-steps {useful:.2f}); "
          f"speed-up {speedup:.2f}x")
    df = pd.DataFrame([{"mode": k, "seconds": v} for k, v in times.items()])
    df["speedup"], df["useful_row_step_share"] = speedup, useful
    df["model"], df["set"], df["n"], df["max_new_tokens"] = args.model, args.set, args.n, args.max_new
    df["threads"] = torch.get_num_threads()
    df.round(3).to_csv(args.out, index=False)
    caption = (f"Wall time of one batch of {args.n} greedy slow answers ({args.set} test, {args.model}, "
               f"<= {args.max_new} new tokens, {torch.get_num_threads()} CPU threads) when finished rows "
               f"leave the batch vs when they stay; identical outputs; answer lengths {min(lengths)}-{max(lengths)} "
               f"tokens; speed-up {speedup:.2f}x.")
    Path(args.out).with_suffix(".md").write_text(caption + "\n\n" + df.round(3).to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
