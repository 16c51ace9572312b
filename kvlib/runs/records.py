"""The keys of the records that pass between modules: a generation record and a graded answer.

Records stay plain dicts (one JSON line each in a :class:`kvlib.runs.store.ResultStore`); these ``TypedDict`` s only
name their keys and types for readers and type checkers. Nothing checks them at run time, and a record may
carry more keys than listed: each extractor adds arrays, and the controlled runs add their own fields
(:func:`kvlib.switching.early_exit.early_exit_generate`, :func:`kvlib.switching.early_exit.budget_generate`,
:func:`kvlib.switching.kv_switch.adaptive_generate` say which).

* :class:`GenerationRecord`: what :func:`kvlib.runs.generation.generate` stores and returns per item.
* :class:`AnswerRecord`: a generation record graded by :func:`kvlib.switching.answers.answer_records`.

Read back from a store, tuples have become lists (``switches`` holds ``[step, label]`` pairs).
"""

# no `from __future__ import annotations` here: TypedDict reads NotRequired only from evaluated annotations
from typing import Any, Literal, NotRequired, TypedDict

__all__ = ["GenerationRecord", "AnswerRecord"]


class GenerationRecord(TypedDict):
    """One generated item (see :mod:`kvlib.runs.generation`)."""

    item_id: str
    prompt: str  # the fully rendered prompt text
    input_sha256: str  # hash of the prompt (kvlib.runs.generation.prompt_hash), checked when the store is reused
    output: str  # the decoded answer, special tokens left out
    token_ids: list[int]  # every generated token, injected text included
    n_tokens: int  # len(token_ids)
    finish_reason: Literal["stop", "length"]
    max_prob: list[float]  # per sampled token: the largest next-token probability
    entropy: list[float]  # per sampled token: the next-token entropy (base 2)
    switches: list[tuple[int, str]]  # (step, what the controller did), e.g. (3, "early_exit"); [] without one
    seconds: float  # generation wall time per item (the batch's time over its items), extractors excluded
    extract_seconds: dict[str, float]  # per extractor name: its wall time per item
    # per array name: a kvlib.runs.store.StoredArray handle (or base64 .npy text in a record not yet stored); read
    # with kvlib.runs.generation.record_array
    arrays: dict[str, Any]
    # per generated token: True when the model chose it, False when injected; stored only when text was injected
    sampled_mask: NotRequired[list[bool]]
    # added by the store when it keeps the record: the run's key, the model folder and the data set name
    settings_key: NotRequired[str]
    model: NotRequired[str]
    dataset: NotRequired[str]


class AnswerRecord(GenerationRecord):
    """A graded answer (:func:`kvlib.switching.answers.answer_records`); grading happens on reading, never stored."""

    question: str
    gold: str  # the reference answer
    mode: Literal["fast", "slow"]  # the thinking mode of the prompt (kvlib.switching.thinking.Mode)
    correct: bool  # graded with kvlib.assets.grading.is_correct; an unfinished answer (finish_reason "length") is wrong
