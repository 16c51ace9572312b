"""Saving the experiments' tables and figures, and the pieces their captions share.

:func:`save_table` keeps results and wall-clock measurements apart: columns that hold timings (seconds,
tokens per second, ...; see :func:`timing_columns`) go to ``timings/<stem>.csv`` beside the table, so that two
runs with one seed write byte-identical result tables. :func:`save_figure` writes a PNG and a PDF.

Captions name what produced a table: :func:`run_label` (model, profile, hardware), :func:`set_label` (the
paper's set names, ``GSM8K``, ``MATH-500`` ...) and :func:`skipped_note` (optional sets a selection left out).
:func:`flat_columns` turns a frame's two-level columns into one level for a CSV or Markdown table.
:func:`show_log` makes the library's notices (a skipped set, a model converted once) part of a notebook's output.
:func:`show_table` shows a table in a notebook as a rendered table (HTML, with its caption and notes), whether it
comes as a data frame or as the Markdown text written to ``tables/``; :func:`shown_path` shows a path without the
machine's folders (``$KVLIB_CACHE/...``, or relative to the repository).
"""

from __future__ import annotations

import html
import io
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..assets.data import SET_LABELS, skipped_sets
from ..core.paths import shown_path

__all__ = ["SET_LABELS", "TIMINGS_DIR", "set_label", "run_label", "skipped_note", "flat_columns", "timing_columns",
           "save_table", "save_figure", "show_log", "ShownTable", "show_table", "markdown_table", "shown_path"]

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


# --- tables shown in a notebook --------------------------------------------------------------------------------------
# A cell that ends with show_table(...) leaves one output holding text/html (a <table>, what JupyterLab, GitHub and
# nbviewer render) and text/plain (the Markdown, what a terminal or a diff shows): no viewer sees a wall of pipes.

_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_table(text: str) -> tuple[str, pd.DataFrame, str, list[str]]:
    """Split Markdown holding one pipe table (as :meth:`pandas.DataFrame.to_markdown` writes it, optionally with
    paragraphs before and after) into ``(text before, table as a frame of strings, text after, alignments)``;
    alignments are ``"left"``/``"right"``/``""`` per column, from the rule line. Raises ``ValueError`` when the text
    holds no pipe table."""
    lines = text.strip("\n").splitlines()
    rule = next((i for i in range(1, len(lines)) if _RULE.match(lines[i]) and lines[i - 1].lstrip().startswith("|")),
                None)
    if rule is None:
        raise ValueError("show_table: the Markdown holds no pipe table (a header row, then a |---|---| rule): "
                         f"{text[:120]!r}")
    end = rule + 1
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    header = _cells(lines[rule - 1])
    frame = pd.read_csv(io.StringIO("\n".join("|".join(_cells(r)) for r in lines[rule + 1:end])), sep="|",
                        header=None, names=range(len(header)), dtype=str, keep_default_na=False)
    frame.columns = header
    align = ["right" if c.endswith(":") and not c.startswith(":") else "left" if c.startswith(":") else ""
             for c in _cells(lines[rule])]
    return "\n".join(lines[:rule - 1]).strip(), frame, "\n".join(lines[end:]).strip(), align


@dataclass(frozen=True, eq=False)
class ShownTable:
    """A table as a notebook shows it: ``caption`` above, ``frame`` as an HTML table, ``notes`` below; ``markdown``
    is its plain-text form. Made by :func:`show_table`."""

    frame: pd.DataFrame
    caption: str = ""
    notes: str = ""
    markdown: str = ""
    index: bool = False
    align: tuple[str, ...] = ()

    def _repr_html_(self) -> str:
        table = _aligned(self.frame.to_html(index=self.index, border=0, na_rep="", classes="kvlib-table"), self.align)
        text = [f"<p>{html.escape(p)}</p>" for p in (self.caption, self.notes)]
        return "<div>" + (text[0] if self.caption else "") + table + (text[1] if self.notes else "") + "</div>"

    def __repr__(self) -> str:
        if self.markdown:
            return self.markdown.rstrip("\n")
        body = self.frame.to_markdown(index=self.index)
        return "\n\n".join(p for p in (self.caption, body, self.notes) if p)


def _aligned(table: str, align: Sequence[str]) -> str:
    """``table`` (HTML rows of ``len(align)`` cells) with ``style="text-align: ..."`` on each cell of an aligned
    column."""
    def row(match: re.Match) -> str:
        cells = iter(align)
        return re.sub(r"<(td|th)>", lambda m: (f'<{m.group(1)} style="text-align: {a};">' if (a := next(cells, ""))
                                               else m.group(0)), match.group(0))
    return re.sub(r"<tr[^>]*>.*?</tr>", row, table, flags=re.S)


def show_table(table: pd.DataFrame | str, caption: str = "", notes: str = "", index: bool | None = None
               ) -> ShownTable:
    """A table for a notebook cell to show (end the cell with it, or pass it to ``IPython.display.display``).

    ``table`` is a data frame, or Markdown as written to ``tables/`` (a caption paragraph, a pipe table, notes),
    split by :func:`markdown_table` so that the caption and notes are shown as text around the rendered table.
    ``caption`` and ``notes`` add text above and below. ``index``: show a frame's index (default: when it is named
    or not a plain range).
    """
    if isinstance(table, str):
        before, frame, after, align = markdown_table(table)
        return ShownTable(frame, " ".join(p for p in (caption, before) if p), " ".join(p for p in (after, notes) if p),
                          markdown=table, align=tuple(align))
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"show_table takes a pandas DataFrame or Markdown text, not {type(table).__name__}")
    if index is None:
        index = table.index.name is not None or not isinstance(table.index, pd.RangeIndex)
    return ShownTable(table, caption, notes, index=index)

