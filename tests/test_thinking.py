"""Thinking protocols: automatic choice, prompt rendering, clear errors."""

import pytest

from kvlib import protocol_for, render_prompt, tiny_model
from kvlib.thinking import NATIVE, PROMPT, ChatTemplateMissingError


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
