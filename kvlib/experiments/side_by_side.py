"""Child processes run side by side, each one's output shown line by line after its name and kept in its own log.

The notebook runner (:mod:`kvlib.experiments.pipeline`) runs several models of one profile at the same time with
:func:`run_side_by_side`: one child process per model, on one machine. A model on its own seldom keeps a GPU
busy (a decode step of a small model is bound by the host), so two at once finish sooner than one after the
other. Every line a child prints (its runner's progress, its notebooks' output) reaches this terminal as
``[name] line``; a progress bar redrawn in place (``\\r``) is shown at most every ``bar_every`` seconds. The log
file of each child holds its whole output, as it wrote it. Ctrl-C stops every child (each keeps what it finished:
a rerun resumes from the stores); a child that fails does not stop the others.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["run_side_by_side", "stop_children"]

_PIECE = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r)")  # a line, or a progress bar's state before it is redrawn
_PRINT = threading.Lock()  # one whole line at a time on this terminal


def _show(out, line: str) -> None:
    with _PRINT:
        out.write(line + "\n")
        out.flush()


def _relay(stream, prefix: str, log: Path, out, bar_every: float) -> None:
    """Copy a child's output ``stream`` into ``log`` (as it comes) and, line by line after ``prefix``, to ``out``;
    of the states of a progress bar redrawn in place, one every ``bar_every`` seconds."""
    buf, last_bar = b"", float("-inf")
    with open(log, "ab") as f:
        while True:
            chunk = os.read(stream.fileno(), 65536)
            f.write(chunk)
            f.flush()
            buf += chunk
            # a "\r" at the end may be the first half of "\r\n": wait for what follows it
            pieces = _PIECE.findall(buf[:-1] if chunk and buf.endswith(b"\r") else buf)
            buf = buf[sum(map(len, pieces)):]
            if not chunk and buf:  # the last line, with no line end
                pieces, buf = [*pieces, buf], b""
            for piece in pieces:
                text = piece.rstrip(b"\r\n").decode("utf-8", errors="replace")
                if not text.strip():
                    continue
                if piece.endswith(b"\r"):  # redrawn in place: a progress bar
                    if time.monotonic() - last_bar < bar_every:
                        continue
                    last_bar = time.monotonic()
                _show(out, prefix + text)
            if not chunk:
                return


def stop_children(procs: dict[str, subprocess.Popen], grace: float = 30.0) -> None:
    """Stop every child still running: Ctrl-C (SIGINT, which the runner answers by stopping cleanly), then, after
    ``grace`` seconds, SIGTERM, then SIGKILL. The children run in process groups of their own (a Ctrl-C in the
    terminal reaches this process alone), so each gets one SIGINT, from here."""
    live = [p for p in procs.values() if p.poll() is None]
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for p in live:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        live = [p for p in live if p.poll() is None]
        if not live:
            return


def _wait_all(procs: dict[str, subprocess.Popen], tick: float = 0.2) -> dict[str, int]:
    """Every child's exit status, waiting in short ticks: a Ctrl-C that the kernel hands to another thread (a
    relay's) is only acted on when the main thread runs Python again, which a plain ``wait()`` would delay until
    the children ended by themselves."""
    codes: dict[str, int] = {}
    while len(codes) < len(procs):
        for name, p in procs.items():
            if name not in codes:
                try:
                    codes[name] = p.wait(timeout=tick)
                except subprocess.TimeoutExpired:
                    pass
    return {name: codes[name] for name in procs}


def run_side_by_side(commands: dict[str, list[str]], logs: dict[str, Path], env: dict | None = None, out=None,
                     bar_every: float = 30.0) -> dict[str, int]:
    """Run every command of ``commands`` (``{name: argv}``) at the same time and wait for all of them: ``{name:
    exit status}``. Each child's output goes to ``logs[name]`` (appended) and, each line after ``[name] ``, to
    ``out`` (default: standard error). Ctrl-C (:class:`KeyboardInterrupt`) stops every child
    (:func:`stop_children`) and is raised again."""
    out = sys.stderr if out is None else out
    procs: dict[str, subprocess.Popen] = {}
    relays = []
    try:
        for name, argv in commands.items():
            Path(logs[name]).parent.mkdir(parents=True, exist_ok=True)
            procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, env=env, process_group=0)
            relay = threading.Thread(target=_relay, args=(procs[name].stdout, f"[{name}] ", Path(logs[name]), out,
                                                          bar_every), daemon=True)
            relay.start()
            relays.append(relay)
        codes = _wait_all(procs)
    except BaseException:
        stop_children(procs)
        raise
    finally:
        for relay in relays:
            relay.join(timeout=10)
        for p in procs.values():
            p.stdout.close()
    return codes
