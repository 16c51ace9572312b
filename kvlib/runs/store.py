"""An append-only, resumable on-disk store of per-item results (one JSON line per finished item).

**Identity.** A run is identified by everything that determined its results: :data:`FORMAT_VERSION`,
the model (:func:`kvlib.runs.identity.model_identity`: weights, dtype, device kind, tokenizer...) and the
run's settings (decoding settings, extractors with their parameters, method settings). The hash of
that identity names the file, ``<root>/<kind>/<model name>/<data set>-<hash>.jsonl``, so a change of
any of it opens a new file: nothing is reused across identities. The file's first line is a header
holding the identity itself; every record carries its hash (``settings_key``), and its item's input
hash (``input_sha256``: for generation the rendered prompt). An item whose input changed under the
same id is an error naming the items (:meth:`ResultStore.verify_inputs`), never a silent reuse.

A store opened without a model identity (``open_store`` without ``model=``) is *unbound*: it has no
file until :func:`kvlib.runs.generation.generate` binds it to the model it runs.

**One writer.** A writing store holds an exclusive ``flock`` on ``<file>.lock`` (which records pid,
host and time) from opening until :meth:`ResultStore.close`. A second process is refused at once
(:class:`StoreLockedError`); the kernel drops the lock of a killed process, so a later run takes
over with nothing to clean up. Stores of one process share the lock, so re-opening a store in the
same process (a notebook cell run again) works, and every store object re-reads what the file gained
before it reads or appends.

**Crash safety.** A record is appended and fsync'ed as soon as its batch finishes, so a killed run
loses at most the batch in flight and a rerun skips every item already there. A partial last line
(killed mid-write) is dropped, with a warning, by the next writer, which holds the lock; a reader
(``readonly=True``) just ignores it (it may be a write in progress) and never changes the file. Any
other unreadable line is an error naming file and line: nothing is deleted silently.

**Shards.** A run launched over several processes (:mod:`kvlib.runs.sharding`) gives each process a file of its own
beside the store's, of the same identity: ``<data set>-<hash>.shard-<rank>-of-<world>.jsonl`` (a store opened with
``shard=``), with its own lock; rank 0 merges them into the store's file at the end. In a launched run (``RANK`` set
and not 0) a store's own file is written by rank 0 only: other ranks' stores of it take its lock at their first
:meth:`ResultStore.add` rather than on opening, and read it as a reader until then.

**Verified lines.** Every line ends with a checksum of the rest of it (``,"check":"<16 hex digits>"}``: the first
64 bits of its SHA-256). A record's array references hold each array's length and CRC-32, so the line's checksum
covers its sidecar slice too: on every read the line's checksum is checked, and the slice must be present in full
(the sidecar long enough); the slice's bytes are checked against their CRC-32 when the array is read
(:meth:`ResultStore.verify` reads them all). A second line for an item already stored is refused when written and
reported when read. Every read error names the file and the line and says what to do. Files of older formats
(before 4: no checksums) are not read: a new file is started beside them (a :class:`StoreIdentityWarning` says
so) and their items are computed again.

**Links.** Store, sidecar and lock files are opened with ``O_NOFOLLOW``: a symbolic link in their place is refused,
so a planted link cannot make a run write (or truncate) another file.

**Arrays** (KV trajectories, pooled features) go to a binary sidecar beside the file, ``<file>.bin``, as raw
bytes (fp16 trajectories stay fp16: no base64, no ``.npy`` header); the record holds where they are, their dtype,
shape and CRC-32. The sidecar is written and fsync'ed before the record's line, so a record is complete or
absent: a run killed between the two leaves unreferenced bytes at the sidecar's end, which nothing reads. Records
in memory hold :class:`StoredArray` handles, read from disk only when asked (:func:`decode_array`): a store of
thousands of 8k-token trajectories costs its token lists in memory, not its trajectories. A handle whose bytes are
missing or changed raises :class:`CorruptStoreError` naming the item. Records may still carry base64 strings
(:func:`encode_array`); they are written to the sidecar like arrays.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
import warnings
import zlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .identity import canonical, differences, digest
from .sharding import Shard, current_shard
from .writer_lock import StoreLockedError, acquire as _acquire, check_held as _check_held, release as _release


__all__ = ["ResultStore", "CorruptStoreError", "DuplicateItemError", "StoreLockedError", "StoreMismatchError",
           "StoreIdentityWarning", "StoredArray", "FORMAT_VERSION", "encode_array", "decode_array",
           "default_store_dir", "sidecar_path", "open_nofollow"]

FORMAT_VERSION = 4  # bump when records change meaning: every store then starts a new file (3: binary sidecars,
# 4: a checksum on every line)
_SHOWN = 5  # items / fields named in an error before "..."


class CorruptStoreError(RuntimeError):
    """A results file has an unreadable line that is not a partial last line, or a line of another run, or a
    line whose checksum or sidecar slice does not match, or a second line for one item."""


class StoreMismatchError(ValueError):
    """What a run asks for differs from what its store holds (settings, model or an item's input)."""


class DuplicateItemError(ValueError):
    """A record for an item that the store already holds (the first one stays)."""


class StoreIdentityWarning(UserWarning):
    """A new store file was started beside one that differs only in the model or the store format."""


def default_store_dir() -> Path:
    """``$KVLIB_RUNS`` or ``runs/`` under the current directory's repository root."""
    env = os.environ.get("KVLIB_RUNS")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        if (parent / "pyproject.toml").exists() and (parent / "kvlib").is_dir():
            return parent / "runs"
    return here / "runs"


def encode_array(a: np.ndarray) -> str:
    """An array as base64 ``.npy`` text (records built by hand; a store writes it to its sidecar)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CHECK = re.compile(rb'(.*),"check":"([0-9a-f]{16})"\}', re.S)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _check(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def _seal(body: bytes) -> bytes:
    """A JSON object's bytes with its checksum as a last field: ``{...,"check":"<hex>"}``."""
    return body[:-1] + b',"check":"' + _check(body).encode() + b'"}'


def open_nofollow(path: Path, mode: str = "rb"):
    """``open(path, mode)`` (binary modes ``rb``, ``ab``, ``r+b``) refusing a symbolic link in ``path``'s place."""
    flags = {"rb": os.O_RDONLY, "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "r+b": os.O_RDWR}[mode]
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link: kvlib reads and writes its stores and lock files "
                          "only as plain files, never through a link. Replace the link with the file itself (or move "
                          "it away to start afresh)") from None
        raise
    return os.fdopen(fd, mode, buffering=0 if mode == "ab" else -1)


def _write_all(f, data: bytes) -> None:
    """Write all of ``data`` to the unbuffered file ``f`` (a raw write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _disk_error(err: OSError, path: Path, what: str) -> OSError:
    """``err`` again with the file and what to do (disk full, read-only or not writable)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (f"no space left on the device holding {path.parent} while writing {what}. Free space there or set "
                "KVLIB_RUNS to a folder on another disk; run again to resume (finished items are kept)")
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = (f"cannot write {what} {path}: {os.strerror(err.errno)}. Make that folder writable or set KVLIB_RUNS "
                "to a writable folder")
    else:
        return err
    return OSError(err.errno, hint)


def sidecar_path(path: Path) -> Path:
    """The binary sidecar of a store file: ``<file>.bin``."""
    return path.with_name(path.name + ".bin")


class StoredArray:
    """A handle on one array in a store's sidecar: read on :meth:`load` (or ``np.asarray``), never kept.

    Attributes:
        path: the sidecar file; offset, nbytes: where the bytes are; dtype, shape: how to read them;
        crc32: the bytes' checksum; item: the record's item id (for errors).
    """

    __slots__ = ("path", "offset", "nbytes", "dtype", "shape", "crc32", "item")

    def __init__(self, path: Path, ref: Mapping, item: str = "?"):
        self.path, self.item = path, item
        self.offset, self.nbytes = (int(x) for x in ref["$bin"])
        self.dtype, self.shape, self.crc32 = np.dtype(ref["dtype"]), tuple(ref["shape"]), int(ref["crc32"])

    def load(self) -> np.ndarray:
        try:
            with open_nofollow(self.path, "rb") as f:
                f.seek(self.offset)
                raw = f.read(self.nbytes)
        except FileNotFoundError:
            raw = b""
        if len(raw) != self.nbytes or zlib.crc32(raw) != self.crc32:
            raise CorruptStoreError(
                f"{self.path}: the array of item {self.item!r} at byte {self.offset} is "
                f"{'missing' if len(raw) != self.nbytes else 'changed (checksum mismatch)'}. Delete that item's line "
                "from the .jsonl file beside it (the item will be regenerated), or move both files away.")
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape).copy()

    def __array__(self, dtype=None, copy=None):
        a = self.load()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"StoredArray({self.path.name}@{self.offset}, {self.dtype}, {self.shape})"


def decode_array(s) -> np.ndarray:
    """An array of a record: a :class:`StoredArray` handle, base64 ``.npy`` text, or an array."""
    if isinstance(s, StoredArray):
        return s.load()
    if isinstance(s, str):
        return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)
    return np.asarray(s)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:_SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _write_array(blob, a: np.ndarray) -> dict:
    """Append ``a``'s raw bytes to the open sidecar ``blob``; the reference a record keeps."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError(f"a store holds numeric arrays only, not {a.dtype}")
    raw = a.tobytes()
    offset = blob.seek(0, os.SEEK_END)
    blob.write(raw)
    return {"$bin": [offset, len(raw)], "dtype": a.dtype.str, "shape": list(a.shape), "crc32": zlib.crc32(raw)}


# ---------- the store ----------

class ResultStore:
    """Records of one run, keyed by item id.

    Args:
        root: store directory (see :func:`default_store_dir`).
        model: model name (a folder level; what the model *is* comes from ``model_identity``).
        dataset: data set name.
        settings: a dataclass or dict of run settings (decoding, extractors, method).
        kind: what the records hold (``"generation"``, ``"adaptive"``...), a folder level.
        model_identity: :func:`kvlib.runs.identity.model_identity` of the model; ``None`` leaves the store
            unbound until :meth:`bind`.
        readonly: read without the writer lock; never changes the file; :meth:`add` is refused.
        shard: open that shard's own file of this store (:mod:`kvlib.runs.sharding`) instead of the store's file.
    """

    def __init__(self, root: str | Path, model: str, dataset: str, settings: Any, kind: str = "generation", *,
                 model_identity: Mapping | None = None, readonly: bool = False, shard: Shard | None = None):
        self.settings = canonical(asdict(settings) if is_dataclass(settings) else dict(settings))
        self.root = Path(root)
        self.folder = self.root / kind / _slug(model)
        self.model, self.dataset, self.kind, self.readonly = model, dataset, kind, readonly
        self.shard = shard
        self._deferred = False  # writable, but the lock is taken at the first add (launched ranks other than 0)
        self.identity: dict | None = None
        self.key: str | None = None
        self.path: Path | None = None
        self._lock: str | None = None
        self._records: dict[str, dict] = {}
        self._line_of: dict[str, int] = {}  # item id -> its line (1-based), for errors
        self._offset = 0  # bytes of complete lines read so far
        self._lines = 0
        if model_identity is not None:
            self.bind(model_identity)

    # ----- identity -----

    def bind(self, model_identity: Mapping) -> "ResultStore":
        """Fix the model of an unbound store (opens its file); on a bound store, check it is the same model."""
        model_identity = canonical(dict(model_identity))
        if self.identity is not None:
            if self.identity["model"] != model_identity:
                raise StoreMismatchError(self._differ("model", self.identity["model"], model_identity))
            return self
        identity = {"format": FORMAT_VERSION, "model": model_identity, "settings": self.settings}
        key = digest(identity)
        part = f".{self.shard.name}" if self.shard is not None else ""
        path = self.folder / f"{_slug(self.dataset)}-{key}{part}.jsonl"
        if not self.readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() and self.shard is None:
                self._note_siblings(path, identity)
            if self._deferred or (self.shard is None and current_shard().rank != 0):
                self._deferred = True
            else:
                self._lock = _acquire(path.with_name(path.name + ".lock"), path)  # bound only once this succeeds
        self.identity, self.key, self.path = identity, key, path
        self._sync()
        return self

    def require_settings(self, expected: Mapping) -> None:
        """Refuse a run whose settings differ from the store's in any key of ``expected``."""
        expected = canonical(dict(expected))
        stored = {k: self.settings.get(k) for k in expected}
        if stored != expected:
            raise StoreMismatchError(self._differ("settings", stored, expected))

    def _differ(self, what: str, stored: Any, current: Any) -> str:
        fields = differences(stored, current, what)
        return (f"the store {self.path or self.folder} does not match this run's {what} (differing: "
                f"{', '.join(fields[:_SHOWN])}{' ...' if len(fields) > _SHOWN else ''}); nothing was reused. Open "
                "the store with the model, settings and extractors of the run (kvlib.runs.generation.open_store).")

    def verify_inputs(self, input_hashes: Mapping[str, str]) -> None:
        """Refuse to reuse stored items whose input hash (``input_sha256``) differs from ``input_hashes``.

        Raises:
            StoreMismatchError: naming the items, e.g. a prompt template changed but the item ids did not.
        """
        self._sync()
        changed = [str(i) for i, h in input_hashes.items()
                   if str(i) in self._records and self._records[str(i)].get("input_sha256") != h]
        if changed:
            raise StoreMismatchError(
                f"{len(changed)} item(s) in {self.path} were stored for another input than this run gives them: "
                f"{_listing(changed)}. Their prompt (or the answer they were computed from) changed under the "
                "same item id. Nothing was reused: move that file away to recompute every item, or give the "
                "changed items new ids."
            )

    def _note_siblings(self, path: Path, identity: dict) -> None:
        """Warn when a new file starts beside one with the same settings but another model or format."""
        pattern = re.compile(re.escape(_slug(self.dataset)) + r"-[0-9a-f]{16}\.jsonl")
        for other in sorted(self.folder.glob("*.jsonl")):
            if not pattern.fullmatch(other.name):
                continue
            try:
                with open(other, "rb") as f:
                    header = json.loads(f.readline())
                theirs = header["identity"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if theirs.get("settings") == self.settings:
                fields = differences(theirs, identity)
                warnings.warn(
                    f"starting a new store {path}: {other.name} beside it holds results of these settings "
                    f"for another model or store format (differing: {', '.join(fields[:_SHOWN])}); they are not "
                    "reused.", StoreIdentityWarning, stacklevel=4)
                return

    def shard_store(self, shard: Shard, *, model_identity: Mapping | None = None,
                    readonly: bool = False) -> "ResultStore":
        """The store of ``shard``'s own file beside this one: same root, model, data set, settings and kind,
        bound to ``model_identity`` (default: this store's model)."""
        if model_identity is None:
            model_identity = self.identity["model"] if self.identity is not None else None
        return ResultStore(self.root, self.model, self.dataset, self.settings, self.kind,
                           model_identity=model_identity, readonly=readonly, shard=shard)

    # ----- reading -----

    def bound_path(self) -> Path:
        """The store's file; ``RuntimeError`` (saying how to bind it) while the store is not bound to a model."""
        if self.path is None:
            raise RuntimeError(
                f"the store {self.folder}/{self.dataset} is not bound to a model yet: open it with "
                "open_store(..., model=model, tokenizer=tokenizer), or pass it to generate(), which binds it."
            )
        return self.path

    def _sync(self) -> None:
        """Read the complete lines the file gained since the last call (another store object may append)."""
        path = self.bound_path()
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self._offset:  # moved away or replaced: start over
            self._records.clear()
            self._line_of.clear()
            self._offset = self._lines = 0
        if size == self._offset:
            return
        with open_nofollow(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1
        side = sidecar_path(path)
        try:
            side_size = os.stat(side).st_size
        except FileNotFoundError:
            side_size = -1
        short: list[tuple[int, str]] = []  # (line, item) whose arrays lie beyond the sidecar's end
        for line in chunk[:end].split(b"\n")[:-1]:
            self._lines += 1
            if line.strip():
                rec = self._take(line)
                refs = [v for v in (rec or {}).get("arrays", {}).values() if isinstance(v, StoredArray)]
                if any(r.offset + r.nbytes > side_size for r in refs):
                    short.append((self._lines, str(rec["item_id"])))
        self._offset += end
        if short:
            lines = ", ".join(str(n) for n, _ in short[:_SHOWN]) + (f" ... ({len(short)} in all)" if len(short) >
                                                                      _SHOWN else "")
            state = "is missing" if side_size < 0 else f"holds only {side_size} bytes"
            raise CorruptStoreError(
                f"{path}, line(s) {lines}: the arrays of item(s) {_listing([i for _, i in short])} lie beyond the end "
                f"of the sidecar {side.name}, which {state} (deleted, truncated or copied without it). Delete those "
                "lines from the .jsonl file (their items will be computed again), or move both files away to start "
                "afresh.")
        if end < len(chunk) and self._lock is not None:  # a torn last line, and we are the only writer
            warnings.warn(f"{path}: dropping a partial last record (an interrupted write); it will be redone")
            with open_nofollow(path, "r+b") as f:
                f.truncate(self._offset)

    def _take(self, line: bytes) -> dict | None:
        where = f"{self.path}, line {self._lines}"
        todo = ("Delete that line (its item will be computed again) or move the file away (with its .bin sidecar) "
                "to start this run afresh.")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorruptStoreError(f"{where}: not UTF-8 text (byte {err.start} of the line is {line[err.start]:#04x}):"
                                    f" the file was damaged or edited. {todo}") from None
        sealed = _CHECK.fullmatch(line.rstrip(b"\r"))
        if sealed is None:
            raise CorruptStoreError(
                f"{where}: the line has no checksum (it was edited, or written by a kvlib older than store format "
                f"{FORMAT_VERSION}). {todo}")
        if _check(sealed[1] + b"}") != sealed[2].decode():
            raise CorruptStoreError(f"{where}: checksum mismatch: the line was changed after it was written. {todo}")
        try:
            rec = json.loads(line)
        except ValueError:
            raise CorruptStoreError(f"{where}: not valid JSON. {todo}") from None
        if not isinstance(rec, dict):
            raise CorruptStoreError(f"{where}: not a JSON object. {todo}")
        rec.pop("check", None)
        if "kvlib_store" in rec:
            if rec.get("settings_key") != self.key:
                fields = differences(rec.get("identity"), self.identity)
                raise CorruptStoreError(
                    f"{self.path}, line {self._lines}: header of another run (differing: {', '.join(fields)}). "
                    "The file was renamed or copied: move it away."
                )
            return
        if rec.get("settings_key") != self.key or "item_id" not in rec:
            raise CorruptStoreError(
                f"{self.path}, line {self._lines}: record of another run (settings_key {rec.get('settings_key')!r}, "
                f"expected {self.key!r}). Move the file away or delete that line."
            )
        item = str(rec["item_id"])
        if item in self._records:
            raise CorruptStoreError(
                f"{where}: a second record for item {item!r} (the first is on line {self._line_of[item]}): two "
                "processes wrote this store at once (was its .lock file deleted?) or lines were copied. Delete one of "
                "the two lines (or both: the item is computed again), or move the file away.")
        if rec.get("arrays"):
            side = sidecar_path(self.path)
            rec["arrays"] = {k: StoredArray(side, v, item) if isinstance(v, dict) and "$bin" in v else v
                             for k, v in rec["arrays"].items()}
        self._records[item] = rec
        self._line_of[item] = self._lines
        return rec

    def __contains__(self, item_id: str) -> bool:
        self._sync()
        return str(item_id) in self._records

    def __len__(self) -> int:
        self._sync()
        return len(self._records)

    def get(self, item_id: str) -> dict:
        self._sync()
        return self._records[str(item_id)]

    def records(self, item_ids: Iterable[str] | None = None) -> list[dict]:
        """Records in the order of ``item_ids`` (all, in insertion order, when ``None``)."""
        self._sync()
        if item_ids is None:
            return list(self._records.values())
        missing = [i for i in item_ids if str(i) not in self._records]
        if missing:
            raise KeyError(f"{len(missing)} items not in {self.path} (first: {missing[0]!r}); run the generation first")
        return [self._records[str(i)] for i in item_ids]

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        self._sync()
        return [str(i) for i in item_ids if str(i) not in self._records]

    def verify(self) -> int:
        """Read every array of every record and check its bytes against their CRC-32 (what reading a record's
        arrays does one at a time); return the number of arrays checked.

        Raises:
            CorruptStoreError: naming the first item whose bytes are missing or changed, and what to do.
        """
        self._sync()
        n = 0
        for rec in self._records.values():
            for a in rec.get("arrays", {}).values():
                if isinstance(a, StoredArray):
                    a.load()
                    n += 1
        return n

    # ----- writing -----

    def add(self, records: list[dict]) -> None:
        """Append finished records and flush them to disk before returning."""
        if self.readonly:
            raise PermissionError(f"{self.path} is open readonly (or closed): open the store again without "
                                  "readonly=True to add records")
        if self._deferred:
            self._lock = _acquire(self.path.with_name(self.path.name + ".lock"), self.path)
            self._deferred = False
        if self._lock is not None:
            _check_held(self._lock, self.path)
        self._sync()
        lines, new = [], {}
        if self._offset == 0:
            lines.append(json.dumps({"kvlib_store": FORMAT_VERSION, "settings_key": self.key,
                                     "identity": self.identity}, separators=(",", ":")))
        side = sidecar_path(self.path)
        for rec in records:
            item_id = str(rec["item_id"])
            if item_id in self._records:
                raise DuplicateItemError(
                    f"item {item_id!r} is already stored in {self.path} (line {self._line_of[item_id]}); nothing was "
                    "added. If no other process is writing this store, the caller asked for the item twice; if one "
                    "is (its .lock file was deleted, so two runs took it), stop one of them and run again.")
            if item_id in new:
                raise DuplicateItemError(f"item {item_id!r} appears twice in one add() to {self.path}: item ids must "
                                         "be unique; nothing was added")
            new[item_id] = None
        new = {}
        try:
            blob = open_nofollow(side, "ab") if any(rec.get("arrays") for rec in records) else None
        except OSError as err:
            raise _disk_error(err, side, "the store's arrays") from None
        try:
            for rec in records:
                item_id = str(rec["item_id"])
                rec = {**rec, "item_id": item_id, "settings_key": self.key, "model": self.model,
                       "dataset": self.dataset}
                if rec.get("arrays"):
                    refs = {k: _write_array(blob, decode_array(v)) for k, v in rec["arrays"].items()}
                    lines.append(json.dumps({**rec, "arrays": refs}, separators=(",", ":")))
                    rec["arrays"] = {k: StoredArray(side, r, item_id) for k, r in refs.items()}
                else:
                    lines.append(json.dumps(rec, separators=(",", ":")))
                new[item_id] = rec
            if blob is not None:
                blob.flush()
                os.fsync(blob.fileno())
        except OSError as err:
            raise _disk_error(err, side, "the store's arrays") from None
        finally:
            if blob is not None:
                try:
                    blob.close()
                except OSError:
                    pass
        data = b"".join(_seal(line.encode()) + b"\n" for line in lines)
        try:
            with open_nofollow(self.path, "ab") as f:
                try:
                    _write_all(f, data)
                    os.fsync(f.fileno())
                except OSError:
                    try:
                        f.truncate(self._offset)  # no partial line left behind (a full disk)
                    except OSError:
                        pass  # the next writer drops a partial last line
                    raise
        except OSError as err:
            raise _disk_error(err, self.path, "the store") from None
        first = self._lines + 1 + (len(lines) - len(new))
        self._offset += len(data)
        self._lines += len(lines)
        self._records.update(new)
        self._line_of.update({item: first + k for k, item in enumerate(new)})

    # ----- lifetime -----

    def close(self) -> None:
        """Release the writer lock (the store can still be read)."""
        if self._lock is not None:
            _release(self._lock)
            self._lock = None
            self.readonly = True
        elif self._deferred:
            self._deferred = False
            self.readonly = True

    def _write_later(self) -> None:
        """Hold no lock on this file until the first :meth:`add` (a launched rank other than 0 only reads it)."""
        if self.readonly:
            return
        self._deferred = True
        if self._lock is not None:
            _release(self._lock)
            self._lock = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
