"""Baselines that stop slow thinking without a difficulty classifier: DEER-style early exit and token budgets.

Both run live, in the same decoding loop as the KV controllers (:mod:`kvlib.adaptive`), on the slow prompt.

* **DEER-style early exit** (Yang et al. 2025, "Dynamic Early Exit in Reasoning Models"): at a reasoning
  pause (the token just sampled contains a newline), and at least ``min_gap`` tokens after the previous
  trial, try a trial answer on the live cache: feed the pending token, the switch-to-fast text and an
  answer lead-in, greedily decode up to ``trial_tokens`` answer tokens (stopping at ``}`` or a stop
  token), and take the mean max-probability of those tokens. If it reaches ``threshold`` (0.95, as DEER)
  the switch-to-fast text is injected for real and decoding continues; either way the trial's positions
  are rolled back (:func:`kvlib.cache.crop_cache`; the decoding loop's attention mask is never touched).
  Trial tokens are overhead compute: they are not part of the answer, and each record stores how many
  were spent (``trial_tokens``) and every trial as ``(tokens so far, confidence, trial tokens)``.
  Rows of a batch that pause at the same step share one batched trial; other rows get masked filler.
* **Token budget**: after ``budget`` appended tokens the switch-to-fast text is injected and the item
  may write at most ``answer_tokens`` more tokens (the forced answer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .adaptive import as_questions, controlled_generate
from .cache import cache_kwargs, crop_cache, output_cache
from .decoding import DecodeState
from .generation import GenerationSettings, Prompt, record_array
from .thinking import ThinkingProtocol, protocol_for, render_prompt

__all__ = ["EarlyExitConfig", "EarlyExitController", "early_exit_generate", "BudgetController", "budget_generate"]


@dataclass(frozen=True)
class EarlyExitConfig:
    """DEER-style early exit.

    Attributes:
        threshold: mean max-probability of the trial answer that triggers the exit.
        min_gap: fewest appended tokens between two trials of an item (and before the first).
        trial_tokens: most answer tokens decoded per trial.
        answer_lead: text after the switch-to-fast text that opens the answer in a trial; ``None``:
            nothing for the prompt form (its switch text already ends with ``\\boxed{``), else
            ``"The final answer is \\boxed{"``.
        pause: a sampled token whose text contains this string marks a reasoning pause.
        close: a trial answer token containing this string ends the trial answer.
    """

    threshold: float = 0.95
    min_gap: int = 32
    trial_tokens: int = 8
    answer_lead: str | None = None
    pause: str = "\n"
    close: str = "}"

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        if self.min_gap < 1 or self.trial_tokens < 1:
            raise ValueError("min_gap and trial_tokens must be >= 1")


class EarlyExitController:
    """Trial answers at pauses; injects the switch to fast when a trial is confident (see the module docstring)."""

    def __init__(self, tokenizer, protocol: ThinkingProtocol, config: EarlyExitConfig, n_rows: int,
                 stop_ids: set[int]):
        self.tok, self.config, self.stop = tokenizer, config, stop_ids
        lead = config.answer_lead if config.answer_lead is not None else (
            "" if protocol.form == "prompt" else "The final answer is \\boxed{")
        self.to_fast = tokenizer(protocol.to_fast, add_special_tokens=False).input_ids
        self.trial_prefix = tokenizer(protocol.to_fast + lead, add_special_tokens=False).input_ids
        self.last = [0] * n_rows
        self.exited = [False] * n_rows
        self.trials: list[list[tuple[int, float, int]]] = [[] for _ in range(n_rows)]
        self._text: dict[int, str] = {}

    def _piece(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tok.decode([token])
        return self._text[token]

    def __call__(self, state: DecodeState) -> dict[int, tuple[list[int], str]]:
        rows = [i for i in range(len(self.exited)) if not state.done[i] and not self.exited[i]
                and len(state.tokens[i]) - self.last[i] >= self.config.min_gap
                and self.config.pause in self._piece(state.tokens[i][-1])]
        if not rows:
            return {}
        confidence, spent = self._trial(state, rows)
        out = {}
        for i, c, n in zip(rows, confidence, spent):
            self.last[i] = len(state.tokens[i])
            self.trials[i].append((len(state.tokens[i]), c, n))
            if c >= self.config.threshold:
                self.exited[i] = True
                out[i] = (self.to_fast, "early_exit")
        return out

    def _trial(self, state: DecodeState, rows: list[int]) -> tuple[list[float], list[int]]:
        """Batched trial answers for ``rows`` on the live cache, rolled back afterwards."""
        model, cache, mask0 = state.model, state.cache, state.attention_mask
        batch, base = mask0.shape  # cache rows (finished rows may have left)
        dev = mask0.device
        prefix = self.trial_prefix
        width = 1 + len(prefix)
        chunk = torch.zeros((batch, width), dtype=torch.long, device=dev)
        live = torch.zeros((batch, width), dtype=torch.long, device=dev)
        pos = mask0.sum(-1, keepdim=True).expand(batch, width).clone()
        phys = {i: state.cache_row(i) for i in rows}
        for i in rows:
            chunk[phys[i]] = torch.tensor([state.tokens[i][-1], *prefix], device=dev)
            live[phys[i]] = 1
            pos[phys[i]] += torch.arange(width, device=dev)
        probs = {i: [] for i in rows}
        running = set(rows)
        mask = torch.cat([mask0, live], dim=1)
        try:
            for _ in range(self.config.trial_tokens):
                out = model(input_ids=chunk, attention_mask=mask, position_ids=pos, use_cache=True,
                            logits_to_keep=1, **cache_kwargs(model, cache))
                cache = output_cache(out)
                p = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
                mp, nxt = p.max(-1)
                mp, nxt = mp.tolist(), nxt.tolist()
                for i in list(running):
                    probs[i].append(mp[phys[i]])
                    if nxt[phys[i]] in self.stop or self.config.close in self._piece(nxt[phys[i]]):
                        running.discard(i)
                if not running:
                    break
                alive = {phys[i] for i in running}
                step = torch.tensor([[1 if p in alive else 0] for p in range(batch)], device=dev)
                chunk = torch.tensor([[t] for t in nxt], device=dev)
                pos = pos[:, -1:] + 1
                mask = torch.cat([mask, step], dim=1)
        finally:
            crop_cache(cache, base)
            if cache is not state.cache:
                crop_cache(state.cache, base)
        return [float(np.mean(probs[i])) for i in rows], [width + len(probs[i]) - 1 for i in rows]

    def arrays(self, row: int) -> dict[str, np.ndarray]:
        t = np.asarray(self.trials[row], dtype=np.float32).reshape(-1, 3)
        return {"early_exit_trials": t, "trial_tokens": np.asarray([int(t[:, 2].sum())], np.int64)}


class BudgetController:
    """Injects the switch-to-fast text once an item has ``budget`` appended tokens (a forced answer)."""

    def __init__(self, to_fast: list[int], budget: int, n_rows: int):
        self.to_fast, self.budget = to_fast, budget
        self.fired = [False] * n_rows

    def __call__(self, state: DecodeState) -> dict[int, tuple[list[int], str]]:
        out = {}
        for i, fired in enumerate(self.fired):
            if not fired and not state.done[i] and len(state.tokens[i]) >= self.budget:
                self.fired[i] = True
                out[i] = (self.to_fast, f"budget_{self.budget}")
        return out


def _stop_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def early_exit_generate(model, tokenizer, questions, config: EarlyExitConfig = EarlyExitConfig(), *,
                        model_name: str = "model", dataset: str = "questions",
                        settings: GenerationSettings = GenerationSettings(), root=None, batch_size: int = 16,
                        protocol: ThinkingProtocol | None = None, progress: bool = True) -> list[dict]:
    """Slow answers with DEER-style early exit; records gain ``question``, ``trial_tokens``, ``early_exit_trials``."""
    protocol = protocol or protocol_for(tokenizer)
    qs = as_questions(questions)
    prompts = [Prompt(i, render_prompt(tokenizer, q, "slow", protocol)) for i, q in qs]
    stop = _stop_ids(model, tokenizer)
    identity = {"method": "early-exit", "early_exit": asdict(config), "protocol": asdict(protocol)}

    def make(chunk):
        return EarlyExitController(tokenizer, protocol, config, len(chunk), stop)

    records = controlled_generate(model, tokenizer, prompts, make, identity, model_name=model_name, dataset=dataset,
                                  settings=settings, root=root, batch_size=batch_size, progress=progress)
    return [{**rec, "question": q, "trial_tokens": int(record_array(rec, "trial_tokens")[0]),
             "early_exit_trials": record_array(rec, "early_exit_trials").tolist()}
            for (_, q), rec in zip(qs, records)]


def budget_generate(model, tokenizer, questions, budget: int, answer_tokens: int = 16, *, model_name: str = "model",
                    dataset: str = "questions", settings: GenerationSettings = GenerationSettings(), root=None,
                    batch_size: int = 16, protocol: ThinkingProtocol | None = None, progress: bool = True
                    ) -> list[dict]:
    """Slow answers cut at ``budget`` tokens and forced to answer (at most ``answer_tokens`` more tokens).

    The run's ``max_new_tokens`` becomes ``min(settings.max_new_tokens, budget + len(switch text) + answer_tokens)``.
    """
    if budget < 1 or answer_tokens < 1:
        raise ValueError("budget and answer_tokens must be >= 1")
    protocol = protocol or protocol_for(tokenizer)
    qs = as_questions(questions)
    to_fast = tokenizer(protocol.to_fast, add_special_tokens=False).input_ids
    cap = min(settings.max_new_tokens, budget + len(to_fast) + answer_tokens)
    run_settings = GenerationSettings(**{**asdict(settings), "max_new_tokens": cap})
    prompts = [Prompt(i, render_prompt(tokenizer, q, "slow", protocol)) for i, q in qs]
    identity = {"method": "budget", "budget": budget, "answer_tokens": answer_tokens, "protocol": asdict(protocol)}
    records = controlled_generate(model, tokenizer, prompts,
                                  lambda chunk: BudgetController(to_fast, budget, len(chunk)), identity,
                                  model_name=model_name, dataset=dataset, settings=run_settings, root=root,
                                  batch_size=batch_size, progress=progress)
    return [{**rec, "question": q} for (_, q), rec in zip(qs, records)]
