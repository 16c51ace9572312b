"""Host-side cost of kvlib's decoding paths: ms per decode step of each layer over a bare greedy loop, in one run.

    python benchmarks/host_overhead.py [--batch 64 256] [--new-tokens 64] [--layers 24] [--profile ARM]
                                       [--tree PATH] [--out FILE.md]

The model is a random Qwen2 built in-process with the depth of qwen2.5-0.5b (24 layers) and a tiny width
(hidden 32, vocabulary of the tiny character tokenizer), so a forward costs little more than its kernel
launches and what is left is the host's work: Python per step or per row, host synchronisation, per-row
bookkeeping, extraction and store writes. Every item decodes exactly ``--new-tokens`` tokens (no stop token), so
the arms do the same model work. Arms:

  a  bare    a greedy loop over the model on a ``DynamicCache`` (the floor: Python + launches of the model itself)
  b  decode  :func:`kvlib.core.decoding.decode` (one batch)
  c  gen     :func:`kvlib.runs.generation.generate` into a temporary store, no extractors
  d  gen+ex  ``generate`` with the extractors of the answers notebook 03 scores
             (:func:`kvlib.switching.answers.answer_extractors`: KV trajectories and pooled prompt KV)
  e  switch  ``decode`` under notebook 04's KV-Generative controller
             (:class:`kvlib.switching.kv_switch.KVSwitchController`, a random difficulty MLP checked every 32 tokens,
             thresholds that never switch)
  f  gpu-path  ``decode`` on the GPU's path run eagerly: a static cache and the next step launched before the host
             reads the last one (``DecodeLoop.lookahead``), the host work a GPU step overlaps

Each arm runs once to warm up, then ``--reps`` times; the table gives the median ms per step (wall time / new
tokens), the part of it spent outside the model's forward (``host_ms_per_step``: kvlib's own work, what a GPU
would not hide) and its ratio to arm a at the same batch size. ``--profile ARM`` runs that arm once more under
cProfile at the largest batch and prints the top functions by own and cumulative time. ``--tree`` imports kvlib from
another checkout (e.g. a ``git worktree`` of an older commit), to compare before and after on one machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"a": "bare loop", "b": "decode", "c": "generate", "d": "generate + 03 extractors", "e": "decode + 04 switch",
        "f": "decode, static + lookahead"}


def build_model(layers: int, seed: int = 0):
    """A random Qwen2 ``(model, tokenizer)``: ``layers`` deep, hidden 32, 4 heads / 2 KV heads, fp32, CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvlib.core.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def prompts_for(tok, batch: int, seed: int = 0):
    """``batch`` random printable prompts of 16-48 characters (one token each) and their left-padded encoding."""
    import random

    from kvlib.runs.generation import Prompt

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 +-*="
    texts = ["".join(rng.choice(letters) for _ in range(rng.randint(16, 48))) for _ in range(batch)]
    prompts = [Prompt(f"q{i:05d}", t) for i, t in enumerate(texts)]
    tok.padding_side = "left"
    enc = tok(sorted(texts, key=len), return_tensors="pt", padding=True, add_special_tokens=False)
    return prompts, enc.input_ids, enc.attention_mask


def bare_loop(model, ids, mask, new_tokens: int):
    """Greedy decoding with nothing but the model calls: ``[batch, new_tokens]`` ids."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache, pos = DynamicCache(), (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        toks, nxt = [], pos[:, -1:] + 1
        for _ in range(new_tokens):
            t = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(t)
            mask = torch.cat([mask, torch.ones_like(t)], dim=1)
            out = model(input_ids=t, attention_mask=mask, position_ids=nxt, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            nxt = nxt + 1
        return torch.cat(toks, dim=1)


def switch_controller(model, batch: int):
    """Notebook 04's in-generation controller with a random difficulty MLP; it checks every 32 tokens and never
    switches (tau_fast < 0, tau_slow > 100)."""
    import torch

    from kvlib.switching import difficulty, kv_switch

    cfg = model.config
    dim = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    clf = difficulty.DifficultyClassifier(difficulty.FeatureSpec(32, 4), difficulty._mlp(dim, 64).eval(),
                                          torch.zeros(dim), torch.ones(dim))
    return kv_switch.KVSwitchController(kv_switch.classifier_difficulty(clf), ["slow"] * batch,
                                        {"fast": [5], "slow": [6]}, 32, -1.0, 101.0)


def arm_runner(arm: str, model, tok, batch: int, new_tokens: int):
    """A no-argument function running ``arm`` once at ``batch`` (a new temporary store per generate call)."""
    from kvlib.core.decoding import DecodeConfig, decode
    from kvlib.runs.generation import GenerationSettings, generate, open_store
    from kvlib.switching.answers import answer_extractors

    prompts, ids, mask = prompts_for(tok, batch)
    cfg = DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=())
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)

    def gen(extractors):
        with tempfile.TemporaryDirectory() as root:
            with open_store(root, "bench", "host", settings, extractors, model=model, tokenizer=tok) as store:
                generate(model, tok, prompts, store, settings, batch_size=batch, extractors=extractors,
                         progress=False)

    def gpu_path():
        from kvlib.core.decoding import DecodeLoop

        DecodeLoop.lookahead = True
        try:
            return decode(model, ids, mask, DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(), cache="static"))
        finally:
            DecodeLoop.lookahead = None

    return {"a": lambda: bare_loop(model, ids, mask, new_tokens),
            "b": lambda: decode(model, ids, mask, cfg),
            "c": lambda: gen({}),
            "d": lambda: gen(answer_extractors()),
            "e": lambda: decode(model, ids, mask, cfg, controller=switch_controller(model, batch)),
            "f": gpu_path}[arm]


class ForwardClock:
    """Seconds spent inside ``model.forward`` (the rest of a run's wall time is the host's own work)."""

    def __init__(self, model):
        self.seconds, inner = 0.0, model.forward

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        model.forward = timed


def time_arms(model, tok, batches, new_tokens: int, reps: int, arms: str) -> list[dict]:
    """Median ms per step of each arm at each batch size, the part of it outside the model's forward, and the
    ratio to arm a."""
    rows, clock = [], ForwardClock(model)
    for batch in batches:
        runners = {a: arm_runner(a, model, tok, batch, new_tokens) for a in arms}
        for fn in runners.values():
            fn()  # warm-up
        times, host = {a: [] for a in arms}, {a: [] for a in arms}
        for r in range(reps):  # rotate the order so drift of the shared machine spreads over the arms
            for a in arms[r % len(arms):] + arms[: r % len(arms)]:
                clock.seconds, t = 0.0, time.perf_counter()
                runners[a]()
                times[a].append(time.perf_counter() - t)
                host[a].append(times[a][-1] - clock.seconds)
        floor = statistics.median(times["a"]) if "a" in times else None
        for a in arms:
            ms = 1000 * statistics.median(times[a]) / new_tokens
            rows.append({"batch": batch, "arm": f"{a} {ARMS[a]}", "ms_per_step": round(ms, 2),
                         "host_ms_per_step": round(1000 * statistics.median(host[a]) / new_tokens, 2),
                         "x_bare": round(ms / (1000 * floor / new_tokens), 2) if floor else float("nan")})
            print(f"batch {batch:4d}  {rows[-1]['arm']:<28} {ms:8.2f} ms/step  host {rows[-1]['host_ms_per_step']:7.2f}"
                  f"  x{rows[-1]['x_bare']}", flush=True)
    return rows


def profile_arm(model, tok, arm: str, batch: int, new_tokens: int, top: int = 25) -> str:
    """cProfile of one run of ``arm``: the top functions by own time, then by cumulative time."""
    fn = arm_runner(arm, model, tok, batch, new_tokens)
    fn()
    prof = cProfile.Profile()
    prof.runcall(fn)
    text = []
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        text.append(buf.getvalue()[buf.getvalue().find("   ncalls"):])
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arms", default="abcdef")
    ap.add_argument("--profile", default=None, help="an arm letter to profile at the largest batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tree", default=str(ROOT), help="the checkout to import kvlib from")
    ap.add_argument("--out", default=None, help="write the table (and profile) as Markdown here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch

    import kvlib

    torch.set_num_threads(args.threads)
    model, tok = build_model(args.layers)
    print(f"kvlib from {Path(kvlib.__file__).parent}, torch {torch.__version__}, {args.threads} thread(s)")
    rows = time_arms(model, tok, args.batch, args.new_tokens, args.reps, args.arms)
    prof = profile_arm(model, tok, args.profile, max(args.batch), args.new_tokens) if args.profile else ""
    if prof:
        print(prof)
    if args.out:
        import pandas as pd

        md = (f"Host overhead per decode step: random Qwen2, {args.layers} layers, hidden 32, {args.new_tokens} new "
              f"tokens per item, CPU, {args.threads} thread(s), torch {torch.__version__}, median of {args.reps}; "
              f"host = outside the model forward; x_bare = ms per step / the bare greedy loop's at the same batch.\n\n"
              + pd.DataFrame(rows).to_markdown(index=False) + "\n")
        if prof:
            md += f"\n## cProfile of arm {args.profile} at batch {max(args.batch)}\n\n```\n{prof}\n```\n"
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
