"""Replaying a stored greedy answer under a controller: decode live only from where the controller changes it.

A controlled run (KV switching, DEER-style early exit, a token budget) on a prompt whose plain greedy answer is
already stored is, token for token, that answer until the controller first acts on it: greedy decoding does not
depend on the batch (tested), and a controller only reads the tokens, the cache and the step. So instead of
decoding every token again, :func:`replay_generate`

1. prefills each prompt followed by its stored answer (all tokens but the last) in one forward pass: the cache
   then holds, at every position, the keys and values that the live run would hold there;
2. steps the controller through the answer one token at a time on that cache, showing it at step ``t`` exactly
   what it would see live (the first ``t + 1`` answer tokens, an attention mask that ends at the last fed token,
   the same ``done`` rules); checks that read the cache (KV difficulty) or run trials on it (DEER) work unchanged;
3. keeps the stored answer for every row the controller never touches; a row where the controller injects or
   withdraws text, or that runs past the end of its stored answer, is resumed (:class:`kvlib.decoding.RowHistory`)
   with the same controller and decoded live from that point.

The records are those of the live run (same fields, same controller arrays); each also says
``replayed_until``: the answer tokens taken from the reference before decoding went live (``n_tokens`` when the
whole answer came from it). Only the numerics differ: the prefilled keys and values equal the incrementally
decoded ones up to floating-point rounding, so a check whose score falls within rounding of its threshold could
in principle go the other way (tested token for token against live runs on a tiny model).

Greedy runs only (a sampled run draws from a per-row stream that a replay cannot reproduce).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .cache import output_cache, rows_view
from .decoding import DecodeConfig, DecodeResult, DecodeState, RowHistory, decode, prefill, stop_ids
from .generation import (Extractor, GenerationSettings, Prompt, _check_lengths, _unique_ids, decode_config, generate,
                         make_record, prepare_store, prompt_hash)
from .identity import model_identity
from .sharding import SINGLE, Shard, current_shard, run_sharded
from .store import ResultStore

__all__ = ["replay_generate", "check_reference"]

log = logging.getLogger(__name__)


def check_reference(prompt: Prompt, reference: Mapping) -> list[int]:
    """The reference's answer ids, after checking that it answers this very prompt as a plain greedy run.

    Raises ``ValueError`` naming the item when the reference was generated for another prompt, or carries
    injected text or withdrawn tokens (it is then not a plain answer).
    """
    if reference.get("prompt") != prompt.text:
        raise ValueError(f"item {prompt.id!r}: the reference answer was generated for another prompt; pass the "
                         "stored answers of the same prompt form (mode) and the same model")
    if reference.get("switches") or reference.get("sampled_mask"):
        raise ValueError(f"item {prompt.id!r}: the reference answer carries injected text; pass a plain answer")
    ids = list(reference.get("token_ids") or [])
    if not ids:
        raise ValueError(f"item {prompt.id!r}: the reference answer holds no tokens")
    return ids


class _Subset:
    """The state of a resumed batch shown to the controller under the original batch's row numbers.

    Rows that did not resume are finished (``done``) with their replayed tokens; ``step`` continues the
    replay's step count so that per-step bookkeeping (:class:`kvlib.thinking.ThinkingWatch`) stays monotone.
    """

    def __init__(self, state: DecodeState, to_sub: dict[int, int], frozen: list[list[int]], offset: int):
        self._state, self._to_sub = state, to_sub
        n = len(frozen)
        self.model, self.cache, self.attention_mask = state.model, state.cache, state.attention_mask
        self.step = state.step + offset
        pick = lambda xs, default: [xs[to_sub[i]] if i in to_sub else default(i) for i in range(n)]  # noqa: E731
        self.tokens = pick(state.tokens, lambda i: frozen[i])
        self.slots = pick(state.slots, lambda i: [])
        self.prompt_lengths = pick(state.prompt_lengths, lambda i: 0)
        self.switches = pick(state.switches, lambda i: [])
        self.withdrawn = pick(state.withdrawn, lambda i: 0)
        self.done = _DoneView([state.done[to_sub[i]] if i in to_sub else True for i in range(n)], state, to_sub)
        from_sub = {j: i for i, j in to_sub.items()}
        self.rows = [from_sub[j] for j in state.rows]

    def cache_row(self, i: int) -> int:
        return self._state.cache_row(self._to_sub[i])


class _DoneView(list):
    """``done`` flags that write through to the resumed state (a controller may end a row)."""

    def __init__(self, flags, state: DecodeState, to_sub: dict[int, int]):
        super().__init__(flags)
        self._state, self._to_sub = state, to_sub

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        if i in self._to_sub:
            self._state.done[self._to_sub[i]] = value


def _subset_controller(controller, to_sub: dict[int, int], frozen: list[list[int]], offset: int):
    def control(state: DecodeState) -> dict[int, tuple]:
        actions = controller(_Subset(state, to_sub, frozen, offset))
        return {to_sub[i]: a for i, a in actions.items() if i in to_sub}

    return control


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


@torch.inference_mode()
def _replay_batch(model, tokenizer, chunk: list[Prompt], answers: list[list[int]], refs: list[Mapping],
                  config: DecodeConfig, controller, extractors: Mapping[str, Extractor]):
    """One batch: replay, then resume the rows the controller changed. Returns ``(result, arrays, until)``:
    a :class:`DecodeResult` over the batch, extractor arrays per row and the replayed tokens per row."""
    stop = stop_ids(model, config)
    prompt_ids = [tokenizer(p.text, add_special_tokens=False).input_ids for p in chunk]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _left_pad([p + a[:-1] for p, a in zip(prompt_ids, answers)], pad)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = prefill(model, ids, mask, logits_to_keep=1)
    cache = output_cache(out)
    batch, width = ids.shape
    first = [width - (len(a) - 1) for a in answers]  # cache column of each row's first answer token
    cols = torch.arange(width, device=device)
    state = DecodeState(model=model, cache=cache, attention_mask=mask, step=-1, tokens=[[] for _ in chunk],
                        slots=[[] for _ in chunk], done=[False] * batch,
                        prompt_lengths=[len(p) for p in prompt_ids], switches=[[] for _ in chunk],
                        rows=list(range(batch)), withdrawn=[0] * batch)
    stats = [(list(r.get("max_prob", [])), list(r.get("entropy", []))) for r in refs]
    finish = ["length"] * batch
    history: dict[int, RowHistory] = {}  # rows that go live, with what they had appended
    active = set(range(batch))
    step = -1
    for step in range(max(len(a) for a in answers)):
        for i in sorted(active):
            tok = answers[i][step]
            state.tokens[i].append(tok)
            if tok in stop:
                state.done[i], finish[i] = True, "stop"
            elif len(state.tokens[i]) >= config.max_new_tokens:
                state.done[i] = True
        state.step = step
        fed_end = torch.tensor([first[i] + step for i in range(batch)], device=device)
        state.attention_mask = mask * (cols[None, :] < fed_end[:, None])
        if step:
            for i in active:
                state.slots[i].append(first[i] + step - 1)
        actions = controller(state) if controller is not None else {}
        for i in sorted(active):
            action = actions.get(i)
            n = len(state.tokens[i])
            if state.done[i]:
                active.discard(i)
                continue
            if action is None and n < len(answers[i]):
                continue
            active.discard(i)
            ids_i, label, n_back = (*action, 0) if action is not None and len(action) == 2 else (action or ([], "", 0))
            keep = n - n_back
            if action is not None and not ids_i:
                if n_back:
                    raise ValueError(f"row {i}: withdrawing tokens needs text to inject in their place")
                if n < len(answers[i]):  # an empty action changes nothing: go on replaying
                    active.add(i)
                    continue
            room = config.max_new_tokens - keep
            inject = list(ids_i)[:room]
            tokens = answers[i][:keep] + inject
            switches = [(keep, label)] if inject else []
            mp, ent = stats[i][0][:keep], stats[i][1][:keep]
            state.tokens[i] = tokens
            state.switches[i] = switches
            state.withdrawn[i] += n_back
            history[i] = RowHistory(tuple(tokens), (True,) * keep + (False,) * len(inject), tuple(mp), tuple(ent),
                                    tuple(switches), state.withdrawn[i])
            # a row whose injection spent the budget has nothing left to decode
            state.done[i] = len(tokens) >= config.max_new_tokens
        if not active:
            break
    # the replayed rows' final state, for the extractors: every token but the last is fed
    until = [len(state.tokens[i]) if i not in history else sum(history[i].sampled) for i in range(batch)]
    for i in range(batch):
        if i not in history:
            state.slots[i] = list(range(first[i], first[i] + len(state.tokens[i]) - 1))
    fed_end = torch.tensor([first[i] + len(state.tokens[i]) - 1 for i in range(batch)], device=device)
    state.attention_mask = mask * (cols[None, :] < fed_end[:, None])
    mask = state.attention_mask
    max_prob = [list(s[0][: len(state.tokens[i])]) for i, s in enumerate(stats)]
    entropy = [list(s[1][: len(state.tokens[i])]) for i, s in enumerate(stats)]
    sampled = [[True] * len(state.tokens[i]) for i in range(batch)]
    result = DecodeResult(tokens=state.tokens, max_prob=max_prob, entropy=entropy, sampled_mask=sampled,
                          finish_reason=finish, switches=state.switches, state=state)
    arrays = [dict() for _ in chunk]
    kept = [i for i in range(batch) if i not in history]
    if kept and extractors:
        part_state = DecodeState(model=model, cache=rows_view(cache, kept) if len(kept) < batch else cache,
                                 attention_mask=mask[kept], step=state.step,
                                 tokens=[state.tokens[i] for i in kept], slots=[state.slots[i] for i in kept],
                                 done=[True] * len(kept), prompt_lengths=[state.prompt_lengths[i] for i in kept],
                                 switches=[state.switches[i] for i in kept], rows=list(range(len(kept))),
                                 withdrawn=[state.withdrawn[i] for i in kept])
        part = DecodeResult(tokens=part_state.tokens, max_prob=[max_prob[i] for i in kept],
                            entropy=[entropy[i] for i in kept], sampled_mask=[sampled[i] for i in kept],
                            finish_reason=[finish[i] for i in kept], switches=part_state.switches, state=part_state,
                            rows=kept)
        for fn in extractors.values():
            for row, a in zip(kept, fn(model, part, ids[kept], mask[kept])):
                arrays[row].update(a)
    del cache, out
    state.cache = None
    live = [i for i in history if len(history[i].tokens) < config.max_new_tokens]
    for i in history:
        h = history[i]
        result.tokens[i], result.switches[i] = list(h.tokens), list(h.switches)
        result.sampled_mask[i] = list(h.sampled)
        result.max_prob[i], result.entropy[i] = list(h.max_prob), list(h.entropy)
    if live:
        _resume(model, chunk, prompt_ids, live, history, result, arrays, config, controller, extractors,
                offset=step + 1, pad=pad)
    ended = {i: h for i, h in history.items() if i not in live}
    if ended and extractors:
        _extract_ended(model, prompt_ids, ended, result, arrays, extractors, pad)
    return result, arrays, until


def _resume(model, chunk, prompt_ids, live, history, result, arrays, config, controller, extractors,
            offset: int, pad: int) -> None:
    """Decode the rows in ``live`` from their histories, the controller seeing the original row numbers."""
    to_sub = {i: j for j, i in enumerate(live)}
    frozen = [list(t) for t in result.tokens]
    ids, mask = _left_pad([prompt_ids[i] + list(history[i].tokens) for i in live], pad)
    control = _subset_controller(controller, to_sub, frozen, offset) if controller is not None else None

    def finished(part: DecodeResult) -> None:
        rows = list(part.rows)
        sel = torch.tensor(rows, dtype=torch.long)
        part.rows = [live[j] for j in rows]
        for fn in extractors.values():
            for row, a in zip(part.rows, fn(model, part, ids[sel], mask[sel])):
                arrays[row].update(a)

    res = decode(model, ids, mask, config, controller=control, on_finish=finished if extractors else None,
                 history=[history[i] for i in live])
    for j, i in enumerate(live):
        result.tokens[i], result.max_prob[i], result.entropy[i] = res.tokens[j], res.max_prob[j], res.entropy[j]
        result.sampled_mask[i], result.finish_reason[i], result.switches[i] = (res.sampled_mask[j],
                                                                               res.finish_reason[j], res.switches[j])


def _extract_ended(model, prompt_ids, history, result, arrays, extractors, pad) -> None:
    """Extractor arrays of rows whose injection spent the whole budget (no decoding step was left)."""
    rows = list(history)
    ids, mask = _left_pad([prompt_ids[i] + list(history[i].tokens)[:-1] for i in rows], pad)
    out = prefill(model, ids, mask, logits_to_keep=1)
    width = ids.shape[1]
    state = DecodeState(model=model, cache=output_cache(out), attention_mask=mask.to(out.logits.device), step=0,
                        tokens=[list(history[i].tokens) for i in rows],
                        slots=[list(range(width - (len(history[i].tokens) - 1), width)) for i in rows],
                        done=[True] * len(rows), prompt_lengths=[len(prompt_ids[i]) for i in rows],
                        switches=[list(history[i].switches) for i in rows], rows=list(range(len(rows))),
                        withdrawn=[history[i].withdrawn for i in rows])
    part = DecodeResult(tokens=state.tokens, max_prob=[result.max_prob[i] for i in rows],
                        entropy=[result.entropy[i] for i in rows], sampled_mask=[result.sampled_mask[i] for i in rows],
                        finish_reason=["length"] * len(rows), switches=state.switches, state=state, rows=rows)
    for fn in extractors.values():
        for row, a in zip(rows, fn(model, part, ids, mask)):
            arrays[row].update(a)


def replay_generate(model, tokenizer, prompts: Sequence[Prompt], store: ResultStore, references: Mapping[str, Mapping],
                    settings: GenerationSettings = GenerationSettings(), batch_size: int = 16,
                    extractors: Mapping[str, Extractor] | None = None,
                    controller_factory: Callable[[list[Prompt]], object] | None = None, progress: bool = True,
                    desc: str | None = None, shard: Shard | None = None) -> list[dict]:
    """:func:`kvlib.generation.generate` for prompts whose plain greedy answer is stored (``references``: item id
    -> its record): the same records, decoded live only from where the controller changes the stored answer.

    Items without a reference are generated live by :func:`~kvlib.generation.generate` afterwards; items
    already in ``store`` are reused as there. Raises ``ValueError`` for sampling settings and for a reference
    of another prompt (:func:`check_reference`). ``shard``: as for :func:`~kvlib.generation.generate`
    (:mod:`kvlib.sharding`).
    """
    if settings.do_sample or settings.ignore_eos:
        raise ValueError("replay needs greedy settings that stop at EOS (do_sample=False, ignore_eos=False): "
                         "a sampled or EOS-ignoring run differs from the stored greedy answer")
    extractors = dict(extractors or {})
    shard = current_shard() if shard is None else shard
    if shard.world > 1:
        _unique_ids(prompts)

        def work(target: ResultStore, part: list[Prompt]) -> None:
            replay_generate(model, tokenizer, part, target, references, settings, batch_size=batch_size,
                            extractors=extractors, controller_factory=controller_factory, progress=progress,
                            desc=f"{desc or store.dataset} ({shard})", shard=SINGLE)

        def check(missing: list[Prompt]) -> None:  # every rank refuses what a single run would, before any work
            for p in missing:
                if p.id in references:
                    check_reference(p, references[p.id])
            lengths = {p.id: len(tokenizer(p.text, add_special_tokens=False).input_ids) for p in missing
                       if p.id not in references}
            _check_lengths(model, lengths, settings.max_new_tokens)

        return run_sharded(store, prompts, {p.id: prompt_hash(p.text) for p in prompts}, shard,
                           model_identity(model, tokenizer), settings.identity(extractors), work, check=check)
    hashes = prepare_store(model, tokenizer, store, settings, extractors, prompts)
    todo = [p for p in prompts if p.id not in store and p.id in references]
    if todo:
        if store.readonly:
            raise PermissionError(f"{len(todo)} item(s) are missing from {store.path}, which is open readonly")
        answers = {p.id: check_reference(p, references[p.id]) for p in todo}
        todo.sort(key=lambda p: len(p.text) + 4 * len(answers[p.id]))
        config = decode_config(settings)
        bar = tqdm(total=len(todo), desc=(desc or store.dataset) + " (replay)", unit="item", disable=not progress,
                   dynamic_ncols=True)
        went_live = 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            controller = controller_factory(chunk) if controller_factory else None
            t0 = time.perf_counter()
            result, arrays, until = _replay_batch(model, tokenizer, chunk, [answers[p.id] for p in chunk],
                                                  [references[p.id] for p in chunk], config, controller, extractors)
            seconds = (time.perf_counter() - t0) / len(chunk)
            records = []
            for row, p in enumerate(chunk):
                rec = make_record(tokenizer, p, result, row, arrays[row], seconds, {})
                rec.update(input_sha256=hashes[p.id], replayed_until=int(until[row]))
                went_live += until[row] < rec["n_tokens"]
                records.append(rec)
            store.add(records)
            bar.update(len(chunk))
            bar.set_postfix(live=went_live)
        bar.close()
        log.info("%s: %d of %d items replayed from stored answers, %d of them resumed live", desc or store.dataset,
                 len(todo), len(prompts), went_live)
    return generate(model, tokenizer, prompts, store, settings, batch_size=batch_size, extractors=extractors,
                    controller_factory=controller_factory, progress=progress, desc=desc, shard=shard)
