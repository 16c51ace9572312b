"""Execute every numbered notebook headlessly with papermill, in order.

``python -m kvlib.pipeline --profile small [--model NAME] [--data-dir DIR] [--only 03]``

Each notebook runs with its working directory set to ``notebooks/`` (as in JupyterLab) and the
parameters ``PROFILE``, ``MODEL``, ``DATA_DIR``; the executed copy is kept in ``build/executed/``.
A failing cell stops the run with a non-zero exit naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["notebooks", "run_notebook", "update_readme", "main"]

ROOT = Path(__file__).resolve().parents[1]


def notebooks(root: Path = ROOT) -> list[Path]:
    """The numbered notebooks ``notebooks/NN_*.ipynb`` in order."""
    return sorted(p for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel_name: str = "python3") -> Path:
    """Run one notebook with papermill; raise ``RuntimeError`` naming the failing cell."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    # matplotlib stamps PDFs with this date instead of now: unchanged figures give unchanged files
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    try:
        pm.execute_notebook(
            str(path), str(out), parameters=parameters, cwd=str(path.parent), kernel_name=kernel_name,
            progress_bar=False, log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as err:
        raise RuntimeError(
            f"{path.name}: cell {err.cell_index} ({err.exec_count and f'[{err.exec_count}]' or 'unnumbered'}) "
            f"failed with {err.ename}: {err.evalue}\n  executed copy with the traceback: {out}"
        ) from None
    return out


_TABLE = re.compile(r"(<!-- table: *(?P<name>[\w.-]+) *-->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def update_readme(root: Path = ROOT) -> list[str]:
    """Copy each generated ``tables/NAME.md`` into README.md between ``<!-- table: NAME -->`` and
    ``<!-- /table -->``, so the README never holds a typed number. Returns the names filled in."""
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    filled = []

    def fill(m: re.Match) -> str:
        path = root / "tables" / f"{m['name']}.md"
        if not path.exists():
            return m.group(0)
        filled.append(m["name"])
        return m.group(1) + path.read_text(encoding="utf-8").strip() + "\n" + m.group(4)

    readme.write_text(_TABLE.sub(fill, text), encoding="utf-8")
    return filled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--model", default="")
    ap.add_argument("--data-dir", default="", help="folder with theoremqa_test.json, amazon_counterfactual/, ...")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    ap.add_argument("--out", default=str(ROOT / "build" / "executed"))
    args = ap.parse_args(argv)

    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    todo = [p for p in notebooks() if not args.only or p.name[:2] in args.only]
    if not todo:
        print("no notebooks matched", file=sys.stderr)
        return 2
    params = {"PROFILE": args.profile, "MODEL": args.model, "DATA_DIR": data_dir}
    t_all = time.perf_counter()
    for path in todo:
        t0 = time.perf_counter()
        print(f"==> {path.name} {params}", flush=True)
        try:
            run_notebook(path, Path(args.out), params)
        except RuntimeError as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 1
        print(f"<== {path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all {len(todo)} notebooks done in {(time.perf_counter() - t_all) / 60:.1f} min")
    print("README tables refreshed:", ", ".join(update_readme()) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
