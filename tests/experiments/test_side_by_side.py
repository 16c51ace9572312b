"""Child processes side by side: they run at the same time, each one's lines come through after its name and
into its own log, each keeps its own exit status, and Ctrl-C stops them all."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kvlib.experiments.side_by_side import run_side_by_side, stop_children


def _child(source: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(source)]


def test_children_run_at_once_with_their_own_lines_logs_and_exit_status(tmp_path):
    """Each child waits until the other started (one after the other, the first would wait in vain and exit 9);
    a progress bar redrawn in place comes through once per interval, whole lines always."""
    wait_for = textwrap.dedent("""
        import pathlib, sys, time
        here, other, code = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
        here.touch()
        for _ in range(600):
            if other.exists():
                break
            time.sleep(0.05)
        else:
            sys.exit(9)
        print("started", flush=True)
        for i in range(3):
            sys.stderr.write(f"\\rbar {i}/3"); sys.stderr.flush(); time.sleep(0.01)
        sys.stderr.write("\\rbar 3/3\\n"); sys.stderr.flush()
        print("last line without end", end="")
        sys.exit(code)
    """)
    a, b = tmp_path / "a.started", tmp_path / "b.started"
    commands = {"m-a": [sys.executable, "-c", wait_for, str(a), str(b), "0"],
                "m-b": [sys.executable, "-c", wait_for, str(b), str(a), "3"]}
    logs = {"m-a": tmp_path / "logs" / "a.log", "m-b": tmp_path / "logs" / "b.log"}
    out = io.StringIO()
    assert run_side_by_side(commands, logs, out=out, bar_every=3600) == {"m-a": 0, "m-b": 3}
    lines = out.getvalue().splitlines()
    for name in ("m-a", "m-b"):
        mine = [ln.removeprefix(f"[{name}] ") for ln in lines if ln.startswith(f"[{name}] ")]
        # the first bar state shows, the next two (within the interval) do not, the finished bar's line does
        assert mine == ["started", "bar 0/3", "bar 3/3", "last line without end"], mine
    assert len(lines) == 8
    log = logs["m-b"].read_bytes()
    assert log.startswith(b"started\n") and b"\rbar 1/3\rbar 2/3\rbar 3/3\n" in log


def test_ctrl_c_stops_every_child(tmp_path):
    """A KeyboardInterrupt while waiting stops each child (with one SIGINT) and is raised again."""
    pids = [tmp_path / f"{n}.pid" for n in "ab"]
    sleeper = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    commands = {n: [sys.executable, "-c", sleeper, str(p)] for n, p in zip("ab", pids)}

    def interrupt():
        for _ in range(400):
            if all(p.exists() and p.read_text() for p in pids):
                break
            time.sleep(0.05)
        # delivered to this thread, not the main one (as a terminal's Ctrl-C may be): the main thread must still
        # act on it at once, not when the children end by themselves
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_side_by_side(commands, {n: tmp_path / f"{n}.log" for n in "ab"}, out=io.StringIO())
    assert time.monotonic() - t0 < 30  # the children sleep 120 s
    for p in pids:
        with pytest.raises(ProcessLookupError):  # ended and reaped
            os.kill(int(p.read_text()), 0)
    assert "KeyboardInterrupt" in (tmp_path / "a.log").read_text()  # stopped by its SIGINT, not killed


def test_a_child_that_ignores_ctrl_c_is_terminated(tmp_path):
    child = subprocess.Popen(_child("""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    stop_children({"x": child}, grace=0.5)
    assert child.poll() == -signal.SIGTERM
    child.stdout.close()
