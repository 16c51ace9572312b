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

**A row whose model ended its thinking itself gets no injected text.** Each protocol names its
end-of-thinking marker (``think_end``): the ``</think>`` token for the native form, the start of the
boxed final answer (``\\boxed{``) for the prompt form. :class:`ThinkingWatch` follows, for every row of a
decoding batch, the tokens the model samples while the row is thinking (slow prompt, or after a switch to
slow) and marks the row *closed* once the model has written the marker; every controller
(:mod:`kvlib.switching.kv_switch`, :mod:`kvlib.switching.early_exit`) consults it and never injects into a closed row. A
marker that is a single vocabulary token is matched by its id (so a character-by-character spelling of
``</think>`` does not count); any other marker is matched on the decoded text (:class:`TextWatch`), which
may span or split tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = ["ThinkingProtocol", "protocol_for", "render_prompt", "ChatTemplateMissingError", "TextWatch",
           "ThinkingWatch"]

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
        think_end: what the model writes when it ends its thinking itself (no text is injected after it).
    """

    form: Literal["native", "prompt"]
    fast_instruction: str
    slow_instruction: str
    fast_prefix: str
    slow_prefix: str
    to_fast: str
    to_slow: str
    think_end: str

    def __post_init__(self):
        if self.form not in ("native", "prompt"):
            raise ValueError(f"form must be 'native' or 'prompt', not {self.form!r}")
        if not self.think_end:
            raise ValueError("think_end must be the non-empty text that ends the thinking (e.g. '</think>')")

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
    think_end="</think>",
)

PROMPT = ThinkingProtocol(
    form="prompt",
    fast_instruction="Reply with only the final answer in \\boxed{}, without any explanation.",
    slow_instruction="Please reason step by step, and put your final answer within \\boxed{}.",
    fast_prefix="",
    slow_prefix="",
    to_fast="\n\nSo the final answer is \\boxed{",
    to_slow="\n\nLet me think step by step.\n",
    think_end="\\boxed{",
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


class TextWatch:
    """Finds, one appended token at a time, where one of ``texts`` is completed in a token stream.

    A text may span several tokens and start or end inside one (``" Wait"``, ``"\\n\\nWait"``, or four
    tokens of a character-level tokenizer). :meth:`match` decodes only the last few tokens, so a check
    costs the same at any sequence length, and first tests whether the newest token can end a text at
    all (its last character), so most steps decode nothing.
    """

    def __init__(self, tokenizer, texts: Sequence[str]):
        texts = tuple(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError(f"texts must be non-empty strings, got {texts!r}")
        self.tok, self.texts = tokenizer, texts
        self._ends = {t[-1] for t in texts}
        self._longest = max(len(t) for t in texts)
        self._piece: dict[int, str] = {}

    def piece(self, token: int) -> str:
        """The decoded text of one token (cached)."""
        if token not in self._piece:
            self._piece[token] = self.tok.decode([token])
        return self._piece[token]

    def match(self, tokens: Sequence[int]) -> tuple[str, int] | None:
        """``(text, n)`` when ``tokens[-1]`` completes ``text``, which starts in ``tokens[-n]``; else ``None``.

        Args:
            tokens: the generated token ids so far (the newest last).
        """
        if not tokens:
            return None
        last = self.piece(tokens[-1])
        if not any(c in last for c in self._ends) and all(c.isascii() for c in self._ends):
            return None
        n = min(len(tokens), self._longest + 1)
        while True:  # widen until the window holds the longest text before the newest token
            text = self.tok.decode(list(tokens[-n:]))
            if len(text) >= self._longest + len(last) or n == len(tokens):
                break
            n = min(len(tokens), 2 * n)
        before = self.tok.decode(list(tokens[-n:-1])) if n > 1 else ""
        boundary = len(before) if text.startswith(before) else max(0, len(text) - len(last))
        found = [(text.rfind(t), t) for t in self.texts]
        found = [(i, t) for i, t in found if i >= 0 and i + len(t) > boundary]
        if not found:
            return None
        start, hit = max(found)  # the latest occurrence
        for k in range(1, n + 1):  # the token in which it starts
            if len(self.tok.decode(list(tokens[-k:]))) >= len(text) - start:
                return hit, k
        return hit, n


class ThinkingWatch:
    """Per row of a decoding batch: whether the model has ended its thinking itself.

    Call :meth:`update` once per decoding step, before deciding any injection (calling it again in the
    same step does nothing). Only rows that are thinking are watched; a controller that switches a row
    tells the watch with :meth:`set_thinking`. A closed row stays closed.

    Args:
        tokenizer: the model's tokenizer.
        protocol: gives the end-of-thinking marker (``protocol.think_end``).
        thinking: per row, whether it starts inside its thinking (the slow prompt).

    Attributes:
        closed: per row, True once the model wrote the marker while thinking.
        closed_at: per row, the number of appended tokens (marker included) when it closed, else ``None``.
    """

    def __init__(self, tokenizer, protocol: ThinkingProtocol, thinking: Sequence[bool]):
        ids = tokenizer(protocol.think_end, add_special_tokens=False).input_ids
        self.end_id = ids[0] if len(ids) == 1 else None
        self.text = None if self.end_id is not None else TextWatch(tokenizer, [protocol.think_end])
        self.thinking = [bool(t) for t in thinking]
        self.closed = [False] * len(self.thinking)
        self.closed_at: list[int | None] = [None] * len(self.thinking)
        self._seen = [-1] * len(self.thinking)

    def set_thinking(self, row: int, thinking: bool) -> None:
        """A controller switched ``row`` into (True) or out of (False) its thinking."""
        self.thinking[row] = bool(thinking)

    def update(self, state) -> list[bool]:
        """Look at the token each running row has just sampled; return :attr:`closed`.

        Args:
            state: the :class:`kvlib.core.decoding.DecodeState` a controller receives (``tokens``, ``done``, ``step``).
        """
        for i, toks in enumerate(state.tokens):
            if state.done[i] or self.closed[i] or not self.thinking[i] or self._seen[i] >= state.step or not toks:
                continue
            self._seen[i] = state.step
            hit = toks[-1] == self.end_id if self.end_id is not None else self.text.match(toks) is not None
            if hit:
                self.closed[i], self.closed_at[i] = True, len(toks)
        return self.closed
