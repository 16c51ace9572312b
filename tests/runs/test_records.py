"""kvlib.runs.records names exactly the keys that generation and grading produce."""

from kvlib import GenerationSettings, Prompt, generate, open_store, tiny_model
from kvlib.switching.answers import answer_records
from kvlib.assets.data import MathItem
from kvlib.runs.records import AnswerRecord, GenerationRecord

STORE_KEYS = {"settings_key", "model", "dataset"}  # added by the store when it keeps a record


def test_generation_records_have_the_typed_keys(tmp_path):
    model, tok = tiny_model("qwen2", seed=0)
    settings = GenerationSettings(max_new_tokens=6)
    prompts = [Prompt("a", "1 + 1 ="), Prompt("b", "What is 2 + 2?")]
    recs = generate(model, tok, prompts, open_store(tmp_path, "m", "toy", settings), settings, batch_size=2,
                    progress=False)
    assert GenerationRecord.__optional_keys__ == {"sampled_mask"} | STORE_KEYS
    for r in recs:  # nothing injected: every token sampled, so no sampled_mask
        assert set(r) == GenerationRecord.__required_keys__ | STORE_KEYS
        assert r["finish_reason"] in ("stop", "length") and r["n_tokens"] == len(r["token_ids"])


def test_answer_records_add_the_grading_keys(tmp_path):
    model, tok = tiny_model("qwen2", seed=4)
    items = [MathItem("svamp/0", "Tom has 2 apples and gets 3 more. How many apples?", "5", "svamp")]
    (rec,) = answer_records(model, tok, "m", "svamp", items, mode="fast", max_new_tokens=6, root=tmp_path,
                            batch_size=1, progress=False)
    assert AnswerRecord.__required_keys__ - GenerationRecord.__required_keys__ == {"question", "gold", "mode",
                                                                                   "correct"}
    assert set(rec) == AnswerRecord.__required_keys__ | STORE_KEYS
    assert rec["mode"] == "fast" and rec["gold"] == "5" and isinstance(rec["correct"], bool)
