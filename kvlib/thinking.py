"""Thinking protocols: how a model is asked to think fast or slow, and how to switch mid-answer.

Two forms:

* ``native`` for models with real ``<think>`` tokens (Qwen3, DeepSeek-R1 distills): slow = the
  assistant turn opens ``<think>\\n``; fast = it opens with an empty think block
  ``<think>\\n\\n</think>\\n\\n`` (what Qwen3's template writes for ``enable_thinking=False``);
  switch to fast = inject ``\\n</think>\\n\\n``; switch to slow = inject ``<think>\\n``.
* ``prompt`` for plain instruct models: the mode is an instruction in the user turn
  (fast: reply with only the final answer in ``\\boxed{}``; slow: reason step by step, then
  ``\\boxed{}``); switch to fast = inject a short final-answer lead-in; switch to slow = inject a
  short step-by-step lead-in.

:func:`protocol_for` picks the form from the tokenizer (a ``</think>`` special token means native).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ThinkingProtocol", "protocol_for", "render_prompt", "ChatTemplateMissingError"]

Mode = Literal["fast", "slow"]


class ChatTemplateMissingError(ValueError):
    """The tokenizer has no chat template, so prompts cannot be rendered the way the model expects."""


@dataclass(frozen=True)
class ThinkingProtocol:
    """How to ask for each mode and how to switch between them.

    Attributes:
        form: ``"native"`` or ``"prompt"``.
        fast_instruction / slow_instruction: text appended to the question in the user turn.
        fast_prefix / slow_prefix: text that opens the assistant turn.
        to_fast / to_slow: control text injected to switch mode mid-generation.
    """

    form: Literal["native", "prompt"]
    fast_instruction: str
    slow_instruction: str
    fast_prefix: str
    slow_prefix: str
    to_fast: str
    to_slow: str

    def instruction(self, mode: Mode) -> str:
        return {"fast": self.fast_instruction, "slow": self.slow_instruction}[mode]

    def prefix(self, mode: Mode) -> str:
        return {"fast": self.fast_prefix, "slow": self.slow_prefix}[mode]

    def switch_text(self, to: Mode) -> str:
        return {"fast": self.to_fast, "slow": self.to_slow}[to]


NATIVE = ThinkingProtocol(
    form="native",
    fast_instruction="Please put your final answer within \\boxed{}.",
    slow_instruction="Please reason step by step, and put your final answer within \\boxed{}.",
    fast_prefix="<think>\n\n</think>\n\n",
    slow_prefix="<think>\n",
    to_fast="\n</think>\n\n",
    to_slow="<think>\n",
)

PROMPT = ThinkingProtocol(
    form="prompt",
    fast_instruction="Reply with only the final answer in \\boxed{}, without any explanation.",
    slow_instruction="Please reason step by step, and put your final answer within \\boxed{}.",
    fast_prefix="",
    slow_prefix="",
    to_fast="\n\nSo the final answer is \\boxed{",
    to_slow="\n\nLet me think step by step.\n",
)


def protocol_for(tokenizer, form: str | None = None) -> ThinkingProtocol:
    """The protocol for ``tokenizer``: native if it has a ``</think>`` special token, else prompt.

    Args:
        form: ``"native"`` or ``"prompt"`` to override the automatic choice.
    """
    if form is not None:
        if form not in ("native", "prompt"):
            raise ValueError(f"form must be 'native' or 'prompt', not {form!r}")
        return NATIVE if form == "native" else PROMPT
    vocab = tokenizer.get_vocab()
    specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
    }
    return NATIVE if "</think>" in vocab and "</think>" in specials else PROMPT


def render_prompt(tokenizer, question: str, mode: Mode, protocol: ThinkingProtocol | None = None) -> str:
    """The full prompt text for ``question`` in ``mode``: chat template + assistant-turn prefix.

    Raises:
        ChatTemplateMissingError: when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissingError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; load an instruct/chat "
            "model, or set tokenizer.chat_template to a Jinja template before rendering prompts"
        )
    protocol = protocol or protocol_for(tokenizer)
    messages = [{"role": "user", "content": f"{question.strip()}\n{protocol.instruction(mode)}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if protocol.form == "native":
        # Some templates (Qwen3 with enable_thinking=False) already open the think block.
        for opening in (NATIVE.fast_prefix, NATIVE.slow_prefix):
            if text.endswith(opening):
                text = text[: -len(opening)]
                break
    return text + protocol.prefix(mode)
