"""Graded fast and slow answers, generated once and shared by every experiment that needs them.

The self-evaluation table (03) and the switching tables (04, 05) both need the model's slow
answers to the same test questions; the switching experiment also needs fast answers and the
difficulty features of every prompt. :func:`answer_records` generates each ``(model, set, mode)``
once through the resumable store, with every extractor any experiment reads:

* ``kv``: per generated token, layer-averaged cached keys and values (``traj_keys``, ``traj_values``);
* ``prompt_kv``: pooled prompt KV sums for the difficulty classifier.

Both read the cache generation already holds. The original (hidden-state) CoE needs a re-forward; it
is a separate pass over the answers that need it (:func:`kvlib.selfeval.coe.hidden_coe_pass`), so training
answers never pay for it.

Grading happens when records are read (never stored), so a grading fix needs no regeneration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .difficulty import prompt_kv_extractor
from ..runs.generation import GenerationSettings, Prompt, generate, open_store
from ..assets.grading import is_correct
from ..core.pooling import kv_trajectory_extractor
from ..runs.records import AnswerRecord
from ..runs.store import default_store_dir
from .thinking import Mode, ThinkingProtocol, protocol_for, render_prompt

__all__ = ["answer_records", "answer_extractors", "answer_settings"]



def answer_extractors() -> dict:
    """The extractors stored with every answer: the KV trajectory (KV-CoE) and the prompt's difficulty features."""
    return {"kv": kv_trajectory_extractor(), "prompt_kv": prompt_kv_extractor()}


def answer_settings(mode: Mode, max_new_tokens: int) -> GenerationSettings:
    """Greedy settings of an answer run (the mode is part of the data set name in the store)."""
    if mode not in ("fast", "slow"):
        raise ValueError(f"mode must be 'fast' or 'slow', not {mode!r}")
    return GenerationSettings(max_new_tokens=max_new_tokens)


def answer_records(
    model,
    tokenizer,
    model_name: str,
    dataset: str,
    items: Sequence,
    mode: Mode,
    max_new_tokens: int,
    root: str | Path | None = None,
    batch_size: int = 16,
    protocol: ThinkingProtocol | None = None,
    progress: bool = True,
) -> list[AnswerRecord]:
    """Graded ``mode`` answers of ``model`` to ``items`` (``kvlib.assets.data.MathItem``), in item order.

    Each record is a store record (see :mod:`kvlib.runs.generation`) plus ``question``, ``gold``,
    ``correct`` (graded with :func:`kvlib.assets.grading.is_correct`; an unfinished answer is wrong) and ``mode``:
    :class:`kvlib.runs.records.AnswerRecord`.
    """
    protocol = protocol or protocol_for(tokenizer)
    settings = answer_settings(mode, max_new_tokens)
    extractors = answer_extractors()
    prompts = [Prompt(it.id, render_prompt(tokenizer, it.question, mode, protocol)) for it in items]
    with open_store(root or default_store_dir(), model_name, f"{dataset}-{mode}-{protocol.form}", settings,
                    extractors, model=model, tokenizer=tokenizer) as store:
        records = generate(model, tokenizer, prompts, store, settings, batch_size=batch_size,
                           extractors=extractors, progress=progress, desc=f"{dataset} {mode}")
    out = []
    for it, rec in zip(items, records):
        finished = rec["finish_reason"] == "stop"
        out.append({**rec, "question": it.question, "gold": it.answer, "mode": mode,
                    "correct": bool(is_correct(rec["output"], it.answer, it.dataset, finished=finished))})
    return out
