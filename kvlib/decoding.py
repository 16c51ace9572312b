"""One batched decoding loop on a live KV cache, with a seam for text injection.

Why our own loop instead of ``model.generate``: the experiments need (1) per-token output statistics
(max probability, entropy) without keeping ``batch x steps x vocab`` scores in memory, (2) every
per-item quantity cut at that item's own end of sequence, (3) the cache position of every generated
token so that KV trajectories can be read back from the cache afterwards, and (4) the ability to
inject control text into one sequence of a batch mid-generation and keep decoding on the same cache
(fast/slow switching). ``generate`` offers none of these cleanly. With no controller, greedy
decoding here is token-for-token equal to greedy ``generate`` (tested).

Batching uses left padding. Injected text is fed as a chunk: each row's pending tokens are
right-aligned and the unused columns are masked out (attention mask 0), so a row that injects
nothing simply gets masked filler positions that no query ever attends to. Positions ids count
only real tokens, so every row sees exactly the positions it would see on its own.

A controller may also *withdraw* a row's last sampled tokens before injecting (``(ids, label, n)``): the
tokens leave the row's output, their cache slots are masked like filler and the row's positions rewind,
so the row continues exactly as if they had never been sampled (the DEER-style exit ends the thinking
*before* the transition word that triggered it). ``state.withdrawn`` counts them per row.

Sampling follows ``generate``'s order: temperature, then top-k, then top-p (:func:`next_token_probs`);
each row draws from its own seeded generator, so a row's sample never depends on its batch neighbours.

Finished rows can leave the batch (``on_finish``): a batch otherwise keeps paying for every row until
its longest answer ends (slow answers vary from 100 to 400 tokens). Items keep their *logical* row
index everywhere (tokens, slots, controllers' outputs); only the cache and the attention mask are
*physical* and hold the rows in ``state.rows`` (``state.cache_row(i)`` maps one to the other).

On a GPU the loop decodes on a static cache (:class:`kvlib.cache.StaticKV`) and the common step, one token
per row, is a captured CUDA graph (:class:`kvlib.cache.CompiledStep`): a step then costs one graph launch
instead of one launch per kernel, which is what bounds a small model's decoding. Chunks of injected text and
DEER trials run eagerly on the same cache. Finished rows stay in a static batch (masked filler, as when no
row leaves): on a GPU, copying the cache to drop them costs more than decoding them. ``on_finish`` still
receives every row once, when a quarter of the batch is done and at the end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from .cache import (CompiledStep, StaticKV, forward, keep_rows, rows_view, step_logits, supports_static,
                    token_stats)

if TYPE_CHECKING:
    from transformers import DynamicCache

__all__ = ["DecodeConfig", "DecodeState", "DecodeResult", "Controller", "RowHistory", "decode", "prefill",
           "prefill_positions", "next_token_probs", "stop_ids"]


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of one decoding run.

    Attributes:
        max_new_tokens: budget per item, counting every token appended after the prompt (injected
            control text included).
        do_sample: sample instead of greedy argmax.
        temperature, top_k, top_p: sampling settings, applied in this order (ignored when greedy);
            ``top_k=0`` and ``top_p=1`` switch their filter off.
        stop_token_ids: token ids that end an item; ``None`` uses the model's ``eos_token_id``(s).
        cache: ``"static"`` decodes on a preallocated :class:`kvlib.cache.StaticKV` (finished rows stay in the
            batch, masked), ``"dynamic"`` on a growing ``DynamicCache`` (finished rows can leave); ``"auto"``:
            static on CUDA for a model with full attention only, else dynamic.
        compile: capture the one-token step on a static cache (:class:`kvlib.cache.CompiledStep`, CUDA
            graphs); ``None``: on CUDA only (on a CPU the compile costs more than it saves).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    cache: str = "auto"
    compile: bool | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), not {self.top_k!r}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.cache not in ("auto", "dynamic", "static"):
            raise ValueError(f"cache must be 'auto', 'dynamic' or 'static', not {self.cache!r}")
        if self.compile and self.cache == "dynamic":
            raise ValueError("compile=True needs a static cache: set cache='static' (or 'auto' on a GPU)")

    def static_for(self, model, device) -> bool:
        """Whether decoding ``model`` on ``device`` uses a static cache under this config."""
        if self.cache == "auto":  # a model spread over devices (device_map) decodes eagerly on a dynamic cache
            spread = len(set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))) > 1
            return torch.device(device).type == "cuda" and supports_static(model) and not spread
        return self.cache == "static"


@dataclass(frozen=True)
class RowHistory:
    """What one row has already appended after its prompt, to resume decoding it (see :mod:`kvlib.replay`).

    The tokens must be the last ``len(tokens)`` real ids of the row's ``input_ids``: they are prefilled with the
    prompt and count towards ``max_new_tokens`` exactly as if this loop had appended them.

    Attributes:
        tokens: the appended ids (sampled and injected), ``[n]``.
        sampled: per token, True when the model chose it (``[n]``).
        max_prob, entropy: the statistics of the sampled tokens (one entry per True in ``sampled``).
        switches: ``(tokens before it, label)`` of each injection so far.
        withdrawn: tokens a controller has withdrawn so far.
    """

    tokens: tuple[int, ...]
    sampled: tuple[bool, ...]
    max_prob: tuple[float, ...]
    entropy: tuple[float, ...]
    switches: tuple[tuple[int, str], ...] = ()
    withdrawn: int = 0

    def __post_init__(self):
        n_sampled = sum(map(bool, self.sampled))
        if len(self.sampled) != len(self.tokens) or not len(self.max_prob) == len(self.entropy) == n_sampled:
            raise ValueError(f"a row history needs one sampled flag per token ({len(self.tokens)}) and one "
                             f"max_prob / entropy per sampled token ({n_sampled}); got {len(self.sampled)}, "
                             f"{len(self.max_prob)}, {len(self.entropy)}")


@dataclass
class DecodeState:
    """The live state a :class:`Controller` sees after each step.

    Per-item lists are indexed by the item's logical row (its place in the input batch). The cache and
    the attention mask hold only the rows still in the batch, in the order of ``rows``.

    Attributes:
        model: the model being decoded.
        cache: the live cache (prompt + everything fed so far), batch dimension = ``len(rows)``: a
            ``DynamicCache``, or a :class:`kvlib.cache.StaticKV` (read both with :func:`kvlib.cache.cache_layers`).
        attention_mask: ``[len(rows), cache_len]``, 1 where a cache slot holds a real token.
        step: index of the step that just sampled ``tokens[i][-1]``.
        tokens: per item, every token appended after the prompt so far (sampled and injected).
        slots: per item, the cache slot of each token in ``tokens`` that has been fed to the model.
        done: per item, whether it has finished.
        prompt_lengths: per item, the number of real prompt tokens.
        rows: logical row of each cache row (``range(batch)`` until a row leaves).
        withdrawn: per item, how many sampled tokens a controller withdrew (generated, then dropped).
    """

    model: torch.nn.Module
    cache: DynamicCache
    attention_mask: torch.Tensor
    step: int
    tokens: list[list[int]]
    slots: list[list[int]]
    done: list[bool]
    prompt_lengths: list[int]
    switches: list[list[tuple[int, str]]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    withdrawn: list[int] = field(default_factory=list)

    def cache_row(self, i: int) -> int:
        """The cache (physical) row of logical row ``i``; ``ValueError`` if it has left the batch."""
        try:
            return self.rows.index(i)
        except ValueError:
            raise ValueError(f"row {i} has finished and left the batch") from None


class Controller(Protocol):
    """Decides, after each sampled token, whether to inject token ids into some rows.

    Returns a mapping ``row -> (token ids, label)`` for rows to inject into (empty for none), or
    ``row -> (token ids, label, n)`` to first withdraw the row's last ``n`` tokens (all of them sampled,
    the newest included). The label is recorded with the position of the switch (after the withdrawal).
    """

    def __call__(self, state: DecodeState) -> dict[int, tuple]: ...


@dataclass
class DecodeResult:
    """Per-item outputs of :func:`decode` (lists of length ``batch``).

    Attributes:
        tokens: every appended token id (sampled and injected), EOS included when reached; tokens a controller
            withdrew are not in it (``state.withdrawn`` counts them).
        max_prob: max softmax probability of each sampled step (injected tokens have no entry).
        entropy: base-2 entropy of each sampled step's next-token distribution.
        sampled_mask: per appended token, True when the model chose it, False when injected.
        finish_reason: ``"stop"`` (a stop token) or ``"length"`` (budget spent).
        switches: ``(number of tokens before the switch, label)`` for each injection.
        state: the final :class:`DecodeState` (cache and slots) for reading KV features.
        rows: the logical row of each entry (``range(batch)`` for a whole batch; the leaving rows for the
            partial results handed to ``on_finish``).
    """

    tokens: list[list[int]]
    max_prob: list[list[float]]
    entropy: list[list[float]]
    sampled_mask: list[list[bool]]
    finish_reason: list[str]
    switches: list[list[tuple[int, str]]]
    state: DecodeState
    rows: list[int] | None = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = list(range(len(self.tokens)))


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: ``cumsum(mask) - 1``, pads clamped to 0. ``[batch, seq]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """One forward over a left-padded batch with position ids that count real tokens only.

    A plain ``model(input_ids, attention_mask)`` numbers positions from the first column, padding
    included, which shifts RoPE for every padded row: pooled features would then depend on the batch.

    Args:
        input_ids, attention_mask: ``[batch, seq]``, left-padded.
        kwargs: passed to the model (e.g. ``output_hidden_states=True``, ``logits_to_keep=1``).

    Returns:
        The model output; its cache via :func:`kvlib.cache.output_cache`.
    """
    device = next(model.parameters()).device
    attention_mask = attention_mask.to(device)
    cache = False if kwargs.pop("use_cache", True) is False else kwargs.pop("cache", None)
    out, _ = forward(model, input_ids.to(device), attention_mask, prefill_positions(attention_mask), cache,
                     logits_to_keep=kwargs.pop("logits_to_keep", 0), **kwargs)
    return out


def stop_ids(model, config: DecodeConfig) -> set[int]:
    """The token ids that end an item: ``config.stop_token_ids``, else the model's EOS id(s)."""
    if config.stop_token_ids is not None:
        return set(config.stop_token_ids)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        raise ValueError("the model defines no eos_token_id: pass DecodeConfig(stop_token_ids=...)")
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def context_limit(model) -> int | None:
    """The number of positions the model supports (``None`` when its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


def _check_context(model, total: int) -> None:
    limit = context_limit(model)
    if limit is not None and total > limit:
        raise ValueError(
            f"prompt + max_new_tokens = {total} positions exceeds the model's context of {limit}: "
            "shorten the prompt or lower max_new_tokens"
        )


def next_token_probs(logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """The sampling distribution ``[batch, vocab]`` from ``[batch, vocab]`` logits.

    Temperature first, then top-k (keep the ``top_k`` largest logits; ties with the k-th are kept, as in
    ``generate``), then top-p (keep the smallest set of most likely tokens whose mass reaches ``top_p``,
    renormalised). Each row is filtered on its own.
    """
    logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < config.top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _pick(logits: torch.Tensor, config: DecodeConfig, generators) -> torch.Tensor:
    """Next token per row from ``[batch, vocab]`` logits."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = next_token_probs(logits, config)
    # one generator per row, so an item's sample does not depend on its batch neighbours
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: DecodeConfig = DecodeConfig(),
    controller: Controller | None = None,
    seeds: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_finish: Callable[[DecodeResult], None] | None = None,
    history: list[RowHistory | None] | None = None,
) -> DecodeResult:
    """Decode a left-padded batch on one live cache.

    Args:
        model: a causal LM.
        input_ids: ``[batch, prompt_len]`` left-padded prompt ids.
        attention_mask: ``[batch, prompt_len]`` with 0 on padding.
        config: budget and sampling settings.
        controller: optional injector called after every sampled token (see :class:`Controller`).
        seeds: one seed per row for sampling (default: 0 for every row).
        on_step: called with the number of rows still running after each step (progress bars).
        on_finish: if given, finished rows leave the batch (the remaining rows decode faster). Before they
            leave, ``on_finish`` receives a :class:`DecodeResult` of just those rows (``.rows`` = their
            logical indices; ``.state.cache`` a copy of their cache rows), e.g. to read KV features; every
            row reaches it exactly once. The returned result still lists every item, but its
            ``state.cache`` then holds only the rows in ``state.rows``.
        history: per row, what it has already appended (``None``: nothing): those tokens end the row's
            ``input_ids``, are prefilled with the prompt and count as appended (resuming a row, e.g. from a
            stored answer: :mod:`kvlib.replay`). A controller sees them in ``state.tokens``.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must both be [batch, seq]")
    if attention_mask[:, -1].min() == 0:
        raise ValueError("the batch must be left-padded (tokenizer.padding_side = 'left')")
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    batch, prompt_len = input_ids.shape
    history = list(history) if history is not None else [None] * batch
    if len(history) != batch:
        raise ValueError(f"history needs one entry per row ({batch}), got {len(history)}")
    done_before = [h is not None and len(h.tokens) >= config.max_new_tokens for h in history]
    if any(done_before):
        raise ValueError(f"rows {[i for i, d in enumerate(done_before) if d]} have already appended max_new_tokens "
                         f"({config.max_new_tokens}) tokens: there is nothing left to decode for them")
    for i, h in enumerate(history):
        if h is not None and h.tokens and input_ids[i, prompt_len - len(h.tokens):].tolist() != list(h.tokens):
            raise ValueError(f"row {i}: its history tokens must be the last {len(h.tokens)} ids of its input_ids")
    _check_context(model, prompt_len + config.max_new_tokens - min(len(h.tokens) if h else 0 for h in history))
    stop = stop_ids(model, config)
    generators = None
    if config.do_sample:
        seeds = seeds or [0] * batch
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    static = config.static_for(model, device)
    # room for the budget plus the filler columns of a few injections (StaticKV grows if a run needs more),
    # rounded up so that batches of nearby prompt lengths share one captured step
    room = -(-(prompt_len + config.max_new_tokens + 16) // 256) * 256
    cache0 = StaticKV.lend(model, batch, room) if static else None
    fast_step = None
    if static:
        fast_step = CompiledStep(model, compile=config.compile if config.compile is not None
                                 else torch.device(device).type == "cuda")
    logits, cache = step_logits(model, input_ids, attention_mask, prefill_positions(attention_mask), cache0)
    stats_next = None  # the step statistics, when the compiled step computed them already
    reported: set[int] = set()  # rows already handed to on_finish (a static cache keeps them in the batch)
    next_pos = attention_mask.sum(-1).tolist()  # next position id of each cache row
    state = DecodeState(
        model=model,
        cache=cache,
        attention_mask=attention_mask,
        step=-1,
        tokens=[[] for _ in range(batch)],
        slots=[[] for _ in range(batch)],
        done=[False] * batch,
        prompt_lengths=list(next_pos),
        switches=[[] for _ in range(batch)],
        rows=list(range(batch)),
        withdrawn=[0] * batch,
    )
    max_prob = [[] for _ in range(batch)]
    entropy = [[] for _ in range(batch)]
    sampled = [[] for _ in range(batch)]
    finish = ["length"] * batch
    for i, h in enumerate(history):
        if h is None or not h.tokens:
            continue
        n = len(h.tokens)
        state.tokens[i], state.slots[i] = list(h.tokens), list(range(prompt_len - n, prompt_len))
        state.prompt_lengths[i] -= n
        state.switches[i], state.withdrawn[i] = [tuple(x) for x in h.switches], h.withdrawn
        sampled[i], max_prob[i], entropy[i] = list(h.sampled), list(h.max_prob), list(h.entropy)

    def partial(phys: list[int]) -> DecodeResult:
        """The results of cache rows ``phys`` (a copy of their cache when others stay in the batch)."""
        rows = [state.rows[p] for p in phys]
        whole = phys == list(range(len(state.rows)))
        sub = DecodeState(model=model, cache=state.cache if whole else rows_view(state.cache, phys),
                          attention_mask=state.attention_mask[phys], step=state.step,
                          tokens=[state.tokens[i] for i in rows], slots=[state.slots[i] for i in rows],
                          done=[state.done[i] for i in rows], prompt_lengths=[state.prompt_lengths[i] for i in rows],
                          switches=[state.switches[i] for i in rows], rows=list(range(len(rows))),
                          withdrawn=[state.withdrawn[i] for i in rows])
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return DecodeResult(tokens=sub.tokens, max_prob=pick(max_prob), entropy=pick(entropy),
                            sampled_mask=pick(sampled), finish_reason=pick(finish), switches=sub.switches,
                            state=sub, rows=rows)

    # Until every row is done: a running row gains a sampled token per step, so this takes at most
    # max_new_tokens steps, plus one per token a controller withdraws.
    for step in itertools.count():
        # one device-to-host copy per step: max prob, entropy and token id (ids < 2**24 are exact in fp32)
        if stats_next is None:
            stats_next = token_stats(logits)
        if config.do_sample:
            stats_next = torch.cat([stats_next[:2], _pick(logits, config, generators).to(stats_next.dtype)[None]])
        stats, stats_next = stats_next.tolist(), None
        mp, ent, picked = stats[0], stats[1], [int(t) for t in stats[2]]
        state.step = step
        pending: list[list[int]] = [[] for _ in range(batch)]
        for p, i in enumerate(state.rows):
            if state.done[i]:
                continue
            state.tokens[i].append(picked[p])
            sampled[i].append(True)
            max_prob[i].append(mp[p])
            entropy[i].append(ent[p])
            pending[i].append(picked[p])
            if picked[p] in stop:
                state.done[i], finish[i] = True, "stop"
            elif len(state.tokens[i]) >= config.max_new_tokens:
                state.done[i] = True
        if controller is not None:
            for i, action in controller(state).items():
                ids, label, n_back = (*action, 0) if len(action) == 2 else action
                if state.done[i] or not ids:
                    if n_back and not state.done[i]:
                        raise ValueError(f"row {i}: withdrawing tokens needs text to inject in their place "
                                         "(a row must feed something at every step)")
                    continue
                if n_back:
                    attention_mask = _withdraw(state, i, n_back, pending[i], sampled[i], max_prob[i], entropy[i],
                                               attention_mask, next_pos)
                room = config.max_new_tokens - len(state.tokens[i])
                ids = list(ids)[:room]
                state.switches[i].append((len(state.tokens[i]), label))
                state.tokens[i].extend(ids)
                sampled[i].extend([False] * len(ids))
                pending[i].extend(ids)
                if len(state.tokens[i]) >= config.max_new_tokens:
                    state.done[i] = True
        if on_step is not None:
            on_step(sum(not d for d in state.done))
        if all(state.done):
            break
        if on_finish is not None and static:
            # A static cache keeps finished rows (masked filler): they are handed over in groups, and stay.
            gone = [p for p, i in enumerate(state.rows) if state.done[i] and i not in reported]
            if gone and len(gone) >= max(1, len(state.rows) // 4):
                on_finish(partial(gone))
                reported.update(state.rows[p] for p in gone)
        elif on_finish is not None:
            # Rows leave in groups (each regroup copies the cache): once a quarter of the batch is done.
            gone = [p for p, i in enumerate(state.rows) if state.done[i]]
            if gone and len(gone) >= max(1, len(state.rows) // 4):
                on_finish(partial(gone))
                keep = [p for p in range(len(state.rows)) if p not in gone]
                keep_rows(cache, keep)
                attention_mask, next_pos = attention_mask[keep], [next_pos[p] for p in keep]
                if generators is not None:
                    generators = [generators[p] for p in keep]
                state.rows = [state.rows[p] for p in keep]
                state.attention_mask = attention_mask
        # A finished row is never fed again (masked filler), so its last token has no cache slot,
        # exactly as when it is decoded alone. The chunk is built on the host and copied once (a GPU
        # decode step is launch-bound: per-row copies would cost more than the check they serve).
        feed = [[] if state.done[i] else pending[i] for i in state.rows]
        width = max(len(f) for f in feed)
        base = attention_mask.shape[1]
        ids_l, mask_l, pos_l = [], [], []
        for p, (i, f) in enumerate(zip(state.rows, feed)):
            pad, start = width - len(f), next_pos[p]
            ids_l.append([0] * pad + f)
            mask_l.append([0] * pad + [1] * len(f))
            pos_l.append([start] * pad + list(range(start, start + len(f))))
            state.slots[i].extend(range(base + pad, base + width))
            next_pos[p] = start + len(f)
        chunk = torch.tensor(ids_l, dtype=torch.long, device=device)
        chunk_mask = torch.tensor(mask_l, dtype=torch.long, device=device)
        positions = torch.tensor(pos_l, dtype=torch.long, device=device)
        attention_mask = torch.cat([attention_mask, chunk_mask], dim=1)
        state.attention_mask = attention_mask
        if fast_step is not None and width == 1:
            logits, stats_next = fast_step(chunk, attention_mask, positions, cache)
        else:
            logits, cache = step_logits(model, chunk, attention_mask, positions, cache)
        state.cache = cache

    if on_finish is not None and state.rows:
        rest = [p for p, i in enumerate(state.rows) if i not in reported]
        if rest:
            on_finish(partial(rest))
    return DecodeResult(
        tokens=state.tokens,
        max_prob=max_prob,
        entropy=entropy,
        sampled_mask=sampled,
        finish_reason=finish,
        switches=state.switches,
        state=state,
    )


def _withdraw(state: DecodeState, i: int, n: int, pending: list[int], sampled: list[bool], max_prob: list[float],
              entropy: list[float], attention_mask: torch.Tensor, next_pos: list[int]) -> torch.Tensor:
    """Take back row ``i``'s last ``n`` sampled tokens; returns the (new) attention mask.

    Tokens not fed yet leave the pending chunk; fed ones keep their cache slots but are masked out (like
    filler) and the row's next position id rewinds, so what follows sees exactly what it would see had they
    never been sampled.
    """
    if not 0 < n <= len(state.tokens[i]) or not all(sampled[-n:]):
        raise ValueError(f"row {i}: a controller may withdraw only the row's own last sampled tokens "
                         f"(asked for {n}, the row has {len(state.tokens[i])} tokens); withdraw fewer")
    unfed = min(n, len(pending))
    del pending[len(pending) - unfed:]
    fed = n - unfed
    if fed:
        p = state.cache_row(i)
        cols = state.slots[i][-fed:]
        del state.slots[i][-fed:]
        attention_mask = attention_mask.clone()  # never write into a tensor the caller may hold
        attention_mask[p, cols] = 0
        state.attention_mask = attention_mask
        next_pos[p] -= fed
    del state.tokens[i][-n:], sampled[-n:], max_prob[-n:], entropy[-n:]
    state.withdrawn[i] += n
    return attention_mask
