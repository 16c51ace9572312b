"""One writer per result file: an exclusive ``flock`` on ``<file>.lock``, shared within a process.

A second process asking for a held lock is refused at once (:class:`StoreLockedError`, naming the holder's
pid, host, start time and command line, which the lock file records). The kernel drops the lock of a killed
process, so a stale lock needs no cleaning: the next run simply takes it. Within one process the lock is
reference-counted, so opening the same store twice (a notebook cell run again) does not refuse itself. The
lock file is never deleted: deleting it would let two processes lock two different files of one name; a holder
notices (:func:`check_held`, before every write) and stops with an error that says so. The lock file is opened with
``O_NOFOLLOW`` (a symbolic link in its place is refused, never truncated through) and emptied only once locked.
"""

from __future__ import annotations

import errno
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

__all__ = ["StoreLockedError", "acquire", "release", "check_held"]


class StoreLockedError(RuntimeError):
    """Another live process is writing this store."""


_HELD: dict[str, list] = {}  # lock path -> [fd, users, pid] of the locks this process holds
_HELD_GUARD = threading.Lock()


def acquire(lock_path: Path, store_path: Path) -> str:
    """Take the lock ``lock_path`` for writing ``store_path``; return the key to :func:`release` it."""
    lock_path = Path(lock_path)
    key = str(lock_path.parent.resolve() / lock_path.name)  # the lock file itself is never followed
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return key
        if fcntl is None:
            _HELD[key] = [None, 1, os.getpid()]
            return key
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise StoreLockedError(
                f"{key} is a symbolic link: a lock file must be a plain file (a link could make kvlib write another "
                "file). Delete the link and run again.") from None
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


def check_held(key: str, store_path: Path) -> None:
    """Raise :class:`StoreLockedError` when the lock file this process holds as ``key`` was deleted or replaced
    (another process could then lock a new file of that name and write ``store_path`` too)."""
    with _HELD_GUARD:
        held = _HELD.get(key)
    if held is None or held[0] is None:
        return
    mine = os.fstat(held[0])
    try:
        now = os.stat(key, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        raise StoreLockedError(
            f"the lock file {key} of {store_path} was deleted or replaced while this process held it: another run "
            "may be writing the store too, and two writers would mix their records. Nothing more was written: stop "
            "any other run of it, then run again (the finished items are kept).")
