"""Grading: gold solutions grade right, wrong and unfinished answers wrong, TheoremQA types."""

import threading
import time

import pytest

from kvlib.assets.data import answer_type, load_math
from kvlib.assets.grading import extract_answer, is_correct, to_number



def test_every_math500_gold_solution_grades_correct():
    items = load_math("math500")
    start = time.perf_counter()
    wrong = [i.id for i in items if not is_correct(i.meta["solution"], i.answer, "math500")]
    assert wrong == []
    assert time.perf_counter() - start < 30


def test_every_gsm8k_test_gold_solution_grades_correct():
    items = load_math("gsm8k", "test")
    assert all(is_correct(i.meta["solution"], i.answer, "gsm8k") for i in items)


@pytest.mark.parametrize("output,gold,dataset", [
    ("\\boxed{1,000}", "1000", "gsm8k"), ("\\boxed{\\$18.00}", "18", "gsm8k"),
    ("\\boxed{18 dollars}", "18", "gsm8k"), ("\\boxed{18\\text{ dollars}}", "18", "gsm8k"),
    ("\\boxed{5.0}", "5", "svamp"), ("She makes 18 dollars.", "18", "gsm8k"), ("\\boxed{25\\%}", "25", "asdiv"),
    ("Thinking: \\boxed{3} is wrong.\n\nSo the final answer is \\boxed{4}", "4", "math"),
    ("So the final answer is \\boxed{18", "18", "mawps"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "math500"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math500"),
    ("\\boxed{x = 5}", "5", "math"),
])
def test_right_answers_in_other_forms(output, gold, dataset):
    assert is_correct(output, gold, dataset)


@pytest.mark.parametrize("output,gold,dataset", [
    ("\\boxed{17}", "18", "gsm8k"), ("\\boxed{-3}", "3", "svamp"), ("\\boxed{5,6}", "56", "gsm8k"),
    ("\\boxed{x^2}", "2", "math"), ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math500"),
    ("\\boxed{4} then \\boxed{3}", "4", "math"), ("no number here", "5", "math"), ("", "5", "gsm8k"),
    ("\\boxed{\\frac{1}{3}}", "0.33", "math"),
])
def test_wrong_answers_grade_wrong(output, gold, dataset):
    assert not is_correct(output, gold, dataset)


def test_unfinished_outputs_are_wrong():
    assert is_correct("\\boxed{18}", "18", "gsm8k", finished=True)
    assert not is_correct("\\boxed{18}", "18", "gsm8k", finished=False)
    items = load_math("math500", n=5)
    assert not any(is_correct(i.meta["solution"], i.answer, "math500", finished=False) for i in items)


def test_extraction_conventions():
    assert extract_answer("\\boxed{1} and \\boxed{2}") == "2"
    assert extract_answer("work\n#### 1,234") == "1,234"
    assert extract_answer("it is 7 or 8") is None
    assert extract_answer("it is 7 or 8", numeric_fallback=True) == "8"
    assert to_number("\\$1,000.50") == 1000.5 and to_number("x^2") is None and to_number("12 apples") == 12


def test_grading_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(is_correct("\\boxed{\\frac{2}{4}}", "\\frac12", "math")))
    t.start()
    t.join()
    assert out == [True]


def test_theoremqa_answer_types_on_real_items(data_dir):
    items = load_math("theoremqa", path=data_dir / "theoremqa_test.json")
    by = {}
    for i in items:
        by.setdefault(answer_type(i), []).append(i)
    assert all(is_correct(f"\\boxed{{{i.answer}}}", i.answer, "theoremqa") for i in items)
    b = by["bool"][0]
    yes, no = ("yes", "no") if b.answer == "True" else ("no", "yes")
    assert is_correct(f"\\boxed{{{yes}}}", b.answer, "theoremqa")
    assert not is_correct(f"\\boxed{{{no}}}", b.answer, "theoremqa")
    f = next(i for i in by["float"] if abs(float(i.answer)) > 0.1)
    g = float(f.answer)
    assert is_correct(f"\\boxed{{{g * 1.01}}}", f.answer, "theoremqa")
    assert not is_correct(f"\\boxed{{{g * 1.10}}}", f.answer, "theoremqa")
    n = by["integer"][0]
    assert not is_correct(f"\\boxed{{{int(n.answer) + 1}}}", n.answer, "theoremqa")
    lst = by["list of integer"][0]
    vals = lst.answer.strip("[]").split(", ")
    assert is_correct("\\boxed{[" + ", ".join(reversed(vals)) + "]}", lst.answer, "theoremqa")
    assert not is_correct("\\boxed{[" + ", ".join(vals[:-1] + ["999"]) + "]}", lst.answer, "theoremqa")
    assert not is_correct("\\boxed{[" + ", ".join(vals[:-1]) + "]}", lst.answer, "theoremqa") or len(vals) == 1
    o = by["option"][0]
    other = "(a)" if o.answer != "(a)" else "(b)"
    assert is_correct(f"The answer is \\boxed{{{o.answer[1]}}}", o.answer, "theoremqa")
    assert not is_correct(f"\\boxed{{{other}}}", o.answer, "theoremqa")
