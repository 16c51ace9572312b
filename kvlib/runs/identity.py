"""What a stored result was computed from, as small JSON-able dicts that a store compares and hashes.

A stored record may be reused only if everything that determined it is unchanged. The store
(:mod:`kvlib.runs.store`) keeps one file per identity (its hash is in the file name) and names the fields
that differ when asked to mix two; this module says what those fields are.

:func:`model_identity` describes a loaded model:

* ``weights``: where they came from, and a digest of the parameters as loaded (every byte up to
  64 MiB, else an evenly strided sample of every tensor: milliseconds, even for a GPU model):

  - an embedded model (``load_model("qwen2.5-0.5b")``, which sets ``model.kvlib_source``): its pinned
    SHA-256 from :data:`kvlib.core.models.EMBEDDED_MODELS` (loading refuses any other bytes);
  - a local directory: SHA-256 of its ``config.json`` and the names and sizes of its weight files
    (hashing gigabytes of files at every open would cost more than it saves);
  - a hub id: the commit its files came from (``config._commit_hash``);
  - a model built in memory (tests, random weights at a real shape): a fingerprint of its config; the
    digest tells two seeds of one config apart.
* ``dtype``, ``device`` (kind only: ``cpu``/``cuda``/...), ``attention`` (kernel), ``eos`` (the ids
  that end an item) and ``tokenizer`` (class, vocabulary, special tokens, chat template).

The digest also catches weights changed in memory after loading, unless the change misses every
sampled element of a large model: load such a model as its own folder or give it another model name.

:func:`callable_identity` describes an extractor (or any callable that shapes results): where it is
defined and the parameters it closes over (closure cells, default arguments, ``functools.partial``
arguments, the fields of a dataclass object). Numbers, strings, tuples/lists, dtypes, dataclasses,
arrays (hashed) and objects with a ``fingerprint()`` method are parameters; dicts and other objects
are mutable state and count by their type only. A callable may declare its identity itself with a
``kvlib_identity`` attribute (any JSON-able value), which then wins.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import weakref
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..core.models import EMBEDDED_MODELS

__all__ = ["model_identity", "weights_identity", "tokenizer_fingerprint", "callable_identity", "digest",
           "canonical", "differences"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")
FULL_DIGEST_BYTES = 64 << 20  # parameters up to this size are hashed whole, larger ones sampled
SAMPLE = 4096  # elements sampled per tensor above that size


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists, unknown objects their ``str``)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def digest(value: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``value`` as canonical JSON (bytes are hashed as they are)."""
    blob = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two identities differ, e.g. ``["model.weights.sha256", "settings.max_new_tokens"]``."""
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(stored) | set(current), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in current:
                out.append(path)
            else:
                out.extend(differences(stored[key], current[key], path))
        return out
    return [] if canonical(stored) == canonical(current) else [prefix or "(all)"]


# ---------- models ----------

def model_identity(model, tokenizer) -> dict:
    """Everything about ``model`` and ``tokenizer`` that shapes a generation (see the module docstring)."""
    param = next(iter(model.parameters()), None)
    config = model.config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    return {
        "weights": weights_identity(model),
        "dtype": str(getattr(model, "dtype", None)).replace("torch.", ""),
        "device": param.device.type if param is not None else "cpu",
        # kvlib's grouped decode attention is sdpa's arithmetic arranged without copies (kvlib.core.attention)
        "attention": {"kvlib_sdpa": "sdpa"}.get(getattr(config, "_attn_implementation", None),
                                                getattr(config, "_attn_implementation", None)),
        "eos": sorted(eos) if isinstance(eos, (list, tuple, set)) else eos,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def weights_identity(model) -> dict:
    """Where the weights came from (``kind``: ``embedded`` | ``local`` | ``hub`` | ``memory``) and a digest of them."""
    config = model.config
    source = getattr(model, "kvlib_source", None)
    spec = EMBEDDED_MODELS.get(str(source)) if source is not None else None
    where = str(getattr(config, "_name_or_path", "") or "")
    commit = getattr(config, "_commit_hash", None)
    if spec is not None and spec.sha256 is not None:
        out = {"kind": "embedded", "name": spec.name, "sha256": spec.sha256}
    elif where and Path(where).expanduser().is_dir():
        out = {"kind": "local", **_folder_fingerprint(Path(where).expanduser())}
    elif where and commit:
        out = {"kind": "hub", "id": where, "commit": commit}
    else:
        out = {"kind": "memory", "config": _config_fingerprint(config)}
    return {**out, "parameters": _parameter_digest(model)}


def _folder_fingerprint(folder: Path) -> dict:
    config = folder / "config.json"
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)},
    }


def _config_fingerprint(config) -> str:
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype", "architectures"):
        data.pop(volatile, None)
    return digest(data)


@torch.no_grad()
def _parameter_digest(model) -> str:
    named = list(model.named_parameters())
    whole = sum(p.numel() * p.element_size() for _, p in named) <= FULL_DIGEST_BYTES
    h = hashlib.sha256()
    for name, p in named:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        if not whole:
            flat = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_VOCAB_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (size, vocab digest)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of the tokenizer's class, vocabulary (added tokens included), special tokens and chat template.

    The vocabulary digest is computed once per tokenizer object and size (adding tokens changes the size).
    """
    if tokenizer is None:
        return None
    size = len(tokenizer)
    cached = _VOCAB_DIGESTS.get(tokenizer) if _weakrefable(tokenizer) else None
    if cached is None or cached[0] != size:
        vocab = tokenizer.get_vocab()
        cached = (size, digest(sorted(vocab, key=vocab.__getitem__)))
        if _weakrefable(tokenizer):
            _VOCAB_DIGESTS[tokenizer] = cached
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}  # padding is masked
    return digest({"class": type(tokenizer).__name__, "vocab": cached[1], "special": specials,
                   "chat_template": getattr(tokenizer, "chat_template", None)})


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


# ---------- extractors and other callables ----------

def callable_identity(fn, _depth: int = 0) -> dict:
    """Where ``fn`` is defined and the parameters it carries (see the module docstring)."""
    declared = getattr(fn, "kvlib_identity", None)
    if declared is not None:
        return {"declared": canonical(declared)}
    if isinstance(fn, functools.partial):
        return {"partial": callable_identity(fn.func, _depth + 1),
                "args": [_param(a, _depth) for a in fn.args],
                "kwargs": {k: _param(v, _depth) for k, v in sorted(fn.keywords.items())}}
    if inspect.ismethod(fn):
        return {"method": callable_identity(fn.__func__, _depth + 1), "self": _param(fn.__self__, _depth)}
    code = getattr(fn, "__code__", None)
    if code is None:  # a builtin (named by itself) or a callable object (named by its class)
        named = fn if hasattr(fn, "__qualname__") else type(fn)
        return {"object": f"{named.__module__}.{named.__qualname__}", "params": _object_params(fn, _depth)}
    params: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            params[name] = _param(cell.cell_contents, _depth)
        except ValueError:  # a cell not assigned yet
            params[name] = "<empty>"
    if fn.__defaults__:
        params["<defaults>"] = [_param(v, _depth) for v in fn.__defaults__]
    if fn.__kwdefaults__:
        params["<kwdefaults>"] = {k: _param(v, _depth) for k, v in sorted(fn.__kwdefaults__.items())}
    return {"function": f"{fn.__module__}.{fn.__qualname__}", "params": params}


def _object_params(obj, depth: int) -> Any:
    if hasattr(obj, "fingerprint") and callable(obj.fingerprint):
        return {"fingerprint": obj.fingerprint()}
    if is_dataclass(obj):
        return {f.name: _param(getattr(obj, f.name), depth) for f in fields(obj)}
    return {k: _param(v, depth) for k, v in sorted(getattr(obj, "__dict__", {}).items()) if not k.startswith("_")}


def _param(value: Any, depth: int) -> Any:
    """A parameter's JSON description; mutable state (dicts, plain objects) becomes ``"<TypeName>"``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _param(value.item(), depth)
    if isinstance(value, (np.dtype, torch.dtype)):
        return str(value)
    if isinstance(value, type):
        if issubclass(value, np.generic):
            return np.dtype(value).name
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (tuple, list)):
        return [_param(v, depth) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_param(v, depth) for v in value), key=str)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        arr = value.detach().cpu() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
        raw = arr.contiguous().view(torch.uint8).numpy() if isinstance(arr, torch.Tensor) else arr.view(np.uint8)
        return {"array": digest(raw.tobytes()), "shape": list(value.shape), "dtype": str(value.dtype)}
    if is_dataclass(value) or (hasattr(value, "fingerprint") and callable(value.fingerprint)):
        return {"object": f"{type(value).__module__}.{type(value).__qualname__}",
                "params": _object_params(value, depth)}
    if callable(value) and not isinstance(value, torch.nn.Module) and depth < 3:
        return callable_identity(value, depth + 1)
    if inspect.ismodule(value):
        return value.__name__
    return f"<{type(value).__name__}>"
