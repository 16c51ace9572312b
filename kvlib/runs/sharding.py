"""Item loops past one GPU: each launched process generates its share of the items into a file of its own.

**Launching.** A script that calls :func:`kvlib.runs.generation.generate` or :func:`kvlib.runs.replay.replay_generate`
(and so
``answers``, ``adaptive``, ``early_exit``, built on them) runs sharded unchanged when started by a launcher::

    torchrun --nproc_per_node N your_script.py
    accelerate launch --num_processes N your_script.py

Both set ``RANK`` and ``WORLD_SIZE`` in every process; :func:`current_shard` reads them (``Shard(0, 1)`` when unset,
so an unlaunched run is the single-process run it always was). Each process loads its own copy of the model: put
it on this process's GPU with ``load_model(name, device=local_device())`` (``cuda:$LOCAL_RANK``; plain ``"cuda"``
would put every process on the first GPU). All processes must see the same store root (one machine, or a file
system shared by the nodes that supports ``flock``).

**What each process does.** With ``world > 1``, rank ``r`` takes the items of ``prompts`` at positions
``i % world == r`` that no file holds yet: neither the store's file nor any shard file of the same identity. It
generates them in batches, as a single process would, into its shard file beside the store's:
``<data set>-<hash>.shard-<r>-of-<world>.jsonl`` (the same identity, header and record format; its own writer lock).
Positions are those of ``prompts``, so a relaunch gives every item to the same rank, and a killed process resumes
from its own file. Before generating, every rank checks what a single run checks first (the store's model,
settings and every stored item's prompt, in the store's file and in every shard file; prompt lengths), so a bad
run fails on every rank alike.

**The merge.** Having done its part, a process waits, polling the files, until every item is stored in some file.
Then rank 0 alone, which holds the store file's writer lock from the start (other ranks only read that file),
appends every shard record the store lacks in one write (items in the order of ``prompts``, then any other items
that a shard file of an earlier launch held) and deletes the shard files, their locks and failure notes. The other
ranks wait for the store to hold every item; each rank then returns all records in the order of ``prompts``,
exactly as a single-process run does. A rank killed mid-merge loses nothing: the rerun's rank 0 merges what is
left. A shard file of another world size (a relaunch with another ``N``) counts as stored and is merged the same.

**Failures.** A process that raises leaves a note (``.shard-<r>-of-<world>.failed``) that the waiting ranks see:
they stop at once with an error naming that rank and its error (torchrun also stops the group when a process
fails). A process that dies silently is caught by a timeout: when no file has grown for ``KVLIB_SHARD_TIMEOUT``
seconds (default 7200; one batch must finish within it), the waiting ranks stop with an error naming each shard
that lacks items. Relaunching the same command resumes every shard.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from .store import ResultStore

__all__ = ["Shard", "SINGLE", "ShardError", "current_shard", "local_device", "shard_path", "shard_files",
           "run_sharded", "TIMEOUT_ENV", "DEFAULT_TIMEOUT"]

TIMEOUT_ENV = "KVLIB_SHARD_TIMEOUT"
DEFAULT_TIMEOUT = 7200.0  # seconds without any file growing before a waiting rank gives up
_SHOWN = 5
_MAX_POLL = 2.0


class ShardError(RuntimeError):
    """Another process of a sharded run failed, or stopped making progress."""


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world``: it owns the items at positions ``i % world == rank``."""

    rank: int
    world: int

    def __post_init__(self):
        for name in ("rank", "world"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Shard {name} must be an int, not {value!r}")
        if self.world < 1:
            raise ValueError(f"a Shard's world is the number of processes, at least 1, not {self.world}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"a Shard's rank is in 0..{self.world - 1} for a world of {self.world}, not {self.rank}")

    @property
    def name(self) -> str:
        """``shard-<rank>-of-<world>``: the part of its file name."""
        return f"shard-{self.rank}-of-{self.world}"

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def select(self, items: Sequence) -> list:
        """The items at the positions this shard owns."""
        return [x for i, x in enumerate(items) if self.owns(i)]

    def __str__(self) -> str:
        return f"shard {self.rank} of {self.world}"


SINGLE = Shard(0, 1)


def current_shard(environ: Mapping[str, str] | None = None) -> Shard:
    """This process's shard from ``RANK`` and ``WORLD_SIZE`` (as torchrun and ``accelerate launch`` set them).

    ``Shard(0, 1)`` when neither is set. Raises ``ValueError`` when only one is set, or either is not an integer
    or out of range.
    """
    env = os.environ if environ is None else environ
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    if rank is None and world is None:
        return SINGLE
    if rank is None or world is None:
        raise ValueError(f"RANK={rank!r} but WORLD_SIZE={world!r}: a launcher (torchrun, accelerate launch) sets "
                         "both; set both or neither")
    try:
        r, w = int(rank), int(world)
    except ValueError:
        raise ValueError(f"RANK and WORLD_SIZE must be integers, not RANK={rank!r}, WORLD_SIZE={world!r}") from None
    try:
        return Shard(r, w)
    except ValueError as e:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: {e}") from None


def local_device() -> str:
    """This process's device: ``cuda:<LOCAL_RANK>`` (``cuda:0`` unlaunched) when CUDA is visible, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if count == 1:
        return "cuda:0"  # e.g. a launcher that shows each process its own GPU only
    if local >= count:
        raise ValueError(f"LOCAL_RANK={local} but this process sees {count} GPUs: launch at most {count} "
                         "processes per machine")
    return f"cuda:{local}"


def shard_path(path: Path, shard: Shard) -> Path:
    """The file of ``shard`` beside the store file ``path``: ``<name>.shard-<rank>-of-<world>.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{shard.name}{path.suffix}")


def shard_files(store: "ResultStore") -> dict[Shard, Path]:
    """The shard files beside ``store``'s file (any world size), by shard."""
    path = store.bound_path()
    pattern = re.compile(re.escape(path.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(path.suffix))
    found = {}
    for p in sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}")):
        m = pattern.fullmatch(p.name)
        if m and int(m[1]) < int(m[2]):
            found[Shard(int(m[1]), int(m[2]))] = p
    return found


def _failure_path(store: "ResultStore", shard: Shard) -> Path:
    return shard_path(store.bound_path(), shard).with_suffix(".failed")


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: give the seconds to wait as a number") from None


def _listing(ids: Sequence[str]) -> str:
    return ", ".join(repr(i) for i in ids[:_SHOWN]) + (" ..." if len(ids) > _SHOWN else "")


class _Shards:
    """Readers of every shard file beside a store, re-read on :meth:`refresh` (files come and go)."""

    def __init__(self, store: "ResultStore"):
        self.store = store
        self.readers: dict[Path, ResultStore] = {}
        self.holder: dict[str, ResultStore] = {}  # item id -> the first reader holding it

    def refresh(self) -> None:
        s = self.store
        found = shard_files(s)
        self.readers = {p: r for p, r in self.readers.items() if p in found.values()}
        self.holder = {}
        for shard, path in found.items():
            reader = self.readers.get(path)
            if reader is None:
                reader = s.shard_store(shard, readonly=True)
            try:
                records = reader.records()
            except FileNotFoundError:  # deleted by rank 0's merge while being read
                self.readers.pop(path, None)
                continue
            self.readers[path] = reader
            for rec in records:
                self.holder.setdefault(rec["item_id"], reader)

    def verify(self, input_hashes: Mapping[str, str]) -> None:
        for reader in list(self.readers.values()):
            try:
                reader.verify_inputs(input_hashes)
            except FileNotFoundError:  # merged and deleted meanwhile: its records are in the store's file
                pass

    def size(self) -> int:
        total = 0
        for p in self.readers:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total


def run_sharded(store: "ResultStore", items: Sequence, input_hashes: Mapping[str, str], shard: Shard,
                model_identity: Mapping, settings: Mapping, work: Callable[["ResultStore", list], Any], *,
                check: Callable[[list], None] | None = None, timeout: float | None = None) -> list[dict]:
    """This process's part of a sharded item loop (see the module docstring); all records in item order.

    Args:
        store: the run's store (bound here to ``model_identity``; checked against ``settings``).
        items: objects with a unique ``id``, in their stable order.
        input_hashes: item id -> the input hash its record must carry (checked in every file).
        work: ``work(shard_store, part)`` stores a record for each item of ``part`` into ``shard_store``.
        check: called on every rank with every item no file holds yet, before anything runs (raise to refuse).
        timeout: seconds without progress before waiting stops (``$KVLIB_SHARD_TIMEOUT``, default 7200).

    Raises:
        ShardError: another rank failed, or no file grew for ``timeout`` seconds.
    """
    started = time.time()
    timeout = _timeout() if timeout is None else float(timeout)
    ids = [str(x.id) for x in items]
    if shard.rank != 0:
        store._write_later()  # rank 0 alone writes the store's file; here it is only read
    try:
        store.bind(model_identity)
        store.require_settings(settings)
        _failure_path(store, shard).unlink(missing_ok=True)  # this shard's failure in an earlier launch
        store.verify_inputs(input_hashes)
        not_merged = store.missing(ids)
        if not_merged and store.readonly:
            raise PermissionError(f"{len(not_merged)} item(s) are missing from {store.path}, which is open "
                                  "readonly (or closed): open the store without readonly=True to generate them")
        shards = _Shards(store)
        shards.refresh()
        shards.verify(input_hashes)
        missing = [x for x in items if str(x.id) not in store and str(x.id) not in shards.holder]
        if missing and check is not None:
            check(missing)
        part = [x for i, x in enumerate(items) if shard.owns(i) and str(x.id) not in store
                and str(x.id) not in shards.holder]
        if part:
            with store.shard_store(shard, model_identity=model_identity) as own:
                work(own, part)
        return _wait_and_merge(store, ids, input_hashes, shard, started, timeout)
    except BaseException as e:
        if not isinstance(e, ShardError):
            _note_failure(store, shard, e)
        raise


def _note_failure(store: "ResultStore", shard: Shard, error: BaseException) -> None:
    note = {"rank": shard.rank, "world": shard.world, "pid": os.getpid(), "host": socket.gethostname(),
            "error": f"{type(error).__name__}: {error}"[:2000], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        _failure_path(store, shard).write_text(json.dumps(note))
    except Exception:  # an unbound store (no file to note beside) or an unwritable folder: the error still raises
        pass


def _failures(store: "ResultStore", since: float) -> list[dict]:
    """Failure notes written since this process started (older ones are of an earlier launch)."""
    path = store.bound_path()
    out = []
    for p in sorted(path.parent.glob(f"{path.stem}.shard-*-of-*.failed")):
        try:
            if p.stat().st_mtime >= since - 1:
                out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _wait_and_merge(store: "ResultStore", ids: list[str], input_hashes: Mapping[str, str], shard: Shard,
                    started: float, timeout: float) -> list[dict]:
    shards = _Shards(store)
    last_size, last_change, delay = -1, time.monotonic(), 0.05
    while True:
        shards.refresh()
        not_merged = store.missing(ids)
        lacking = [i for i in not_merged if i not in shards.holder]
        if shard.rank == 0 and not lacking:
            _merge(store, shards, ids, input_hashes)
            break
        if shard.rank != 0 and not not_merged:
            break
        failed = [f for f in _failures(store, started) if (f.get("rank"), f.get("world")) != (shard.rank, shard.world)]
        if failed:
            shown = "; ".join(f"rank {f.get('rank')} of {f.get('world')} (pid {f.get('pid')} on {f.get('host')}): "
                              f"{f.get('error')}" for f in failed)
            raise ShardError(f"{store.path}: another process of this sharded run failed, so the run cannot finish: "
                             f"{shown}. Fix that and relaunch the same command: every item already generated is "
                             "kept, in the store's file or its shard's file.")
        try:
            size = shards.size() + store.bound_path().stat().st_size
        except FileNotFoundError:
            size = shards.size()
        now = time.monotonic()
        if size != last_size:
            last_size, last_change, delay = size, now, 0.05
        elif now - last_change > timeout:
            raise ShardError(_stalled(store, ids, lacking, shard, timeout))
        time.sleep(delay)
        delay = min(delay * 2, _MAX_POLL)
    return store.records(ids)


def _stalled(store: "ResultStore", ids: list[str], lacking: list[str], shard: Shard, timeout: float) -> str:
    where = f"{store.path}: waited {timeout:.0f} s ({TIMEOUT_ENV}) with no file of this sharded run growing. "
    if not lacking:
        return (where + "Every shard is done, but rank 0 has not merged them into the store: is rank 0 still "
                "running? Relaunch the same command to merge them.")
    lacking_set = set(lacking)
    by_rank: dict[int, list[str]] = {}
    for pos, i in enumerate(ids):
        if i in lacking_set:
            by_rank.setdefault(pos % shard.world, []).append(i)
    parts = []
    for rank, missing in sorted(by_rank.items()):
        s = Shard(rank, shard.world)
        path = shard_path(store.bound_path(), s)
        parts.append(f"{s} lacks {len(missing)} item(s) ({_listing(missing)}; file {path.name}"
                     f"{'' if path.exists() else ', not started'})")
    return (where + "Missing: " + "; ".join(parts) + ". Are those processes still running? Relaunch the same "
            f"command: the items already generated are kept and each shard resumes from its file (set {TIMEOUT_ENV} "
            "to wait longer for slow batches).")


def _merge(store: "ResultStore", shards: _Shards, ids: list[str], input_hashes: Mapping[str, str]) -> None:
    """Rank 0: append every shard record the store lacks (item order first), then delete the shard files."""
    if store.readonly:  # it holds every item of this run (checked first); leave the files to a writer
        return
    shards.verify(input_hashes)
    records = [shards.holder[i].get(i) for i in store.missing(ids)]
    seen = set(ids)
    for reader in shards.readers.values():  # items of an earlier launch that this run does not list
        for rec in reader.records():
            if rec["item_id"] not in seen and rec["item_id"] not in store:
                records.append(rec)
                seen.add(rec["item_id"])
    if records:
        store.add(records)
    path = store.bound_path()
    for p in path.parent.glob(f"{path.stem}.shard-*-of-*"):
        if re.fullmatch(re.escape(path.stem) + r"\.shard-\d+-of-\d+(\.jsonl(\.lock|\.bin)?|\.failed)", p.name):
            p.unlink(missing_ok=True)
