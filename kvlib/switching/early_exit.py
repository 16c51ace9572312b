"""Baselines that stop slow thinking without a difficulty classifier: DEER-style early exit and token budgets.

Both run live, in the same decoding loop as the KV controllers (:mod:`kvlib.switching.kv_switch`), on the slow prompt,
and neither injects anything into a row whose model has ended its thinking itself
(:class:`kvlib.switching.thinking.ThinkingWatch`: ``</think>``, or the prompt form's ``\\boxed{``).

**DEER-style early exit** (Yang et al. 2025, "Dynamic Early Exit in Reasoning Models"), step by step as
DEER's public vLLM code does it, and how each step maps here:

1. *Stop at a thinking transition word* (``"Wait"``; ``"Alternatively"`` as an option: ``words``), at
   ``</think>`` or at EOS. Here the loop decodes on; a word is noticed when the token that completes it is
   sampled (:class:`kvlib.switching.thinking.TextWatch`, so ``" Wait"`` or a word split over tokens counts). At the
   model's own ``</think>`` (or the prompt form's ``\\boxed{``) the thinking has ended: no trial, no
   injection, the answer follows, as in DEER's code; an EOS ends the item.
2. *Trial*: the answer-inducing text ``\\n**Final Answer**\\n\\boxed`` is appended *inside* the thinking,
   right before the word (DEER cuts the text at the word), and at most ``trial_tokens`` (20) tokens are
   decoded. Here the trial runs on the live cache of every row that stopped at this step at once; the
   word's tokens already in the cache are masked out and the trial's positions start where the word
   started. The trial stops at ``</think>`` for the native form (DEER's Qwen3 variant) or when the
   ``\\boxed{`` brace closes for the prompt form (DEER's variant for other models), or at EOS.
3. *Confidence* (:func:`trial_confidence`) over the trial's token probabilities from its second token on:
   geometric mean (``avg2``), arithmetic mean (``avg1``) or minimum (``min``). With ``require_close``
   (default: the native form, as DEER's Qwen3 variant) a trial that does not end with the closing marker
   scores 0.
4. *Decision*: confidence ``>= threshold`` (0.95) ends the thinking: the word's tokens are withdrawn and
   the switch-to-fast text (``\\n</think>\\n\\n`` for the native form, exactly DEER's) is injected; the
   answer is generated with the remaining budget. Otherwise the trial is dropped (its cache positions are
   cropped, :func:`kvlib.core.cache.crop_cache`; the loop's attention mask and tokens are never touched) and the
   thinking continues with the model's own "Wait", as DEER appends it back.
5. At most ``max_trials`` (10) trials per item; the thinking is capped at ``think_ratio`` (0.9) of the
   budget, where the switch-to-fast text is forced (label ``think_cap``).

Invariant (tested): trials never touch the decoded sequence and nothing is inserted (the "Wait" DEER
appends back is the model's own, left in place). So with the cap off (``think_ratio=1``) a run whose
trials all fail is token for token the plain run (same cache entries too); with the cap on it is the plain
run up to the cap, where the answer is forced.

Deviations from DEER's code, and why:

* Trials decode greedily and a trial token's probability is its max probability (DEER's Qwen3 script
  samples trials at vLLM's default temperature 1, its temperature line being commented out): greedy keeps
  runs deterministic and batch-independent, and leaves each row's sampling stream untouched.
* Whole tokens are withdrawn at an exit: a token such as ``" Wait"`` or ``"\\n\\nWait"`` takes its leading
  whitespace along, where DEER cuts the text exactly before the word and re-tokenises it.
* ``>=`` instead of DEER's ``>`` at the threshold; a trial of fewer than two tokens scores 0 (DEER divides
  by zero there); ``avg2`` is the default for both forms (DEER's script for non-Qwen3 models uses ``avg1``).
* Not done: DEER's exit at a trial once the thinking is within 50 tokens of its cap, and its second forcing
  of ``\\boxed`` (100 extra tokens) when an answer ends without EOS: the cap forces the answer and the run
  has one budget. An EOS inside the thinking ends the item (DEER runs a trial there).
* Prompt form (no ``<think>`` tokens, e.g. the embedded Qwen2.5-Coder models): the "thinking" is the
  step-by-step text, its end is the model's own ``\\boxed{``, a trial ends when that brace closes (DEER's
  stop strings for non-Qwen3 models all close it) and an exit injects the protocol's final-answer lead-in.
  Trials fire only where such a model writes a transition word; without any, the run is the slow answer
  with the thinking cap.

Accounting: every token of the answer is in ``n_tokens``; trials are overhead and each record stores
``trial_tokens`` (answer-inducing text + trial tokens, summed over trials), ``withdrawn_tokens`` (the
transition-word tokens sampled and then withdrawn at an exit) and every trial as
``(thinking tokens before the word, confidence, trial tokens)``.

**Token budget**: after ``budget`` appended tokens the switch-to-fast text is injected and the item may write
``answer_tokens`` (:class:`BudgetConfig`, default 64: a short summary and a boxed answer) more tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from .kv_switch import ControllerSpec, RunContext, as_questions, controlled_generate
from ..core.cache import crop_cache, step_logits
from ..core.decoding import DecodeConfig, DecodeState, stop_ids
from ..runs.generation import GenerationSettings, Prompt, record_array
from .thinking import TextWatch, ThinkingProtocol, ThinkingWatch, protocol_for, render_prompt

__all__ = ["EarlyExitConfig", "EarlyExitController", "early_exit_generate", "trial_confidence", "BudgetConfig",
           "BudgetController", "budget_generate", "early_exit_spec", "budget_spec", "budget_settings", "slow_prompts"]

Policy = Literal["avg2", "avg1", "min"]


def trial_confidence(probs: Sequence[float], policy: Policy = "avg2") -> float:
    """DEER's answer confidence from a trial's token probabilities ``[n]``, read from the second token on.

    ``avg2``: geometric mean (probabilities floored at 1e-10); ``avg1``: arithmetic mean; ``min``: minimum.
    Fewer than two tokens: 0.
    """
    p = [float(x) for x in probs[1:]]
    if not p:
        return 0.0
    if policy == "avg2":
        return math.exp(sum(math.log(max(x, 1e-10)) for x in p) / len(p))
    if policy == "avg1":
        return sum(p) / len(p)
    if policy == "min":
        return min(p)
    raise ValueError(f"policy must be 'avg2', 'avg1' or 'min', not {policy!r}")


@dataclass(frozen=True)
class EarlyExitConfig:
    """DEER-style early exit (defaults: DEER's).

    Attributes:
        threshold: confidence that ends the thinking.
        words: thinking transition words that trigger a trial (DEER: ``("Wait",)`` or ``("Alternatively",)``).
        answer_inducing: text appended inside the thinking to induce a trial answer.
        trial_tokens: most tokens decoded per trial.
        policy: confidence policy (:func:`trial_confidence`).
        max_trials: most trials per item.
        think_ratio: the thinking is capped at this share of the run's ``max_new_tokens``.
        require_close: a trial that does not end with the closing marker scores 0; ``None``: for the native
            form (DEER's Qwen3 variant), not for the prompt form.
        min_gap: fewest appended tokens between two trials of an item, and before the first (DEER: 1).
    """

    threshold: float = 0.95
    words: tuple[str, ...] = ("Wait",)
    answer_inducing: str = "\n**Final Answer**\n\\boxed"
    trial_tokens: int = 20
    policy: Policy = "avg2"
    max_trials: int = 10
    think_ratio: float = 0.9
    require_close: bool | None = None
    min_gap: int = 1

    def __post_init__(self):
        object.__setattr__(self, "words", (self.words,) if isinstance(self.words, str) else tuple(self.words))
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        if not self.words or not all(isinstance(w, str) and w for w in self.words):
            raise ValueError(f"words must be non-empty strings such as ('Wait',), not {self.words!r}")
        if not self.answer_inducing:
            raise ValueError("answer_inducing must be a non-empty text, e.g. '\\n**Final Answer**\\n\\\\boxed'")
        if self.trial_tokens < 2:
            raise ValueError("trial_tokens must be >= 2: the confidence is read from the trial's second token on")
        if self.policy not in ("avg2", "avg1", "min"):
            raise ValueError(f"policy must be 'avg2', 'avg1' or 'min', not {self.policy!r}")
        if self.max_trials < 0 or self.min_gap < 1:
            raise ValueError("need max_trials >= 0 and min_gap >= 1")
        if not 0 < self.think_ratio <= 1:
            raise ValueError("think_ratio must be in (0, 1]")


class EarlyExitController:
    """DEER-style trials at transition words; ends the thinking when one is confident (see the module docstring).

    Args:
        tokenizer, protocol: the model's tokenizer and thinking protocol.
        config: see :class:`EarlyExitConfig`.
        n_rows: batch size.
        stop_ids: token ids that end a trial (the model's EOS).
        max_new_tokens: the run's budget, for the thinking cap (``None``: no cap).
    """

    def __init__(self, tokenizer, protocol: ThinkingProtocol, config: EarlyExitConfig, n_rows: int,
                 stop_ids: set[int], max_new_tokens: int | None = None):
        self.tok, self.config, self.stop = tokenizer, config, set(stop_ids)
        ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.native = protocol.form == "native"
        self.require_close = self.native if config.require_close is None else config.require_close
        self.to_fast, self.inducing = ids(protocol.to_fast), ids(config.answer_inducing)
        self.words = TextWatch(tokenizer, config.words)
        self.watch = ThinkingWatch(tokenizer, protocol, [True] * n_rows)
        self.end_marker = TextWatch(tokenizer, [protocol.think_end])
        self.cap = max(1, int(config.think_ratio * max_new_tokens)) if max_new_tokens else None
        self.last = [0] * n_rows
        self.exited = [False] * n_rows
        self.withdrawn = [0] * n_rows
        self.trials: list[list[tuple[int, float, int]]] = [[] for _ in range(n_rows)]

    def __call__(self, state: DecodeState) -> dict[int, tuple]:
        closed = self.watch.update(state)
        out: dict[int, tuple] = {}
        due: list[tuple[int, int]] = []  # (row, tokens spanned by the transition word)
        for i in range(len(self.exited)):
            if state.done[i] or self.exited[i] or closed[i]:
                continue
            n = len(state.tokens[i])
            if self.cap is not None and n >= self.cap:
                out[i] = self._exit(i, (self.to_fast, "think_cap"))
            elif len(self.trials[i]) < self.config.max_trials and n - self.last[i] >= self.config.min_gap:
                hit = self.words.match(state.tokens[i])
                if hit is not None:
                    due.append((i, hit[1]))
        if due:
            for (i, span), (conf, spent) in zip(due, self._trial(state, due)):
                n = len(state.tokens[i])
                self.last[i] = n
                self.trials[i].append((n - span, conf, spent))
                if conf >= self.config.threshold:
                    self.withdrawn[i] += span
                    out[i] = self._exit(i, (self.to_fast, "early_exit", span))
        return out

    def _exit(self, i: int, action: tuple) -> tuple:
        self.exited[i] = True
        self.watch.set_thinking(i, False)
        return action

    def _closes(self, tokens: list[int]) -> bool:
        """Whether a trial's tokens end with its closing marker (``</think>``, or the ``\\boxed{`` brace)."""
        if self.native:  # the marker token itself when it is one token (its spelled-out text does not count)
            if self.watch.end_id is not None:
                return bool(tokens) and tokens[-1] == self.watch.end_id
            return self.end_marker.match(tokens) is not None
        depth = 0
        for ch in self.tok.decode(tokens):
            depth += (ch == "{") - (ch == "}")
            if ch == "}" and depth <= 0:
                return True
        return False

    @torch.inference_mode()
    def _trial(self, state: DecodeState, due: list[tuple[int, int]]) -> list[tuple[float, int]]:
        """Batched trials for ``due`` rows, placed before each row's word; ``(confidence, tokens)`` per row."""
        model, cache, mask0 = state.model, state.cache, state.attention_mask
        batch, base = mask0.shape  # cache rows (finished rows may have left)
        dev, width = mask0.device, len(self.inducing)
        chunk = torch.zeros((batch, width), dtype=torch.long, device=dev)
        live = torch.zeros((batch, width), dtype=torch.long, device=dev)
        pos = mask0.sum(-1, keepdim=True).expand(batch, width).clone()  # next position id of each row
        mask = mask0.clone()
        phys = {}
        for i, span in due:
            p = phys[i] = state.cache_row(i)
            fed = state.slots[i][len(state.slots[i]) - (span - 1):] if span > 1 else []  # the word's fed tokens
            mask[p, fed] = 0
            chunk[p] = torch.tensor(self.inducing, device=dev)
            live[p] = 1
            pos[p] += torch.arange(width, device=dev) - len(fed)
        mask = torch.cat([mask, live], dim=1)
        toks = {i: [] for i, _ in due}
        probs = {i: [] for i, _ in due}
        running = set(toks)
        try:
            for _ in range(self.config.trial_tokens):
                logits, cache = step_logits(model, chunk, mask, pos, cache)
                mp, nxt = torch.softmax(logits, dim=-1).max(-1)
                mp, nxt = mp.tolist(), nxt.tolist()
                for i in sorted(running):
                    toks[i].append(nxt[phys[i]])
                    probs[i].append(mp[phys[i]])
                    if nxt[phys[i]] in self.stop or self._closes(toks[i]):
                        running.discard(i)
                if not running:
                    break
                alive = {phys[i] for i in running}
                chunk = torch.tensor([[t] for t in nxt], device=dev)
                pos = pos[:, -1:] + 1
                mask = torch.cat([mask, torch.tensor([[int(p in alive)] for p in range(batch)], device=dev)], dim=1)
        finally:
            crop_cache(cache, base)
            if cache is not state.cache:
                crop_cache(state.cache, base)
        results = []
        for i, _ in due:
            conf = trial_confidence(probs[i], self.config.policy)
            if self.require_close and not self._closes(toks[i]):
                conf = 0.0
            results.append((conf, width + len(toks[i])))
        return results

    def arrays(self, row: int) -> dict[str, np.ndarray]:
        t = np.asarray(self.trials[row], dtype=np.float32).reshape(-1, 3)
        return {"early_exit_trials": t, "trial_tokens": np.asarray([int(t[:, 2].sum())], np.int64),
                "withdrawn_tokens": np.asarray([self.withdrawn[row]], np.int64)}


@dataclass(frozen=True)
class BudgetConfig:
    """Token-budget baseline: think at most ``budget`` tokens, then answer in at most ``answer_tokens`` more."""

    budget: int
    answer_tokens: int = 64

    def __post_init__(self):
        if self.budget < 1 or self.answer_tokens < 1:
            raise ValueError("budget and answer_tokens must be >= 1")


class BudgetController:
    """Injects the switch-to-fast text once a still-thinking item has ``budget`` appended tokens (a forced answer).

    ``watch``: rows whose model closed its thinking itself are left alone (``None``: nobody watches).
    """

    def __init__(self, to_fast: list[int], budget: int, n_rows: int, watch: ThinkingWatch | None = None):
        self.to_fast, self.budget, self.watch = to_fast, budget, watch
        self.fired = [False] * n_rows

    def __call__(self, state: DecodeState) -> dict[int, tuple[list[int], str]]:
        closed = self.watch.update(state) if self.watch is not None else [False] * len(self.fired)
        out = {}
        for i, fired in enumerate(self.fired):
            if not fired and not closed[i] and not state.done[i] and len(state.tokens[i]) >= self.budget:
                self.fired[i] = True
                if self.watch is not None:
                    self.watch.set_thinking(i, False)
                out[i] = (self.to_fast, f"budget_{self.budget}")
        return out

    def arrays(self, row: int) -> dict[str, np.ndarray]:
        at = self.budget if self.fired[row] else (self.watch.closed_at[row] if self.watch is not None else None)
        return {"budget_forced": np.asarray([int(self.fired[row])], np.int8),
                "thinking_tokens": np.asarray([-1 if at is None else at], np.int64)}


def early_exit_spec(model, tokenizer, config: EarlyExitConfig, protocol: ThinkingProtocol,
                    settings: GenerationSettings) -> ControllerSpec:
    """DEER-style early exit as a controller spec for :func:`~kvlib.switching.kv_switch.controlled_generate`."""
    stop = stop_ids(model, DecodeConfig())  # the ids that end an item in every decode

    def make(chunk: list[Prompt]) -> EarlyExitController:
        return EarlyExitController(tokenizer, protocol, config, len(chunk), stop, settings.max_new_tokens)

    return ControllerSpec({"method": "early-exit", "early_exit": asdict(config), "protocol": asdict(protocol)}, make)


def slow_prompts(tokenizer, questions, protocol: ThinkingProtocol) -> list[Prompt]:
    """The slow prompt of each question (``MathItem``-like objects or ``(id, question)`` pairs), in order."""
    return [Prompt(i, render_prompt(tokenizer, q, "slow", protocol)) for i, q in as_questions(questions)]


def early_exit_generate(model, tokenizer, questions, config: EarlyExitConfig = EarlyExitConfig(), *,
                        model_name: str = "model", dataset: str = "questions",
                        settings: GenerationSettings = GenerationSettings(), root=None, batch_size: int = 16,
                        protocol: ThinkingProtocol | None = None, progress: bool = True,
                        references: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Slow answers with DEER-style early exit.

    ``references`` (item id -> the stored plain greedy slow answer): replayed, decoded live only from the first
    exit or cap (:mod:`kvlib.runs.replay`; the same records). The other keywords: see
    :class:`~kvlib.switching.kv_switch.RunContext`.

    Records gain ``question``, ``trial_tokens``, ``withdrawn_tokens`` and ``early_exit_trials`` (a list of
    ``(thinking tokens before the word, confidence, trial tokens)``); the thinking cap is
    ``config.think_ratio * settings.max_new_tokens``.
    """
    run = RunContext(model_name, dataset, settings, root, batch_size, protocol, progress, references)
    protocol = run.thinking(tokenizer)
    records = controlled_generate(model, tokenizer, slow_prompts(tokenizer, questions, protocol),
                                  early_exit_spec(model, tokenizer, config, protocol, settings), run)
    return [{**rec, "question": q, "trial_tokens": int(record_array(rec, "trial_tokens")[0]),
             "withdrawn_tokens": int(record_array(rec, "withdrawn_tokens")[0]),
             "early_exit_trials": record_array(rec, "early_exit_trials").tolist()}
            for (_, q), rec in zip(as_questions(questions), records)]


def budget_spec(tokenizer, config: BudgetConfig, protocol: ThinkingProtocol) -> ControllerSpec:
    """The token budget as a controller spec for :func:`~kvlib.switching.kv_switch.controlled_generate`."""
    to_fast = tokenizer(protocol.to_fast, add_special_tokens=False).input_ids

    def make(chunk: list[Prompt]) -> BudgetController:
        watch = ThinkingWatch(tokenizer, protocol, [True] * len(chunk))
        return BudgetController(to_fast, config.budget, len(chunk), watch)

    return ControllerSpec({"method": "budget", **asdict(config), "protocol": asdict(protocol)}, make)


def budget_settings(tokenizer, config: BudgetConfig, protocol: ThinkingProtocol,
                    settings: GenerationSettings) -> GenerationSettings:
    """``settings`` with ``max_new_tokens = budget + len(switch text) + answer_tokens``: a forced answer's room."""
    to_fast = tokenizer(protocol.to_fast, add_special_tokens=False).input_ids
    return replace(settings, max_new_tokens=config.budget + len(to_fast) + config.answer_tokens)


def budget_generate(model, tokenizer, questions, budget: int, answer_tokens: int = BudgetConfig.answer_tokens, *,
                    model_name: str = "model", dataset: str = "questions",
                    settings: GenerationSettings = GenerationSettings(), root=None, batch_size: int = 16,
                    protocol: ThinkingProtocol | None = None, progress: bool = True,
                    references: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Slow answers cut at ``budget`` tokens and forced to answer in at most ``answer_tokens`` more tokens.

    ``references`` (item id -> the stored plain greedy slow answer): replayed up to the budget, then decoded live
    (:mod:`kvlib.runs.replay`; the same records). The other keywords: see
    :class:`~kvlib.switching.kv_switch.RunContext`.

    The run's ``max_new_tokens`` is ``budget + len(switch text) + answer_tokens`` (it replaces
    ``settings.max_new_tokens``, :func:`budget_settings`), so a forced answer always has its room. Records gain
    ``question``, ``forced`` (the budget injected the switch) and ``thinking_tokens`` (appended tokens before the
    answer: up to the switch, or up to and including the model's own end of thinking; all of them if it never
    ended); ``n_tokens`` counts every appended token, switch text and answer included.
    """
    cfg = BudgetConfig(budget, answer_tokens)
    protocol = protocol or protocol_for(tokenizer)
    run = RunContext(model_name, dataset, budget_settings(tokenizer, cfg, protocol, settings), root, batch_size,
                     protocol, progress, references)
    records = controlled_generate(model, tokenizer, slow_prompts(tokenizer, questions, protocol),
                                  budget_spec(tokenizer, cfg, protocol), run)
    out = []
    for (_, q), rec in zip(as_questions(questions), records):
        thinking = int(record_array(rec, "thinking_tokens")[0])
        out.append({**rec, "question": q, "forced": bool(record_array(rec, "budget_forced")[0]),
                    "thinking_tokens": rec["n_tokens"] if thinking < 0 else thinking})
    return out
