"""Saving the experiments' tables and figures, and the pieces their captions share.

:func:`save_table` keeps results and wall-clock measurements apart: columns that hold timings (seconds,
tokens per second, ...; see :func:`timing_columns`) go to ``timings/<stem>.csv`` beside the table, so that two
runs with one seed write byte-identical result tables. :func:`save_figure` writes a PNG and a PDF.

Captions name what produced a table: :func:`run_label` (model, profile, hardware), :func:`set_label` (the
paper's set names, ``GSM8K``, ``MATH-500`` ...) and :func:`skipped_note` (optional sets a selection left out).
:func:`flat_columns` turns a frame's two-level columns into one level for a CSV or Markdown table.
:func:`show_log` makes the library's notices (a skipped set, a model converted once) part of a notebook's output.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..data import SET_LABELS, skipped_sets

__all__ = ["SET_LABELS", "TIMINGS_DIR", "set_label", "run_label", "skipped_note", "flat_columns", "timing_columns",
           "save_table", "save_figure", "show_log"]

TIMINGS_DIR = "timings"
_TIMING = re.compile(r"seconds|tok_s|tokens?[ _]?/[ _]?s\b|per[ _]second"
                     r"|(^|[ _])(s|ms|us|time|elapsed|duration|wall)($|[ _])", re.I)


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stdout`` of the moment (a kernel or a test may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def show_log(level: int = logging.INFO) -> None:
    """Show kvlib's log in a notebook: every record of the ``kvlib`` loggers at ``level`` or above, as a plain
    line on stdout, like a print.

    The library reports progress and notices through :mod:`logging` and configures nothing itself, so without
    this a notebook would show its warnings only (on stderr, which :mod:`.notebook_outputs` drops when
    publishing). Other libraries' logs are left alone. Calling it again changes only the level.
    """
    logger = logging.getLogger("kvlib")
    logger.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def set_label(name: str) -> str:
    """The paper's name of data set ``name`` (``"gsm8k"`` -> ``"GSM8K"``); unknown names as they are."""
    return SET_LABELS.get(name, name)


def run_label(model_name: str, profile: str, hardware: str = "") -> str:
    """``Model M, profile P on HARDWARE``: the head of every caption (``hardware`` left out when empty)."""
    on = f" on {hardware}" if hardware else ""
    return f"Model {model_name}, profile {profile}{on}"


def skipped_note(selection) -> str:
    """`` Skipped: TheoremQA (needs DATA_DIR holding theoremqa_test.json).`` for the sets a selection left out
    (``""`` when none was)."""
    skipped = skipped_sets(selection)
    if not skipped:
        return ""
    return " Skipped: " + "; ".join(f"{set_label(s.name)} ({s.reason})" for s in skipped) + "."


def flat_columns(df: pd.DataFrame, sep: str = " · ") -> pd.DataFrame:
    """``df`` with each column tuple joined by ``sep`` (``("GSM8K", "m")`` -> ``"GSM8K · m"``); an empty frame
    as it is."""
    if not len(df.columns):
        return df
    return df.set_axis([sep.join(str(part) for part in c) if isinstance(c, tuple) else str(c) for c in df.columns],
                       axis=1)


def timing_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that hold wall-clock measurements (names with ``seconds``, ``tok_s``, ``tokens/s``, or
    the word ``s``, ``ms``, ``us``, ``time``, ``elapsed``, ``duration``, ``wall``): they differ from run to run,
    so :func:`save_table` writes them apart."""
    return [c for c in df.columns if _TIMING.search(str(c))]


def _key_columns(df: pd.DataFrame, timings: Sequence[str]) -> list[str]:
    """Non-numeric columns (set, method, model, ...) that identify a row, repeated in the timings file."""
    return [c for c in df.columns if c not in timings and not pd.api.types.is_numeric_dtype(df[c])]


def save_table(df: pd.DataFrame, stem: str | Path, caption_line: str, markdown: str | None = None,
               timings: Sequence[str] | None = None) -> list[Path]:
    """``stem.csv`` (the data frame) and ``stem.md`` (``markdown`` or the frame as Markdown, after the caption).

    Wall-clock columns (``timings``; default :func:`timing_columns`) are not part of the result table: they go
    to ``timings/<stem name>.csv`` and ``.md`` next to it, with the row-identifying text columns, so results
    are byte-identical across runs with one seed while the timings of each run stay available. Returns the
    paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    timings = list(timing_columns(df) if timings is None else timings)
    missing = [c for c in timings if c not in df.columns]
    if missing:
        raise KeyError(f"timing columns {missing} are not in the table {stem.name} (columns: {list(df.columns)})")
    written = []
    if timings:
        tdir = stem.parent / TIMINGS_DIR
        tdir.mkdir(parents=True, exist_ok=True)
        tdf = df[_key_columns(df, timings) + timings]
        tstem = tdir / stem.name
        tdf.to_csv(tstem.with_suffix(".csv"), index=False)
        tstem.with_suffix(".md").write_text(f"{caption_line} Wall-clock measurements of this run (they vary from "
                                            f"run to run).\n\n{tdf.to_markdown(index=False)}\n")
        written += [tstem.with_suffix(".csv"), tstem.with_suffix(".md")]
        df = df.drop(columns=timings)
        if markdown is None:
            caption_line = f"{caption_line} Timings: {TIMINGS_DIR}/{stem.name}.md."
    df.to_csv(stem.with_suffix(".csv"), index=False)
    md = markdown if markdown is not None else f"{caption_line}\n\n{df.to_markdown(index=False)}\n"
    stem.with_suffix(".md").write_text(md)
    return [stem.with_suffix(".csv"), stem.with_suffix(".md"), *written]


def save_figure(fig, stem: str | Path, dpi: int = 150, tight: bool = True) -> None:
    """``stem.png`` and ``stem.pdf`` (cropped to the drawn area unless ``tight=False``)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".png", ".pdf"):
        fig.savefig(stem.with_suffix(ext), dpi=dpi, bbox_inches="tight" if tight else None)
