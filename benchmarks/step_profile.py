"""Where one decode step's time goes: a torch-profiler breakdown of kvlib's step at one batch size.

A random-weight model at a real shape (default Qwen3-8B, bf16 on a GPU) decodes a batch whose rows all run to
the budget; after ``--warm`` steps, ``--steps`` steps of the real loop (:class:`kvlib.core.decoding.DecodeLoop`:
append, feed) are profiled, once with the step captured (as notebooks run it on a GPU) and once eagerly (every
kernel visible). Each step is split into

- attention over the padded static cache (attention kernels),
- the other model kernels (matrix products, norms, rotary embedding, element-wise),
- sampling statistics (max probability, entropy, greedy pick: :func:`kvlib.core.cache.token_stats`),
- host synchronisation (the host blocked on the device: the per-step copy of the statistics),
- Python and launch overhead (wall time in which the device is idle),

reported in milliseconds per step with the wall time, the bandwidth floor (the weights and the cache read once per
step at the copy bandwidth measured in the same process, ``benchmarks/decode_speed.py``), their ratio and the arm's
device-memory peak, and written as a Markdown table. Each arm runs in a process of its own, so none inherits
another's compiled graphs or memory.

  python benchmarks/step_profile.py --shape qwen3-8b --batch 64                 # a GPU: tables/step_profile.md
  python benchmarks/step_profile.py --shape tiny --batch 4 --steps 4 --out /tmp/step_profile.md  # CPU smoke run
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlib.core.cache as kvcache  # noqa: E402
from kvlib.core.decoding import DecodeConfig, DecodeLoop  # noqa: E402
from kvlib.core.models import load_model  # noqa: E402
from kvlib.core.tiny import SHAPES  # noqa: E402

ATTENTION = re.compile(r"flash|fmha|attention|sdpa|scaled_dot|_efficient", re.I)
SYNC = re.compile(r"cuda(Stream|Device|Event)Synchronize|cudaMemcpy(?!Async)|_local_scalar_dense", re.I)


def _loop(model, batch: int, prompt: int, budget: int, compile_step: bool, ahead: bool) -> DecodeLoop:
    device = next(model.parameters()).device
    cfg = DecodeConfig(max_new_tokens=budget, stop_token_ids=(-1,), cache="static", compile=compile_step)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    loop = DecodeLoop(model, cfg, static=True, room=kvcache.bucket(prompt + budget + 16))
    loop.lookahead = ahead
    loop.start(ids, torch.ones_like(ids), [0] * batch, [None] * batch)
    return loop


def _step(loop: DecodeLoop) -> None:
    """One step exactly as :meth:`DecodeLoop.run` takes it (no controller, no rows leaving): with
    ``loop.lookahead`` the next step is launched before the host reads this one."""
    loop.state.step += 1
    ahead = loop._launch_ahead() if loop._can_look_ahead() else None
    loop.next_tokens(ahead)
    if ahead is not None:  # as run() does: the launched step's logits are the ones the next step reads
        loop.logits, loop.stats = ahead.logits, ahead.stats
    if ahead is None or not loop._settle(ahead, None):
        loop.feed()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch: int, prompt: int, steps: int, warm: int, compile_step: bool, ahead: bool) -> dict:
    """Milliseconds per step by part (see the module docstring) over ``steps`` profiled steps."""
    device = next(model.parameters()).device
    on_cuda = torch.device(device).type == "cuda"
    loop = _loop(model, batch, prompt, warm + steps + 2, compile_step, ahead)
    stats_fn = kvcache.token_stats

    def timed_stats(logits):  # the eager step calls kvlib.core.cache.token_stats by its module name
        with record_function("kvlib::token_stats"):
            return stats_fn(logits)

    kvcache.token_stats = timed_stats
    try:
        with torch.inference_mode():
            for _ in range(warm):
                _step(loop)
            _sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    _step(loop)
                _sync(device)
                wall = time.perf_counter() - t0
    finally:
        kvcache.token_stats = stats_fn
    events = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    kernels = [e for e in events if dev(e) > 0]
    attention = sum(dev(e) for e in kernels if ATTENTION.search(e.key))
    busy = sum(dev(e) for e in kernels)
    stats_ev = [e for e in events if e.key == "kvlib::token_stats"]
    if on_cuda:
        sampling = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) for e in stats_ev)
    else:  # the CPU runs the kernels on the host: the region's own time
        sampling = sum(e.cpu_time_total for e in stats_ev)
        attention = sum(e.self_cpu_time_total for e in events if ATTENTION.search(e.key))
        busy = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    sync = sum(e.self_cpu_time_total for e in events if SYNC.search(e.key))
    per = lambda us: us / 1e3 / steps  # noqa: E731
    wall_ms = 1e3 * wall / steps
    return {"attention (padded static cache)": per(attention),
            "other model kernels": per(busy - attention - (sampling if on_cuda else 0)),
            "sampling statistics": per(sampling) if stats_ev or not compile_step else float("nan"),
            "host synchronisation (host blocked)": per(sync),
            "Python and launch overhead (device idle)": max(wall_ms - per(busy), 0.0) if on_cuda else float("nan"),
            "wall": wall_ms, "cache capacity": loop.state.cache.capacity}


def measure_apart(model, batch: int, prompt: int, steps: int, warm: int, compile_step: bool, ahead: bool) -> dict:
    """:func:`measure`, with the device memory it peaked at (GB), after freeing what an earlier arm left (its
    static cache, compiled graphs and their memory pools); an arm that runs out of device memory gives a column of
    NaN with the memory it had reached, not a lost run."""
    import gc

    gc.collect()
    on_cuda = next(model.parameters()).device.type == "cuda"
    if on_cuda:
        torch._dynamo.reset()  # the earlier arm's compiled step and its CUDA-graph pool
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row = measure(model, batch, prompt, steps, warm, compile_step, ahead)
    except torch.OutOfMemoryError:
        row = {"wall": float("nan"), "cache capacity": float("nan")}
        print(f"out of device memory (compile_step={compile_step}, ahead={ahead}): that column is NaN")
    row["peak device memory (GB)"] = torch.cuda.max_memory_allocated() / 1e9 if on_cuda else float("nan")
    return row


ARMS = {"captured, launched ahead (as decoded)": (True, True), "captured, step by step": (True, False),
        "eager step": (False, False)}  # (captured, next step launched before the host reads this one)


def arm_in_process(arm: str, argv: list[str]) -> dict:
    """One arm measured in a fresh process (this script with ``--arm``): an arm starts from an empty device, with
    no compiled graphs, CUDA-graph pools or cached blocks of an earlier one, so its memory peak is its own and a
    later arm cannot run out of memory on what an earlier one left. A process that dies gives a NaN column."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        done = subprocess.run([sys.executable, __file__, *argv, "--arm", arm, "--row", str(out)],
                              capture_output=True, text=True)
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    print(f"arm {arm!r} failed (exit {done.returncode}): {' | '.join(tail)}; that column is NaN")
    return {"wall": float("nan"), "cache capacity": float("nan"), "peak device memory (GB)": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--out", default="", help="Markdown table (default tables/step_profile.md on a GPU; a CPU run "
                                              "writes nothing unless given one)")
    ap.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # one arm, in a process of its own
    ap.add_argument("--row", help=argparse.SUPPRESS)  # where that process writes its column (JSON)
    args, argv = ap.parse_args(), sys.argv[1:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.arm:
        import json

        from decode_speed import copy_bandwidth, floor_ms

        model = load_model(f"random:{args.shape}", device=device, dtype=dtype)[0]
        bandwidth = copy_bandwidth(device, 1 << 28 if device == "cpu" else 1 << 30)
        row = measure_apart(model, args.batch, args.prompt, args.steps, args.warm, *ARMS[args.arm])
        # the profiled steps read the weights and a cache of prompt + warm-up + (on average) half the steps
        row["bandwidth floor"] = floor_ms(model, args.batch, args.prompt + args.warm, args.steps, bandwidth)
        row["wall / floor"] = row["wall"] / row["bandwidth floor"]
        Path(args.row).write_text(json.dumps(row), encoding="utf-8")
        return
    arms = list(ARMS) if device == "cuda" else ["eager step"]  # the CPU has no captured step
    df = pd.DataFrame({name: arm_in_process(name, argv) for name in arms})
    df.index.name = "ms per step"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    import transformers

    caption = (f"One decode step of kvlib at batch {args.batch}, {args.shape} shape (random weights), "
               f"{str(dtype).removeprefix('torch.')}, {args.prompt}-token prompts, static cache of "
               f"{df.loc['cache capacity'].max():.0f} positions, mean of {args.steps} profiled steps after "
               f"{args.warm} warm-up steps, on {name}, torch {torch.__version__}, transformers "
               f"{transformers.__version__} (`benchmarks/step_profile.py`). Attention, other kernels and "
               "sampling are device time; host synchronisation is host time blocked on the device; the overhead "
               "is wall time minus device-busy time. Kernels inside a captured graph are attributed only when the "
               "profiler can see them (NaN otherwise). The bandwidth floor reads the weights and the cache once per "
               "step at the copy bandwidth measured in each arm's process; each arm runs in a process of its own.")
    table = caption + "\n\n" + df.drop(index="cache capacity").round(3).reset_index().to_markdown(index=False) + "\n"
    print(table)
    out = args.out or (str(ROOT / "tables" / "step_profile.md") if device == "cuda" else "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table, encoding="utf-8")
        print(f"wrote {out}")
    print("GPU run: python benchmarks/step_profile.py --shape qwen3-8b --batch 64")


if __name__ == "__main__":
    main()
