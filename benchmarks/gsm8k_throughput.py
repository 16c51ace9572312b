"""The real workload: tokens/s of the slow (reasoning) answers to every GSM8K test question, greedy.

Three ways to decode the same items at the same batch size, in one run on one device:

- ``kvlib.generate`` (continuous batching: finished rows are stored and waiting items join the running batch),
  with a result store in a temporary folder, as the notebooks run it (on a GPU the step captured), and again with
  the step eager (``KVLIB_COMPILE=0``, on a GPU only);
- ``kvlib.decode`` in fixed batches (each batch drains to its longest row): what continuous batching replaces;
- transformers ``generate`` with a static cache, compiled (``cache_implementation="static"``), in the same
  fixed batches.

Items are sorted by prompt length (as :func:`kvlib.generate` does) and every row stops at its EOS or at
``--new-tokens``; tokens/s counts the tokens of the answers (EOS included, padding after it not). The floor is
the memory-bandwidth bound of a full batch: the weights and the batch's KV cache at the mean answer length read
once per step (copy bandwidth measured in the same run), ``batch`` tokens per step. Each arm is warmed up on a
few items first (compilation included there, reported apart). The table states the device and versions.

  python benchmarks/gsm8k_throughput.py --model qwen2.5-0.5b --batch 64        # a GPU: tables/gsm8k_throughput.md
  python benchmarks/gsm8k_throughput.py --n 6 --batch 3 --new-tokens 8 --no-compile --out /tmp/g.csv  # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlib  # noqa: E402
from kvlib.assets.data import load_math  # noqa: E402
from kvlib.core.decoding import DecodeConfig, decode  # noqa: E402
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_speed import copy_bandwidth  # noqa: E402


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[: k + 1]
    return tokens


def arm_kvlib(model, tok, prompts: list[Prompt], batch: int, new_tokens: int, compiled: str = "1"
              ) -> dict[str, list[int]]:
    old = os.environ.get("KVLIB_COMPILE")
    os.environ["KVLIB_COMPILE"] = compiled
    try:
        return _arm_kvlib(model, tok, prompts, batch, new_tokens)
    finally:
        os.environ.pop("KVLIB_COMPILE") if old is None else os.environ.__setitem__("KVLIB_COMPILE", old)


def _arm_kvlib(model, tok, prompts: list[Prompt], batch: int, new_tokens: int) -> dict[str, list[int]]:
    settings = GenerationSettings(max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        recs = generate(model, tok, prompts, open_store(tmp, "bench", "gsm8k", settings), settings, batch_size=batch,
                        progress=False)
    return {r["item_id"]: r["token_ids"] for r in recs}


def _batches(tok, prompts: list[Prompt], batch: int):
    ordered = sorted(prompts, key=lambda p: len(tok(p.text, add_special_tokens=False).input_ids))
    for s in range(0, len(ordered), batch):
        chunk = ordered[s: s + batch]
        yield chunk, tok([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)


def arm_fixed(model, tok, prompts: list[Prompt], batch: int, new_tokens: int) -> dict[str, list[int]]:
    out, device = {}, next(model.parameters()).device
    for chunk, enc in _batches(tok, prompts, batch):
        res = decode(model, enc.input_ids.to(device), enc.attention_mask.to(device),
                     DecodeConfig(max_new_tokens=new_tokens))
        out.update({p.id: t for p, t in zip(chunk, res.tokens)})
    return out


def arm_hf(model, tok, prompts: list[Prompt], batch: int, new_tokens: int, compiled: bool) -> dict[str, list[int]]:
    out, device = {}, next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if compiled:
        kw["cache_implementation"] = "static"
    for chunk, enc in _batches(tok, prompts, batch):
        ids = model.generate(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), **kw)
        for p, row in zip(chunk, ids[:, enc.input_ids.shape[1]:].tolist()):
            out[p.id] = _cut(row, eos)
    return out


def floor_tok_s(model, batch: int, mean_len: float, bandwidth: float) -> float:
    """Tokens/s of a full batch if a step cost only reading the weights and the batch's KV cache once."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    return batch / ((weights + batch * per_token * mean_len) / bandwidth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", default="all", help="number of GSM8K test questions (all: 1,319)")
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warm-items", type=int, default=0, help="items of the warm-up run (default: one batch)")
    ap.add_argument("--no-compile", action="store_true", help="transformers generate on a dynamic cache instead "
                                                                "(CPU smoke runs)")
    ap.add_argument("--out", default="", help="CSV (and .md beside it); default tables/gsm8k_throughput.csv on a "
                                              "GPU, nothing written on a CPU unless given")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = kvlib.load_model(args.model, device=device)
    items = load_math("gsm8k", "test", n=None if args.n == "all" else int(args.n), seed=0)
    prompts = [Prompt(it.id, kvlib.render_prompt(tok, it.question, "slow")) for it in items]
    warm = prompts[: args.warm_items or args.batch]
    hf_name = "transformers generate (dynamic cache)" if args.no_compile else \
        "transformers generate (static cache, compiled)"
    arms = {"kvlib.generate (continuous batching)": lambda ps: arm_kvlib(model, tok, ps, args.batch, args.new_tokens),
            **({"kvlib.generate (continuous batching, eager step)":
                lambda ps: arm_kvlib(model, tok, ps, args.batch, args.new_tokens, compiled="0")}
               if device == "cuda" else {}),
            "kvlib.decode (fixed batches)": lambda ps: arm_fixed(model, tok, ps, args.batch, args.new_tokens),
            hf_name: lambda ps: arm_hf(model, tok, ps, args.batch, args.new_tokens, not args.no_compile)}
    rows, outputs = [], {}
    for name, fn in arms.items():
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            fn(warm)
            _sync(device)
            t1 = time.perf_counter()
            outputs[name] = fn(prompts)
            _sync(device)
            seconds = time.perf_counter() - t1
        n_tok = sum(len(t) for t in outputs[name].values())
        rows.append({"method": name, "tokens": n_tok, "seconds": seconds, "tok_s": n_tok / seconds,
                     "warm_up_s": t1 - t0})
        print(f"{name:>48}: {n_tok / seconds:9.1f} tok/s ({seconds:.1f} s, warm-up {t1 - t0:.1f} s)", flush=True)
    ref = outputs["kvlib.generate (continuous batching)"]
    for row in rows:
        row["same_tokens_as_kvlib"] = sum(outputs[row["method"]][k] == v for k, v in ref.items()) / len(ref)
    mean_len = sum(len(tok(p.text, add_special_tokens=False).input_ids) for p in prompts) / len(prompts) + \
        sum(len(t) for t in ref.values()) / len(ref) / 2
    bw = copy_bandwidth(device, 1 << 28 if device == "cpu" else 1 << 30)
    rows.append({"method": "bandwidth floor (full batch)", "tok_s": floor_tok_s(model, args.batch, mean_len, bw)})
    df = pd.DataFrame(rows)
    base = df.loc[df.method == hf_name, "tok_s"].iloc[0]
    df["ratio_vs_transformers"] = df.tok_s / base
    import transformers

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})"
    caption = (f"Slow answers of {args.model} ({str(model.dtype).removeprefix('torch.')}) to {len(prompts)} GSM8K "
               f"test questions, greedy, at most {args.new_tokens} new tokens, batch {args.batch}, one run on "
               f"{dev_name}, torch {torch.__version__}, transformers {transformers.__version__} "
               "(`benchmarks/gsm8k_throughput.py`). Tokens of the answers per second after a warm-up run; "
               "same_tokens_as_kvlib: share of items whose answer equals kvlib's token for token.")
    table = caption + "\n\n" + df.round(3).to_markdown(index=False) + "\n"
    print(table)
    out = args.out or (str(ROOT / "tables" / "gsm8k_throughput.csv") if device == "cuda" else "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        df.round(4).assign(device=dev_name, torch=torch.__version__, transformers=transformers.__version__,
                           model=args.model, batch=args.batch, new_tokens=args.new_tokens).to_csv(out, index=False)
        Path(out).with_suffix(".md").write_text(table, encoding="utf-8")
        print(f"wrote {out}")
    print("GPU run: python benchmarks/gsm8k_throughput.py --model qwen2.5-0.5b --batch 64")


if __name__ == "__main__":
    main()
