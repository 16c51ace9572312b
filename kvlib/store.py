"""An append-only, resumable on-disk store of per-item results (one JSON line per finished item).

A run is identified by ``(model, dataset, settings)``; its records live in one JSONL file whose name
carries a hash of the settings, and each record is keyed by its item id. A record is written (and
flushed to disk) as soon as its item finishes, so a killed run loses at most the batch in flight,
and a rerun skips every item already there: nothing lost, repeated or recomputed.

Arrays (KV trajectories, pooled features) travel inside the record as base64 ``.npy`` bytes, so a
record is complete or absent, never half-written across files.

Robustness rules:

* a partial last line (the run was killed mid-write) is dropped with a warning and overwritten;
* any other unreadable line is an error naming the file and line: nothing is deleted silently;
* a record whose settings differ from the run's is an error (two runs can never mix).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["ResultStore", "CorruptStoreError", "settings_key", "encode_array", "decode_array", "default_store_dir"]


class CorruptStoreError(RuntimeError):
    """A results file has an unreadable line that is not a partial last line."""


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


def settings_key(settings: Any) -> str:
    """A short stable hash of a settings dataclass or dict."""
    data = asdict(settings) if is_dataclass(settings) else dict(settings)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def encode_array(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(s: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


class ResultStore:
    """Records of one run, keyed by item id.

    Args:
        root: store directory (see :func:`default_store_dir`).
        model: model name (part of the run identity).
        dataset: data set name.
        settings: a dataclass or dict; its hash names the file and is checked in every record.
        kind: what the records hold (``"generation"``, ``"adaptive"``...), a folder level.
    """

    def __init__(self, root: str | Path, model: str, dataset: str, settings: Any, kind: str = "generation"):
        self.settings = asdict(settings) if is_dataclass(settings) else dict(settings)
        self.key = settings_key(self.settings)
        self.path = Path(root) / kind / _slug(model) / f"{_slug(dataset)}-{self.key}.jsonl"
        self.model, self.dataset = model, dataset
        self._records: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        good_bytes = 0
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                good_bytes += len(line) + (1 if n < len(lines) else 0)
                continue
            is_last = n == len(lines) or all(not x.strip() for x in lines[n:])
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if is_last and not raw.endswith(b"\n"):
                    warnings.warn(f"{self.path}: dropping a partial last record (an interrupted write); it will be redone")
                    with open(self.path, "r+b") as f:
                        f.truncate(good_bytes)
                    return
                raise CorruptStoreError(
                    f"{self.path}, line {n}: not valid JSON. Inspect that line; delete it (the item will be "
                    "regenerated) or move the file away to start this run afresh."
                ) from None
            if rec.get("settings_key") != self.key or "item_id" not in rec:
                raise CorruptStoreError(
                    f"{self.path}, line {n}: record of another run (settings_key {rec.get('settings_key')!r}, "
                    f"expected {self.key!r}). Move the file away or delete that line."
                )
            self._records[str(rec["item_id"])] = rec
            good_bytes += len(line) + 1

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, item_id: str) -> dict:
        return self._records[str(item_id)]

    def records(self, item_ids: Iterable[str] | None = None) -> list[dict]:
        """Records in the order of ``item_ids`` (all, in insertion order, when ``None``)."""
        if item_ids is None:
            return list(self._records.values())
        missing = [i for i in item_ids if str(i) not in self._records]
        if missing:
            raise KeyError(f"{len(missing)} items not in {self.path} (first: {missing[0]!r}); run the generation first")
        return [self._records[str(i)] for i in item_ids]

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        return [str(i) for i in item_ids if str(i) not in self._records]

    def add(self, records: list[dict]) -> None:
        """Append finished records and flush them to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for rec in records:
            item_id = str(rec["item_id"])
            if item_id in self._records:
                raise ValueError(f"item {item_id!r} is already stored in {self.path}")
            rec = {**rec, "item_id": item_id, "settings_key": self.key, "model": self.model, "dataset": self.dataset}
            lines.append(json.dumps(rec, separators=(",", ":")))
            self._records[item_id] = rec
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
