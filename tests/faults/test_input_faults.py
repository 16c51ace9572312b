"""Findings 4, 6 and 10: damaged TheoremQA files, a batch size below 1, and what batch-size invariance means."""

import json

import pytest

from kvlib.assets.data import DataFileError, load_math

GOOD = {"Question": "What is 2 + 2?", "Answer": 4, "Answer_type": "integer", "Picture": None}


@pytest.mark.parametrize("content, says", [
    (json.dumps([GOOD, GOOD])[:40].encode(), r"not valid JSON at line 1, column \d+: .*\(it ends early: truncated\?\)"),
    (json.dumps([{"question": "q", "answer": 1, "type": "integer"}]).encode(),
     r"row 0: no field Question, Answer, Answer_type \(it has answer, question, type\)"),
    (b"", r"is empty"),
    (b"   \n", r"is empty"),
    (json.dumps([GOOD]).encode().replace(b"What", b"Wh\xe9t"), r"not UTF-8 text \(byte \d+ is 0xe9\)"),
    (json.dumps({"0": GOOD}).encode(), r"a JSON dict, not a list of questions"),
    (json.dumps([]).encode(), r"an empty list"),
    (json.dumps([{**GOOD, "Answer": None}]).encode(), r"row 0: Answer is None \(null or not text\)"),
    (json.dumps([GOOD, {**GOOD, "Answer": "four"}]).encode(), r"row 1: Answer 'four' is not a integer"),
    (json.dumps([7]).encode(), r"row 0: a JSON int, not an object"),
], ids=["truncated", "wrong-fields", "empty", "blank", "non-utf8", "object", "empty-list", "null-answer",
        "answer-of-another-type", "not-an-object"])
def test_f04_a_damaged_theoremqa_file_names_the_file_and_what_is_wrong(tmp_path, content, says):
    path = tmp_path / "theoremqa_test.json"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=says) as err:
        load_math("theoremqa", path=path)
    assert str(path) in str(err.value) and "DATA_DIR" in str(err.value)


def test_f04_a_good_theoremqa_file_still_loads(tmp_path):
    path = tmp_path / "theoremqa_test.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "Answer": [1, 2], "Answer_type": "list of integer"}]))
    assert [it.answer for it in load_math("theoremqa", path=path)] == ["4", "[1, 2]"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_f06_a_batch_size_below_one_is_a_clear_error(bad):
    from dataclasses import replace

    from kvlib.profiles import PROFILES

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        replace(PROFILES["smoke"], batch_size=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1024"])
def test_f06_a_set_budget_below_one_is_a_clear_error(bad):
    from dataclasses import replace

    from kvlib.experiments.switching import SwitchingPlan
    from kvlib.profiles import PROFILES

    with pytest.raises(ValueError, match="set_tokens must map sets to positive token budgets"):
        replace(PROFILES["smoke"], set_tokens={"math500": bad})
    with pytest.raises(ValueError, match="set_tokens must map sets to positive token budgets"):
        SwitchingPlan(train_sets={"svamp": 4}, test_sets={"math500": 4}, set_tokens={"math500": bad})


@pytest.mark.parametrize("bad", [0, -1])
def test_f06_generate_refuses_a_batch_size_below_one_before_any_work(tmp_path, bad):
    from kvlib import GenerationSettings, Prompt, generate, open_store, tiny_model

    model, tok = tiny_model("qwen2", seed=3)
    store = open_store(tmp_path, "tiny", "d", GenerationSettings(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, not -?\d"):
        generate(model, tok, [Prompt("a", "hi")], store, GenerationSettings(max_new_tokens=2), batch_size=bad,
                 progress=False)
    assert store.path is None or not store.path.exists() or len(store) == 0


def test_f10_where_batch_size_invariance_is_claimed_its_limit_is_stated():
    from kvlib.runs.generation import GenerationSettings

    doc = " ".join(GenerationSettings.__doc__.split())
    assert "batch_size" in doc and "2e-4 relative" in doc and "tokens do not depend on it" in doc
