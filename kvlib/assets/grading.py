"""Answer extraction and grading (math-verify, plus fast paths for numbers and TheoremQA types).

Extraction (:func:`extract_answer`), in this order:

1. the LAST complete ``\\boxed{...}`` (or ``\\fbox{}``) of the output. The paper's CoE code grades MATH by
   the first box, but our outputs end with the final answer: the slow prompt asks for the answer in a box
   at the end, and a switch to fast injects the lead-in "So the final answer is \\boxed{" after any
   earlier reasoning, which may itself contain boxes of intermediate results. The last box is therefore
   the committed answer. When that last box was opened but never closed (the output ended right after
   the answer, e.g. "\\boxed{18" then end of sequence), the text after the brace is the answer; an output
   cut at the token limit is wrong anyway (``finished=False``).
2. a GSM8K-style ``#### N`` line (the last one).
3. only with ``numeric_fallback=True`` (used for gsm8k / svamp / asdiv / mawps and TheoremQA): "the
   answer is X" for TheoremQA-style text, else the LAST number in the text. This is the usual lenient
   convention for word problems with a plain numeric answer; a reply that is only "18" is right.

Comparison (:func:`is_correct`): an output that did not finish (``finished=False``: cut at the token
limit) is wrong. Then, when the gold answer is a plain number and the extracted answer is one too after
removing ``$`` / ``\\$`` / ``\\%`` / thousands commas / ``\\text{...}`` and trailing unit words (``18
dollars``), the two are compared as floats (relative tolerance 1e-6). Otherwise math-verify decides
(``verify(parse(gold), parse(answer))``, both wrapped in ``$...$``), which handles fractions, radicals,
intervals, tuples, matrices and LaTeX variants. TheoremQA follows its official evaluation: bool answers
match True/False/yes/no; integer gold answers match a prediction that rounds to them; float gold answers
match within a relative tolerance of :data:`THEOREMQA_REL_TOL` = 0.04 (the official ``within_eps``);
lists are compared element-wise after sorting, as the official code does; options match ``(a)``/``a``.

Parsed gold answers are cached. math-verify's time limits use signals, which only work on the main
thread: off the main thread they are turned off.
"""

from __future__ import annotations

import ast
import re
import threading
from functools import lru_cache

from math_verify import parse, verify

from kvlib.assets.data import last_boxed

__all__ = ["extract_answer", "is_correct", "to_number", "THEOREMQA_REL_TOL", "NUMERIC_FALLBACK_DATASETS"]

THEOREMQA_REL_TOL = 0.04
NUMERIC_FALLBACK_DATASETS = ("gsm8k", "svamp", "asdiv", "mawps", "theoremqa")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d*\.\d+|\d+)(?:\.\d+)?")


def extract_answer(text: str, numeric_fallback: bool = False) -> str | None:
    """The answer string of a model output (see the module docstring for the order), or None."""
    if text is None:
        return None
    tail = _open_box_tail(text)
    if tail:
        return tail
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip()
    if numeric_fallback:
        said = re.findall(r"answer is[:\s]*\$?([^\n$]+)", text, flags=re.IGNORECASE)
        if said and to_number(said[-1].strip().rstrip(".")) is not None:
            return said[-1].strip().rstrip(".")
        nums = _NUMBER_RE.findall(text)
        if nums:
            return nums[-1]
    return None


def _open_box_tail(text: str) -> str | None:
    """The text after the last ``\\boxed{`` when that box is never closed, else None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth = 0
    for ch in text[i + len("\\boxed{"):]:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return None
    return text[i + len("\\boxed{"):].strip().rstrip("$.").strip() or None


def _strip_decorations(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r" \1 ", s)
    s = s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("%", " ")
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\\ ", " ")
    s = re.sub(r"^\\?\(|\\?\)$", "", s.strip()) if re.fullmatch(r"\\?\(.*\\?\)", s.strip()) else s
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    return s.strip().rstrip(".").strip()


def to_number(s: str | None) -> float | None:
    """``s`` as a float when it is a plain number, possibly with ``$``, ``%``, thousands commas, and
    trailing unit words (``"\\$1,000.00"``, ``"18 dollars"``, ``"5\\text{ cm}"``); else None."""
    if s is None:
        return None
    t = _strip_decorations(s)
    m = re.fullmatch(r"(?:[a-zA-Z]\s*=\s*)?(-?\s*(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z][a-zA-Z\s.]*)?", t)
    if m is None:
        return None
    try:
        return float(m.group(1).replace(" ", ""))
    except ValueError:
        return None


@lru_cache(maxsize=100_000)
def _parse_cached(s: str, on_main: bool):
    kwargs = {} if on_main else {"parsing_timeout": None}
    return parse(f"${s}$", **kwargs)


def _mv_equal(gold: str, answer: str) -> bool:
    on_main = threading.current_thread() is threading.main_thread()
    g = _parse_cached(gold, on_main)
    p = _parse_cached(answer, on_main)
    if not g or not p:
        return False
    return bool(verify(g, p, **({} if on_main else {"timeout_seconds": None})))


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b) + (1e-9 if rel < 1e-3 else 0.0)


def _tqa_list(s: str) -> list[float] | None:
    t = s.strip().strip("$").strip()
    t = re.sub(r"^\\left|\\right", "", t).replace("\\left", "")
    if not t:
        return None
    if t[0] not in "[(" or t[-1] not in "])":
        t = f"[{t}]"  # "0, 5" written without brackets
    parts = [p for p in re.split(r",|;", t[1:-1]) if p.strip()]
    vals = [to_number(p) for p in parts]
    if any(v is None for v in vals):
        return None
    return vals


def _theoremqa_correct(answer: str, gold: str) -> bool:
    g = gold.strip()
    if g in ("True", "False"):
        a = _strip_decorations(answer).lower().strip(" .")
        word = {"true": "True", "yes": "True", "false": "False", "no": "False"}.get(a)
        return word == g
    if re.fullmatch(r"\([a-z]\)", g):
        a = _strip_decorations(answer).lower()
        m = re.fullmatch(r"\(?([a-z])\)?(?:[.:].*)?", a.strip())
        return m is not None and f"({m.group(1)})" == g
    if g.startswith("["):
        gv = [float(x) for x in ast.literal_eval(g)]
        av = _tqa_list(answer)
        if av is None or len(av) != len(gv):
            return False
        return all(_close(a, b, THEOREMQA_REL_TOL) for a, b in zip(sorted(av), sorted(gv)))
    gv = to_number(g)
    av = to_number(answer)
    if av is None:
        try:  # a LaTeX expression such as \frac{3}{4} or 2\sqrt{2}: let math-verify evaluate it
            parsed = _parse_cached(answer, threading.current_thread() is threading.main_thread())
            av = float(parsed[0]) if parsed else None
        except (TypeError, ValueError):
            av = None
    if gv is None or av is None:
        return _mv_equal(g, answer)
    if re.fullmatch(r"-?\d+", g):  # integer answer type (float golds keep a decimal point)
        return round(av) == gv
    return _close(av, gv, THEOREMQA_REL_TOL)


def is_correct(output_text: str, gold: str, dataset: str, finished: bool = True) -> bool:
    """Whether ``output_text`` (a model output, or an answer string) answers ``gold`` for ``dataset``.
    Unfinished outputs are wrong."""
    if not finished or output_text is None:
        return False
    answer = extract_answer(output_text, numeric_fallback=dataset in NUMERIC_FALLBACK_DATASETS)
    if answer is None or not answer.strip():
        return False
    gold = str(gold).strip()
    if dataset == "theoremqa":
        return _theoremqa_correct(answer, gold)
    gv = to_number(gold)
    if gv is not None:
        av = to_number(answer)
        if av is not None:
            return _close(av, gv, 1e-6)
    return _mv_equal(gold, answer)
