"""Overhead of in-generation KV difficulty checks: decode throughput and memory, with vs without them.

A: the decoding loop with the KV-Generative controller that :func:`kvlib.adaptive_generate` installs (live
last-N-token features of the last L layers + the difficulty MLP, every ``--check-every`` tokens; thresholds
set so that no switch fires, so both runs decode the same number of tokens). B: the same loop with no
controller. Every item runs to ``--new-tokens`` (no stop token), so tokens/s compare like for like.

Method: one warm-up round, then ``--reps`` rounds of three runs in rotating order: A, B and B' (B again).
Each round gives a throughput ratio A/B and a control ratio B'/B whose spread is the noise floor of the
machine (identical work); we report the median ratios, their spread (quartiles, min, max) and the median
tokens/s of each arm. Eager decoding is launch-bound and its run-to-run noise (several percent)
exceeds the effect, so we also time the parts: one check (features of every row + MLP, on the final
cache, synchronised) and one controller call with no row due; ``ratio_from_costs`` = step / (step +
check / check_every + idle call). Memory: on CUDA the peak allocated bytes of each arm (peak statistics reset
before each run); on CPU the bytes the checks add by construction (MLP weights + one check's gathered
slice), since the process RSS cannot be reset between arms.

Targets:
  cpu  the default embedded model (``kvlib.core.models.load_model``), real weights, fp32, batch 4.
  gpu  a randomly initialised model at the Qwen3-8B shape (36 layers, hidden 4096, 32 heads, 8 KV heads,
       head_dim 128, MLP 12288, vocab 151936), bf16: cost does not depend on the weights.

  python benchmarks/overhead.py --target cpu            # writes tables/overhead_cpu.csv, then the merged table
  python benchmarks/overhead.py --target gpu --out DIR  # writes DIR/overhead_gpu.csv (copy to tables/)
  python benchmarks/overhead.py --merge                 # tables/overhead.csv + .md from the per-target CSVs

kvlib is imported from this working tree without running its package ``__init__`` (a device machine may
lack the dependencies of modules this benchmark does not use).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kvlib():
    """Import kvlib's submodules from ROOT without executing ``kvlib/__init__.py``."""
    if "kvlib" not in sys.modules:
        pkg = types.ModuleType("kvlib")
        pkg.__path__ = [str(ROOT / "kvlib")]
        sys.modules["kvlib"] = pkg
    return (importlib.import_module("kvlib.switching.kv_switch"), importlib.import_module("kvlib.core.decoding"),
            importlib.import_module("kvlib.switching.difficulty"))


def qwen3_8b_shape(device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=40960, tie_word_embeddings=False, eos_token_id=151645)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_classifier(dim: int, n_tokens: int, n_layers: int, device):
    import torch

    _, _, difficulty = _kvlib()
    mlp = difficulty._mlp(dim, 512).to(device)
    return difficulty.DifficultyClassifier(difficulty.FeatureSpec(n_tokens, n_layers), mlp.eval(),
                                           torch.zeros(dim, device=device), torch.ones(dim, device=device))


def measure(model, batch: int, prompt_len: int, new_tokens: int, check_every: int, reps: int, n_tokens: int,
            n_layers: int, seed: int = 0) -> dict:
    import torch

    adaptive, decoding, _ = _kvlib()
    dev = next(model.parameters()).device
    cfg = model.config
    kv, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    clf = random_classifier(2 * kv * hd, n_tokens, n_layers, dev)
    g = torch.Generator().manual_seed(seed)
    lo = min(100, cfg.vocab_size // 4)
    ids = torch.randint(lo, cfg.vocab_size - lo, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    dcfg = decoding.DecodeConfig(max_new_tokens=new_tokens, stop_token_ids=(-1,))
    cuda = dev.type == "cuda"
    n_checks = []

    def run(with_checks: bool) -> tuple[float, int]:
        ctl = None
        if with_checks:  # tau_fast < 0 and tau_slow > 100: d is computed at every check, no switch fires
            ctl = adaptive.KVSwitchController(adaptive.classifier_difficulty(clf), ["slow"] * batch,
                                              {"fast": [1], "slow": [2]}, check_every, -1.0, 101.0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = decoding.decode(model, ids, mask, dcfg, controller=ctl)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert all(len(t) == new_tokens for t in res.tokens)
        keep(res)
        if ctl is not None:
            n_checks.append(sum(len(t) for t in ctl.trace))
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        del res
        return batch * new_tokens / dt, peak

    last_state = {}

    def keep(res):
        last_state["s"] = res.state

    run(True), run(False)  # warm-up
    a, b, ratios, controls, peaks_a, peaks_b = [], [], [], [], [], []
    arms = ["A", "B", "B'"]
    for r in range(reps):
        order = arms[r % 3:] + arms[: r % 3]
        got = {arm: run(arm == "A") for arm in order}
        a.append(got["A"][0]), b.append(got["B"][0])
        peaks_a.append(got["A"][1]), peaks_b.append(got["B"][1])
        ratios.append(got["A"][0] / got["B"][0])
        controls.append(got["B'"][0] / got["B"][0])
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    qc = statistics.quantiles(controls, n=4) if len(controls) >= 2 else [controls[0]] * 3
    check_s, idle_s = component_costs(adaptive, clf, last_state["s"], batch, check_every, cuda)
    step_s = batch / statistics.median(b)  # seconds per decoding step without checks
    check_bytes = sum(p.numel() * p.element_size() for p in clf.mlp.parameters()) + \
        batch * n_tokens * n_layers * 2 * kv * hd * 4
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "check_every": check_every,
            "feature_tokens": n_tokens, "feature_layers": n_layers, "reps": reps,
            "checks_per_run": n_checks[-1] if n_checks else 0,
            "plain_tok_s": statistics.median(b), "checked_tok_s": statistics.median(a),
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "control_median": statistics.median(controls), "control_q1": qc[0], "control_q3": qc[2],
            "control_min": min(controls), "control_max": max(controls),
            "check_ms": 1e3 * check_s, "idle_controller_us": 1e6 * idle_s, "step_ms": 1e3 * step_s,
            "ratio_from_costs": step_s / (step_s + check_s / check_every + idle_s),
            "peak_mem_plain_mb": max(peaks_b) / 2**20 if cuda else float("nan"),
            "extra_mem_mb": (max(peaks_a) - max(peaks_b)) / 2**20 if cuda else check_bytes / 2**20,
            "extra_mem_kind": "measured peak allocated" if cuda else "by construction (MLP + one check's slice)"}


def component_costs(adaptive, clf, state, batch: int, check_every: int, cuda: bool, n: int = 50):
    """Seconds per check (features of every row + MLP, on the final cache) and per controller call with no row due.

    A less noisy estimate than end-to-end A/B timing: the checks add ``check / check_every + idle`` per step.
    """
    import torch

    difficulty = adaptive.classifier_difficulty(clf)
    rows = list(range(batch))
    for _ in range(5):
        difficulty(state, rows)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        difficulty(state, rows)  # ends with .tolist(): synchronises like the real check
    check = (time.perf_counter() - t0) / n
    ctl = adaptive.KVSwitchController(difficulty, ["slow"] * batch, {"fast": [1], "slow": [2]}, check_every, -1, 101)
    ctl.last = [len(t) for t in state.tokens]  # no row due: the cost of every non-check step
    done, state.done = state.done, [False] * batch
    t0 = time.perf_counter()
    for _ in range(1000):
        ctl(state)
    idle = (time.perf_counter() - t0) / 1000
    state.done = done
    return check, idle


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def merge(tables: Path) -> None:
    import pandas as pd

    parts = [pd.read_csv(p) for p in (tables / "overhead_gpu.csv", tables / "overhead_cpu.csv") if p.exists()]
    if not parts:
        raise SystemExit(f"no overhead_gpu.csv or overhead_cpu.csv in {tables}: run a target first")
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(tables / "overhead.csv", index=False)
    cols = ["device", "model", "batch", "new_tokens", "check_every", "plain_tok_s", "checked_tok_s", "ratio_median",
            "ratio_q1", "ratio_q3", "control_median", "control_q1", "control_q3", "reps", "step_ms", "check_ms",
            "idle_controller_us", "ratio_from_costs", "extra_mem_mb"]
    cols = [c for c in cols if c in df]
    cap = ("Decode throughput with KV-Generative difficulty checks (A) vs the same loop without them (B): median of "
           "per-round ratios A/B over interleaved repetitions and quartiles; control: the same ratio for two runs "
           "without checks (B'/B), i.e. the noise floor of the machine. Extra memory measured as peak "
           "allocated on CUDA, by construction on CPU. Every item decodes the same number of tokens. ratio_from_costs: "
           "step / (step + check / check_every + idle controller call), from separately timed components (less noisy).")
    (tables / "overhead.md").write_text(f"{cap}\n\n{df[cols].to_markdown(index=False, floatfmt='.4g')}\n")
    print(df[cols].to_string(index=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["cpu", "gpu"])
    ap.add_argument("--merge", action="store_true", help="only merge the per-target CSVs")
    ap.add_argument("--out", default=str(ROOT / "tables"))
    ap.add_argument("--model", default="qwen2.5-0.5b", help="cpu target: kvlib model name")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=32)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32, help="N: feature tokens")
    ap.add_argument("--layers", type=int, default=8, help="L: feature layers")
    ap.add_argument("--threads", type=int, default=None, help="cpu target: torch threads (default: torch's)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        merge(out)
        return 0
    if args.target is None:
        ap.error("--target or --merge is required")
    import torch
    import transformers

    if args.target == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device")
        model, name, device = qwen3_8b_shape("cuda", torch.bfloat16), "Qwen3-8B shape, random bf16", \
            torch.cuda.get_device_name()
        batches, prompt, new, reps = args.batches or [1, 8], args.prompt_tokens or 512, args.new_tokens or 128, \
            args.reps or 8
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        _kvlib()
        from kvlib.core.models import load_model

        model, _ = load_model(args.model)
        name, device = f"{args.model} fp32", f"CPU x{torch.get_num_threads()} threads"
        batches, prompt, new, reps = args.batches or [4], args.prompt_tokens or 128, args.new_tokens or 64, \
            args.reps or 4
    rows = []
    for b in batches:
        t0 = time.perf_counter()
        row = measure(model, b, prompt, new, args.check_every, reps, args.tokens, args.layers)
        rows.append({"device": device, "model": name, **row, "torch": torch.__version__,
                     "transformers": transformers.__version__, "seconds": round(time.perf_counter() - t0, 1)})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    write_csv(rows, out / f"overhead_{args.target}.csv")
    if args.target == "cpu" and out.resolve() == (ROOT / "tables").resolve():
        merge(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
