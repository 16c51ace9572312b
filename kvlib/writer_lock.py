"""One writer per result file: an exclusive ``flock`` on ``<file>.lock``, shared within a process.

A second process asking for a held lock is refused at once (:class:`StoreLockedError`, naming the holder's
pid, host, start time and command line, which the lock file records). The kernel drops the lock of a killed
process, so a stale lock needs no cleaning: the next run simply takes it. Within one process the lock is
reference-counted, so opening the same store twice (a notebook cell run again) does not refuse itself. The
lock file is never deleted: deleting it would let two processes lock two different files of one name.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock
    fcntl = None

__all__ = ["StoreLockedError", "acquire", "release"]


class StoreLockedError(RuntimeError):
    """Another live process is writing this store."""


_HELD: dict[str, list] = {}  # lock path -> [fd, users, pid] of the locks this process holds
_HELD_GUARD = threading.Lock()


def acquire(lock_path: Path, store_path: Path) -> str:
    key = str(lock_path.resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return key
        if fcntl is None:
            _HELD[key] = [None, 1, os.getpid()]
            return key
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']} (since {h['since']}, running {h.get('argv', '?')})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise StoreLockedError(
                f"{store_path} is being written by {who}. Two writers would mix their records: wait for that "
                "run to finish, or stop it (its lock goes with it), then run again. In that process, "
                "store.close() releases it; to only read, open the store with readonly=True."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1, os.getpid()]
        return key


def release(key: str) -> None:
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] -= 1
            if held[1] == 0 and _HELD.pop(key)[0] is not None:
                os.close(held[0])  # releases the flock; the lock file stays (deleting it would race)
