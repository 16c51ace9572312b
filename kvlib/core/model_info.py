"""What a model is, read without loading any weights: where its weights come from and its config.

:func:`describe_model` names the source of a model's weights (an embedded model: its packages, pinned SHA-256 and
converted folder; a ``random:<shape>``; a local folder; a shipped config; a hub id) and returns its config, from
the converted folder, a local ``config.json``, a shipped config (``kvlib/configs``), the hub, or, for an embedded
model not yet converted, the GGUF header of its installed packages (:func:`gguf_config`: a few MB, no tensor
data). ``kvlib info`` prints it; the notebook runner estimates a run's disk use from it.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

from .models import EMBEDDED_MODELS, cache_root

__all__ = ["describe_model", "gguf_config", "human_bytes"]

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


def human_bytes(n: float) -> str:
    """``n`` bytes as a short text (``1.50 GB``)."""
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
    from .memory import load_config, shipped_configs  # torch: `kvlib --help` imports this module

    lines = []
    if model in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[model]
        files = _package_files(spec)
        folder = cache_root() / model
        lines += [f"{model}: {spec.description}",
                  f"  weights    embedded: a {human_bytes(spec.size)} GGUF in {len(spec.packages)} package(s) from the "
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

            lines.append(f"  converted  {folder} ({human_bytes(_folder_size(folder))} safetensors)")
            return lines, AutoConfig.from_pretrained(folder)
        lines.append(f"  converted  not yet: the first load converts it to fp32 safetensors in {folder}")
        if missing:
            lines.append(f"  install    {spec.install_command}")
            lines.append("  (the memory estimate reads the GGUF header: install the packages to see it)")
            return lines, None
        lines.append("  config     read from the GGUF header")
        return lines, gguf_config(files)
    if model.startswith("random:"):
        from .tiny import shape_config  # torch and transformers, as above

        shape = model.removeprefix("random:")
        config = shape_config(shape)
        lines += [f"{model}: random weights at the {shape} shape (kvlib.core.tiny.random_model), nothing to download"]
        return lines, config
    path = Path(model).expanduser()
    if path.is_dir():
        from transformers import AutoConfig

        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json: not a transformers model folder")
        lines += [f"{model}: local folder",
                  f"  weights    {path.resolve()} ({human_bytes(_folder_size(path))} of weight files)"]
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
