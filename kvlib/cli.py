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
import importlib.util
import json
import logging
import re
import struct
import sys
from pathlib import Path

__all__ = ["main", "gguf_config"]

CONTEXTS = (1024, 4096, 16384, 32768)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Parts:
    """Sequential reads across files that concatenate to one (a GGUF shipped in parts)."""

    def __init__(self, paths):
        self.files, self.i = [open(p, "rb") for p in paths], 0

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n and self.i < len(self.files):
            chunk = self.files[self.i].read(n - len(out))
            out += chunk
            if len(out) < n:
                self.i += 1
        if len(out) < n:
            raise ValueError("GGUF header ends early: damaged file")
        return out

    def close(self):
        for f in self.files:
            f.close()


def _value(s: _Parts, kind: int, keep: bool = True):
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack(fmt, s.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        (n,) = struct.unpack("<Q", s.read(8))
        raw = s.read(n)
        return raw.decode("utf-8", "replace") if keep else None
    if kind == _ARRAY:
        sub, n = struct.unpack("<IQ", s.read(12))
        for _ in range(n):  # token lists run to 150k entries: only their length is kept
            _value(s, sub, keep=False)
        return n
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_config(paths) -> dict:
    """A transformers-style config dict from the header of a GGUF file (given as its parts, in order).

    Arrays come back as their length, so ``vocab_size`` falls back to the token list's length; embeddings
    are tied when the file holds no separate ``output.weight`` tensor.
    """
    s = _Parts([Path(p) for p in paths])
    try:
        magic, version = s.read(4), struct.unpack("<I", s.read(4))[0]
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{paths[0]}: not a GGUF v2+ file")
        n_tensors, n_kv = struct.unpack("<QQ", s.read(16))
        meta = {}
        for _ in range(n_kv):
            key = _value(s, _STRING)
            meta[key] = _value(s, struct.unpack("<I", s.read(4))[0])
        names = set()
        for _ in range(n_tensors):
            names.add(_value(s, _STRING))
            (n_dims,) = struct.unpack("<I", s.read(4))
            s.read(8 * n_dims + 4 + 8)  # dims, type, offset
    finally:
        s.close()
    arch = meta["general.architecture"]
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    cfg = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "num_hidden_layers": get("block_count"), "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"), "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"), "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size") or meta.get("tokenizer.ggml.tokens"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if get("attention.key_length"):
        cfg["head_dim"] = get("attention.key_length")
    return cfg


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _package_files(spec) -> list[Path | None]:
    """Each part's file in site-packages, or None when its package is not installed (nothing is imported)."""
    out = []
    for rel in spec.files:
        module, inner = rel.split("/", 1)
        found = importlib.util.find_spec(module)
        roots = list(found.submodule_search_locations or []) if found else []
        out.append(next((Path(r) / inner for r in roots if (Path(r) / inner).is_file()), None))
    return out


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))


def _hub_weights() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"  weights    downloaded from the hub by the first load, into {HF_HUB_CACHE}"


def describe_model(model: str) -> tuple[list[str], object]:
    """``(lines about where the weights come from, config or None)``; raises ValueError for an unknown name."""
    from .memory import load_config, shipped_configs
    from .models import EMBEDDED_MODELS, cache_root

    lines = []
    if model in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[model]
        files = _package_files(spec)
        folder = cache_root() / model
        lines += [f"{model}: {spec.description}",
                  f"  weights    embedded: a {_human(spec.size)} GGUF in {len(spec.packages)} package(s) from the "
                  "package index", f"  sha256     {spec.sha256} (pinned; a mismatch is refused)"]
        shown = spec.packages if len(spec.packages) <= 3 else (spec.packages[0], "...", spec.packages[-1])
        missing = sum(f is None for f in files)
        state = "installed" if not missing else f"{missing} of {len(files)} not installed"
        lines.append(f"  packages   {' '.join(shown)} ({state})")
        try:
            current = json.loads((folder / "kvlib-source.json").read_text()).get("sha256") == spec.sha256
        except (OSError, ValueError):
            current = False
        if current:
            from transformers import AutoConfig

            lines.append(f"  converted  {folder} ({_human(_folder_size(folder))} safetensors)")
            return lines, AutoConfig.from_pretrained(folder)
        lines.append(f"  converted  not yet: the first load converts it to fp32 safetensors in {folder}")
        if missing:
            lines.append(f"  install    {spec.install_command}")
            lines.append("  (the memory estimate reads the GGUF header: install the packages to see it)")
            return lines, None
        lines.append("  config     read from the GGUF header")
        return lines, gguf_config(files)
    if model.startswith("random:"):
        from .tiny import shape_config

        shape = model.removeprefix("random:")
        config = shape_config(shape)
        lines += [f"{model}: random weights at the {shape} shape (kvlib.tiny.random_model), nothing to download"]
        return lines, config
    path = Path(model).expanduser()
    if path.is_dir():
        from transformers import AutoConfig

        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json: not a transformers model folder")
        lines += [f"{model}: local folder",
                  f"  weights    {path.resolve()} ({_human(_folder_size(path))} of weight files)"]
        return lines, AutoConfig.from_pretrained(path)
    shipped = next((p for stem, p in shipped_configs().items() if model.lower() in
                    (stem.lower(), json.loads(p.read_text()).get("_name_or_path", "").lower())), None)
    if shipped is not None:
        hub_id = json.loads(shipped.read_text()).get("_name_or_path") or model
        lines += [f"{model}: hub model {hub_id}", _hub_weights(), f"  config     shipped with kvlib: {shipped.name}"]
        return lines, load_config(shipped)
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and " " not in model:
        from transformers import AutoConfig

        lines += [f"{model}: hub model", _hub_weights()]
        try:
            return lines, AutoConfig.from_pretrained(model)
        except OSError as err:
            lines.append(f"  config     not available here ({str(err).splitlines()[0]}); the estimate needs the hub")
            return lines, None
    raise ValueError(
        f"unknown model {model!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a folder, not a "
        f"shipped config ({', '.join(shipped_configs())}) and not a hub id of the form 'org/name'"
    )


def _info(args) -> int:
    import torch

    from .memory import load_config, memory_estimate, prefill_peak

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
        row = (f"{t:,}", _human(e["weights"]), _human(e["kv_cache"]), _human(e["hidden_states"]),
               _human(prefill_peak(cfg, int(t), dtype)))
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
    from .models import EMBEDDED_MODELS
    from .profiles import PROFILES

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
