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
   withdraws text, or that runs past the end of its stored answer, turns live where it stands and decodes on, on
   the same cache, with the same controller (:class:`ReplayLoop`: the decoding loop of :mod:`kvlib.core.decoding`
   with tokens forced from the stored answers).

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

from ..core.cache import bucket
from ..core.decoding import DecodeConfig, DecodeLoop, DecodeResult
from ..core.phases import phase
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


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


class ReplayLoop(DecodeLoop):
    """The decoding loop with each row's tokens *forced* from its stored answer until the controller acts on it.

    The batch is prefilled with prompt + stored answer (all tokens but the last), the answer columns masked; at
    step ``t`` a forced row appends its ``t``-th stored token (with its stored statistics) and unmasks the column
    of the one before, so the controller sees exactly the live run's tokens, slots and attention mask. A row the
    controller injects into or withdraws from, or that outlives its stored answer, turns live where it stands:
    the answer's later columns stay masked and it decodes on, on the same cache, through the loop's own steps.
    Steps in which every running row is forced run no model at all.
    """

    def __init__(self, model, config: DecodeConfig, controller, answers: list[list[int]], refs: list[Mapping],
                 static: bool, room: int):
        super().__init__(model, config, controller or (lambda state: {}), static=static, room=room)
        self.answers = answers
        self.ref_stats = [(list(r.get("max_prob", [])), list(r.get("entropy", []))) for r in refs]
        self.forced = set(range(len(answers)))
        self.until = [0] * len(answers)  # answer tokens taken before the row went live (all: never went live)
        self.first: list[int] = []  # cache column of each row's first answer token

    def begin(self, prompt_ids: list[list[int]], pad: int) -> None:
        """Prefill every prompt with its stored answer, the answer columns masked."""
        ids, mask = _left_pad([p + a[:-1] for p, a in zip(prompt_ids, self.answers)], pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.start(ids, mask, [0] * len(prompt_ids), [None] * len(prompt_ids))
        width, st = ids.shape[1], self.state
        self.first = [width - (len(a) - 1) for a in self.answers]
        st.attention_mask = mask * (torch.arange(width, device=self.device)[None, :]
                                    < torch.tensor(self.first, device=self.device)[:, None])
        for i, p in enumerate(prompt_ids):
            self.inputs[i], self.input_end[i] = torch.tensor(p), self.first[i]
            st.prompt_lengths[i] = len(p)
        self.logits = self.stats = None

    def next_tokens(self, ahead=None) -> None:
        """Forced rows take their stored token; live rows pick from the last step's logits (when it ran)."""
        st = self.state
        phys = list(range(len(st.rows)))
        live = [p for p in phys if st.rows[p] not in self.forced]
        if self.logits is not None and live:
            stats = None if self.stats is None else self.stats[:, live]
            self._append(self.logits[live], stats, live)
        self.logits = self.stats = None
        t = st.step
        for p in phys:
            i = st.rows[p]
            if i not in self.forced or st.done[i]:
                continue
            if t:  # the previous answer token is fed now: its column joins the mask
                st.attention_mask[p, self.first[i] + t - 1] = 1
                st.slots[i].append(self.first[i] + t - 1)
            tok = self.answers[i][t]
            st.tokens[i].append(tok)
            self.sampled[i].append(True)
            self.max_prob[i].append(self.ref_stats[i][0][t])
            self.entropy[i].append(self.ref_stats[i][1][t])
            if tok in self.stop:
                st.done[i], self.finish[i] = True, "stop"
            elif len(st.tokens[i]) >= self.config.max_new_tokens:
                st.done[i] = True

    def control(self) -> None:
        """Ask the controller; rows it acts on (or that outlive their stored answer) turn live first."""
        st = self.state
        actions = self.controller(st)
        withdrawn, turned = list(st.withdrawn), []
        for i in sorted(self.forced):
            if st.done[i]:
                self.forced.discard(i)
                self.until[i] = len(st.tokens[i])
            elif (actions.get(i) or ((),))[0] or len(st.tokens[i]) >= len(self.answers[i]):
                self._go_live(i)
                turned.append(i)
        self.apply(actions)
        for i in turned:  # the tokens withdrawn now were replayed, but are not kept
            self.until[i] -= st.withdrawn[i] - withdrawn[i]

    def _go_live(self, i: int) -> None:
        """Row ``i`` decodes live from here: its last answer token is fed next, at the end of the cache."""
        st = self.state
        p = st.cache_row(i)
        self.forced.discard(i)
        self.until[i] = len(st.tokens[i])
        self.pending[i] = [st.tokens[i][-1]]
        self.next_pos[p] = st.prompt_lengths[i] + len(st.tokens[i]) - 1

    def feed(self) -> None:
        st = self.state
        if any(not st.done[i] and i not in self.forced for i in st.rows):
            super().feed()
        else:  # every running row is forced: no model call, the next tokens come from the answers
            self.pending, self.logits, self.stats = {}, None, None


@torch.inference_mode()
def _replay_batch(model, tokenizer, chunk: list[Prompt], answers: list[list[int]], refs: list[Mapping],
                  config: DecodeConfig, controller, extractors: Mapping[str, Extractor]):
    """One batch: replay each stored answer under the controller, decoding live only the rows it changes
    (:class:`ReplayLoop`). Returns ``(result, arrays, until)``: a :class:`DecodeResult` over the batch, extractor
    arrays per row and the replayed tokens per row."""
    prompt_ids = [tokenizer(p.text, add_special_tokens=False).input_ids for p in chunk]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    width = max(len(p) + len(a) - 1 for p, a in zip(prompt_ids, answers))
    loop = ReplayLoop(model, config, controller, answers, refs, static=config.static_for(model, device),
                      room=bucket(width + config.max_new_tokens + 16))
    loop.begin(prompt_ids, pad)
    arrays = [dict() for _ in chunk]

    def finished(part: DecodeResult) -> None:
        for fn in extractors.values():
            for row, a in zip(part.rows, fn(model, part, part.prompt_ids, part.prompt_mask)):
                arrays[row].update(a)

    result = loop.run(on_finish=finished)
    return result, arrays, loop.until


@phase("replay")
def replay_generate(model, tokenizer, prompts: Sequence[Prompt], store: ResultStore, references: Mapping[str, Mapping],
                    settings: GenerationSettings = GenerationSettings(), batch_size: int = 16,
                    extractors: Mapping[str, Extractor] | None = None,
                    controller_factory: Callable[[list[Prompt]], object] | None = None, progress: bool = True,
                    desc: str | None = None, shard: Shard | None = None) -> list[dict]:
    """:func:`kvlib.runs.generation.generate` for prompts whose plain greedy answer is stored (``references``: item id
    -> its record): the same records, decoded live only from where the controller changes the stored answer.

    Items without a reference are generated live by :func:`~kvlib.runs.generation.generate` afterwards; items
    already in ``store`` are reused as there. Raises ``ValueError`` for sampling settings and for a reference
    of another prompt (:func:`check_reference`). ``shard``: as for :func:`~kvlib.runs.generation.generate`
    (:mod:`kvlib.runs.sharding`).
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
