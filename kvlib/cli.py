"""The ``kvlib`` command: ``kvlib reproduce`` runs the notebooks, ``kvlib info MODEL`` tells what a model costs.

``kvlib reproduce [--profile P] [--model M] [--data-dir D] [--only NN ...] [--publish]`` hands its arguments to
:func:`kvlib.experiments.pipeline.main` (papermill over ``notebooks/NN_*.ipynb`` of the source checkout, into a
run folder under ``build/``; ``--publish`` copies the results into the committed files once every notebook
succeeded).

``kvlib info MODEL`` loads no weights. It names where the weights come from (for an embedded model: its
packages, pinned SHA-256 and converted folder; a local folder; a hub id) and prints
:func:`kvlib.memory_estimate` at a few context lengths. The config comes from the converted folder, a local
``config.json``, a shipped config (``kvlib/configs``), the hub, or, for an embedded model not yet converted,
the GGUF header of its installed packages (read directly: a few MB, no tensor data).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

# gguf_config and _package_files stay reachable as kvlib.cli.* (scripts/preflight.py's tests read them here)
from .core.model_info import _package_files, describe_model, gguf_config, human_bytes  # noqa: F401
from .core.models import EMBEDDED_MODELS
from .profiles import PROFILES

__all__ = ["main", "gguf_config"]

CONTEXTS = (1024, 4096, 16384, 32768)


def _info(args) -> int:
    import torch

    from .core.memory import load_config, memory_estimate, prefill_peak  # torch: `kvlib --help` stays light

    lines, config = describe_model(args.model)
    print("\n".join(lines))
    if config is None:
        return 0
    cfg = load_config(config)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    limit = cfg.get("max_position_embeddings")
    contexts = args.context or sorted({c for c in CONTEXTS if not limit or c <= limit} | ({limit} if limit else set()))
    est = memory_estimate(cfg, 0, dtype)
    heads_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    print(f"  shape      {cfg.get('model_type')}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']} heads / {heads_kv} KV heads x {head_dim}, vocab {cfg['vocab_size']}"
          + (f", context {limit}" if limit else ""))
    print(f"  parameters {est['parameters'] / 1e6:,.1f} M")
    print(f"\nmemory estimate ({dtype}, batch 1; kvlib.memory_estimate):")
    header = ("context", "weights", "KV cache", "hidden states", "prefill peak")
    print("  " + "".join(f"{h:>15}" for h in header))
    for t in contexts:
        e = memory_estimate(cfg, int(t), dtype)
        row = (f"{t:,}", human_bytes(e["weights"]), human_bytes(e["kv_cache"]), human_bytes(e["hidden_states"]),
               human_bytes(prefill_peak(cfg, int(t), dtype)))
        print("  " + "".join(f"{c:>15}" for c in row))
    print("  (hidden states: all layers plus the embedding output, what a hidden-state method must keep;"
          " the KV cache is held by inference anyway)")
    return 0


def _reproduce(args, parser) -> int:
    from .experiments import pipeline  # the one way from the library's front door into the experiments

    available = sorted({p.name[:2] for p in pipeline.notebooks()})
    if not available:
        parser.error(f"no notebooks in {pipeline.ROOT / 'notebooks'}: `kvlib reproduce` runs the notebooks of a "
                     "source checkout (git clone, then `pip install -e .` or `make reproduce` there)")
    unknown = [n for n in args.only or [] if n not in available]
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such notebook; choose from {' '.join(available)}")
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a folder")
    argv = ["--profile", args.profile]
    if args.model:
        argv += ["--model", args.model]
    if args.data_dir:
        argv += ["--data-dir", str(Path(args.data_dir).expanduser())]
    if args.only:
        argv += ["--only", *args.only]
    if args.out:
        argv += ["--out", args.out]
    if args.publish:
        argv += ["--publish"]
    return pipeline.main(argv)


def _notebook_number(text: str) -> str:
    if not re.fullmatch(r"\d\d", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a two-digit notebook number such as 01 or 03")
    return text


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("kvlib")
    except PackageNotFoundError:  # a source tree that was never installed
        ver = "unknown"
    parser = argparse.ArgumentParser(prog="kvlib", description="The KV cache of a language model as a free "
                                     "representation: reproduce the paper's results, inspect a model's memory.")
    parser.add_argument("--version", action="version", version=f"kvlib {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    rep = sub.add_parser("reproduce", help="run the numbered notebooks headlessly (papermill), as `make reproduce`",
                         description="Run notebooks/NN_*.ipynb with papermill into a run folder under build/ "
                         "(tables, figures, executed notebooks); --publish copies them into tables/, figures/, "
                         "notebooks/ and the README once every notebook succeeded.")
    rep.add_argument("--profile", default="small", choices=sorted(PROFILES), help="sizes and settings (default small)")
    rep.add_argument("--model", default="", metavar="M",
                     help=f"embedded model ({', '.join(EMBEDDED_MODELS)}), local folder or hub id; "
                     "default: the profile's model")
    rep.add_argument("--data-dir", default="", metavar="D",
                     help="folder with theoremqa_test.json, amazon_counterfactual/, financial_phrasebank_allagree.txt")
    rep.add_argument("--only", nargs="+", type=_notebook_number, metavar="NN", help="notebook numbers, e.g. 01 03")
    rep.add_argument("--out", default="", metavar="DIR",
                     help="where executed notebooks go (default: the run folder's notebooks/ under build/)")
    rep.add_argument("--publish", action="store_true",
                     help="after every notebook succeeded, copy the run's tables, figures and notebook outputs "
                     "into tables/, figures/, notebooks/ and the README (only the profile and model of the committed "
                     "results)")
    info = sub.add_parser("info", help="where a model's weights come from and its memory at a few context lengths",
                          description="Print where MODEL's weights come from and kvlib.memory_estimate at a few "
                          "context lengths, without loading any weights.")
    info.add_argument("model", metavar="MODEL",
                      help=f"embedded model ({', '.join(EMBEDDED_MODELS)}), local folder, shipped config name "
                      "(e.g. Qwen3-32B) or hub id")
    info.add_argument("--context", nargs="+", type=int, metavar="T", help=f"context lengths (default {CONTEXTS})")
    info.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                      help="element type (default: as load_model picks here, fp32 on CPU and bf16 on CUDA)")
    return parser


def _show_log() -> None:
    """kvlib's log (e.g. converting an embedded model once) on stderr as plain lines; other libraries keep
    showing their warnings only (the same set-up as the notebook runner's, kvlib.experiments.pipeline)."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("kvlib").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _show_log()
    if args.command == "reproduce":
        return _reproduce(args, parser)
    if any(t < 0 for t in args.context or []):
        parser.error("--context: lengths must be >= 0")
    try:
        return _info(args)
    except ValueError as err:
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
