#!/usr/bin/env python3
"""Start JupyterLab on the notebooks wherever `make reproduce` runs: as root, in a container, over SSH.

    python scripts/lab.py [--ip localhost] [--port 8888] [--token TOKEN] [--notebook-dir notebooks] [-- ARGS]

(`make lab [LAB_PORT=8888] [LAB_IP=localhost]` runs it with the venv's Python.) The server:

* listens on ``localhost`` only (``--ip``): nothing on the network reaches it; from another machine, use an SSH
  tunnel (``ssh -L 8888:localhost:8888 HOST``) and open the printed URL there;
* opens no browser (a server or a container has none) and prints the URL with its token (a fresh random token
  unless ``--token`` or ``$JUPYTER_TOKEN`` gives one);
* passes ``--allow-root`` only when running as root (Jupyter refuses root otherwise);
* refuses a port in use with a message that names another one (the printed tunnel command must stay right).

Arguments after ``--`` go to ``jupyter lab`` as they are (the browser test points the settings folders at a
temporary one this way).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lab_command(notebook_dir: str | os.PathLike, ip: str = "localhost", port: int = 8888, token: str = "",
                extra: list[str] | None = None, python: str = sys.executable) -> list[str]:
    """The ``jupyter lab`` command line: no browser, bound to ``ip``:``port`` (no fallback to another port), the
    given token, ``--allow-root`` when running as root."""
    cmd = [python, "-m", "jupyterlab", f"--ServerApp.root_dir={Path(notebook_dir).resolve()}", f"--ServerApp.ip={ip}",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.open_browser=False",
           f"--IdentityProvider.token={token}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd + list(extra or [])


def port_in_use(ip: str, port: int) -> bool:
    """True when something already listens on ``ip``:``port``."""
    try:
        infos = socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(0.5)
            if s.connect_ex(addr) == 0:
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ip", default="localhost", help="address to listen on (default localhost: this machine only)")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--token", default=os.environ.get("JUPYTER_TOKEN") or "",
                        help="the URL's token (default $JUPYTER_TOKEN, else a fresh random one)")
    parser.add_argument("--notebook-dir", default=str(ROOT / "notebooks"))
    args = parser.parse_args(argv)
    if port_in_use(args.ip, args.port):
        print(f"lab: port {args.port} on {args.ip} is in use (another JupyterLab?): stop it, or pick another port, "
              f"e.g. `make lab LAB_PORT={args.port + 1}`", file=sys.stderr)
        return 1
    token = args.token or secrets.token_hex(24)
    host = "localhost" if args.ip in ("localhost", "127.0.0.1", "::1") else args.ip
    url = f"http://{host}:{args.port}/lab?token={token}"
    local = host == "localhost"
    folder = Path(args.notebook_dir).resolve()
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    where = f"{args.ip}:{args.port}" + (" (this machine only)" if local else "")
    print(f"lab: JupyterLab on {shown}/, listening on {where}", flush=True)
    print(f"lab: open {url}", flush=True)
    if local:
        print(f"lab: from another machine: `ssh -L {args.port}:localhost:{args.port} USER@THIS_HOST`, then open the "
              "same URL in a browser there (the tunnel keeps the server off the network)", flush=True)
    print("lab: stop with Ctrl-C", flush=True)
    cmd = lab_command(args.notebook_dir, args.ip, args.port, token, extra)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
