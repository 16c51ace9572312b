"""Thinking protocols: automatic choice, prompt rendering, clear errors."""

import pytest

from kvlib import protocol_for, render_prompt, tiny_model
from kvlib.switching.thinking import NATIVE, PROMPT, ChatTemplateMissingError


def test_native_form_is_chosen_for_think_tokens():
    _, tok = tiny_model("qwen3")
    assert protocol_for(tok) is NATIVE
    _, plain = tiny_model("qwen2")
    assert protocol_for(plain) is PROMPT
    assert protocol_for(plain, form="native") is NATIVE
    with pytest.raises(ValueError, match="native"):
        protocol_for(plain, form="weird")


def test_native_prompts_open_the_think_block_and_switch_text_is_single_tokens():
    _, tok = tiny_model("qwen3")
    slow = render_prompt(tok, "What is 2+2?", "slow")
    fast = render_prompt(tok, "What is 2+2?", "fast")
    assert slow.endswith("<|im_start|>assistant\n<think>\n")
    assert fast.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think_close = tok.convert_tokens_to_ids("</think>")
    assert think_close in tok(NATIVE.to_fast, add_special_tokens=False).input_ids


def test_prompt_form_puts_the_mode_in_the_instruction():
    _, tok = tiny_model("llama")
    fast = render_prompt(tok, " What is 2+2? ", "fast")
    slow = render_prompt(tok, "What is 2+2?", "slow")
    assert "only the final answer" in fast and "step by step" in slow
    assert fast.endswith("<|im_start|>assistant\n") and "What is 2+2?\n" in fast


def test_missing_chat_template_is_a_clear_error():
    _, tok = tiny_model("llama")
    tok.chat_template = None
    with pytest.raises(ChatTemplateMissingError, match="no chat template"):
        render_prompt(tok, "q", "fast")


def _stream(watch, tok, text):
    """Feed ``text`` token by token to a TextWatch; the matches, by number of tokens so far."""
    ids = tok(text, add_special_tokens=False).input_ids
    return {k: m for k in range(1, len(ids) + 1) if (m := watch.match(ids[:k])) is not None}


def test_text_watch_finds_words_completed_by_the_newest_token():
    from kvlib.switching.thinking import TextWatch

    _, tok = tiny_model("qwen3")
    w = TextWatch(tok, ["Wait", "Alternatively"])
    text = "so 4. Wait, no. Alternatively x Waiting"
    found = _stream(w, tok, text)
    ends = [text.index("Wait") + 4, text.index("Alternatively") + 13, text.rindex("Wait") + 4]
    assert found == {ends[0]: ("Wait", 4), ends[1]: ("Alternatively", 13), ends[2]: ("Wait", 4)}
    assert _stream(w, tok, "Wai t, alternatively") == {}  # split or lower-case words are other text
    with pytest.raises(ValueError, match="non-empty"):
        TextWatch(tok, [""])


def test_protocols_name_their_end_of_thinking():
    from kvlib.switching.thinking import ThinkingProtocol

    assert NATIVE.think_end == "</think>" and NATIVE.think_end in NATIVE.to_fast
    assert PROMPT.think_end == "\\boxed{" and PROMPT.to_fast.endswith(PROMPT.think_end)
    with pytest.raises(ValueError, match="think_end"):
        ThinkingProtocol("prompt", "a", "b", "", "", "x", "y", "")


def test_thinking_watch_follows_only_thinking_rows_and_stays_closed():
    from types import SimpleNamespace

    from kvlib.switching.thinking import ThinkingWatch

    _, tok = tiny_model("qwen2")  # prompt form: the end of thinking is the model's own \boxed{
    w = ThinkingWatch(tok, PROMPT, [True, False, True])
    texts = ["so x = 4, \\boxed{4}", "\\boxed{4} then more", "no box here at all"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    for k in range(1, max(map(len, ids)) + 1):
        w.update(SimpleNamespace(tokens=[x[:k] for x in ids], done=[k > len(x) for x in ids], step=k - 1))
    assert w.closed == [True, False, False]  # row 1 is not thinking (a fast row): not watched
    assert w.closed_at[0] == len("so x = 4, \\boxed{")
    w.set_thinking(1, True)
    again = SimpleNamespace(tokens=[ids[0], ids[1] + tok("\\boxed{", add_special_tokens=False).input_ids[-1:], ids[2]],
                            done=[False] * 3, step=100)
    assert w.update(again) == [True, False, False]  # only a marker *completed* by the newest token counts
