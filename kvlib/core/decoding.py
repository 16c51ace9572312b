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

On a GPU the loop decodes on a static cache (:class:`kvlib.core.cache.StaticKV`) and the common step, one token
per row, is a captured CUDA graph (:class:`kvlib.core.cache.CompiledStep`): a step then costs one graph launch
instead of one launch per kernel, which is what bounds a small model's decoding. Chunks of injected text and
DEER trials run eagerly on the same cache. Finished rows stay in a static batch (masked filler, as when no
row leaves): on a GPU, copying the cache to drop them costs more than decoding them. ``on_finish`` still
receives every row once, when a quarter of the batch is done and at the end.

One loop, :class:`DecodeLoop`, does all of this (append a step's tokens, apply the controller's actions,
retire finished rows, let waiting rows join, feed the next step); :func:`decode` runs it over one batch,
:func:`decode_stream` over a queue of items (continuous batching: when rows finish, waiting items take their
place instead of the batch draining to its longest row), and :class:`kvlib.runs.replay.ReplayLoop` with tokens
forced from stored answers. A joining row is prefilled on its own and right-aligned to the batch's write
position, its earlier cache columns masked; columns no live row attends to any more are dropped first, and a
static cache is resized to the need in buckets of 256 positions (one captured step per bucket).
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from .cache import (CompiledStep, StaticKV, bucket, crop_cache, forward, keep_rows, merge_rows, move_columns,
                    rows_view, step_logits, supports_static, token_stats, write_rows)
from .phases import phase

if TYPE_CHECKING:
    from transformers import DynamicCache

__all__ = ["compile_default", "compile_dynamic", "DecodeConfig",
           "DecodeState", "DecodeResult", "Controller", "RowHistory", "DecodeLoop", "decode",
           "decode_stream", "filler_rows", "can_stream", "prefill", "prefill_logits",
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
        cache: ``"static"`` decodes on a preallocated :class:`kvlib.core.cache.StaticKV` (finished rows stay in the
            batch, masked), ``"dynamic"`` on a growing ``DynamicCache`` (finished rows can leave); ``"auto"``:
            static on CUDA for a model with full attention only, else dynamic.
        prefill_tokens: at most this many tokens (rows x columns) per prefill forward: a longer batch of prompts
            is prefilled in chunks of columns on the same cache (same result, a fraction of the activation
            memory: a batch of 512 MATH prompts, 780 columns wide, holds 7 GB in one MLP intermediate of the
            1.5B model otherwise). ``None``: one forward.
        compile: capture the one-token step on a static cache (:class:`kvlib.core.cache.CompiledStep`, CUDA
            graphs); ``None``: as :func:`compile_default` says (on a GPU unless ``$KVLIB_COMPILE=0``).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    cache: str = "auto"
    prefill_tokens: int | None = 1 << 16
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
        if self.prefill_tokens is not None and (isinstance(self.prefill_tokens, bool) or self.prefill_tokens < 1):
            raise ValueError(f"prefill_tokens must be a positive number of tokens or None, not {self.prefill_tokens!r}")
        if self.compile and self.cache == "dynamic":
            raise ValueError("compile=True needs a static cache: set cache='static' (or 'auto' on a GPU)")

    def static_for(self, model, device) -> bool:
        """Whether decoding ``model`` on ``device`` uses a static cache under this config."""
        if self.cache == "auto":  # a model spread over devices (device_map) decodes eagerly on a dynamic cache
            spread = len(set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))) > 1
            return torch.device(device).type == "cuda" and supports_static(model) and not spread
        return self.cache == "static"


_COMPILE_VALUES = {"1": True, "on": True, "true": True, "dynamic": True, "static": True,
                   "0": False, "off": False, "false": False}


def compile_default(device) -> bool:
    """Whether a static-cache decode on ``device`` captures its step when :attr:`DecodeConfig.compile` is ``None``.

    On a GPU it does, unless ``$KVLIB_COMPILE=0``; on a CPU never (a compile costs more than it saves there). The
    eager step at the notebooks' batch of 512 rows was about four times slower per token (the 1.5B model's 1,319
    GSM8K slow answers took 298 s eagerly on an H100 beside a second run), and with symbolic shapes
    (:func:`compile_dynamic`) a new shape costs a capture, not a compile; ``benchmarks/compile_policy.py``
    measures the three on a GPU.

    ``$KVLIB_COMPILE=static`` compiles once per batch size and cache capacity instead of once with symbolic
    shapes (:func:`compile_dynamic`).

    Raises:
        ValueError: ``$KVLIB_COMPILE`` is set to something other than 1/0 (on/off, true/false) or static/dynamic.
    """
    return _COMPILE_VALUES.get(_compile_setting(), True) and torch.device(device).type == "cuda"


def compile_dynamic() -> bool:
    """Whether a captured step is compiled once for every batch size and cache capacity (symbolic shapes, the
    default: a new shape costs a CUDA-graph capture, not a compile) or, with ``$KVLIB_COMPILE=static``, once per
    shape (each about 40 s for the embedded models on an H100)."""
    return _compile_setting() != "static"


def _compile_setting() -> str:
    """``$KVLIB_COMPILE``, normalised ("" when unset), after checking it is one of :data:`_COMPILE_VALUES`."""
    raw = os.environ.get("KVLIB_COMPILE", "").strip().lower()
    if raw and raw not in _COMPILE_VALUES:
        raise ValueError(f"KVLIB_COMPILE={os.environ['KVLIB_COMPILE']!r}: set it to 1 (capture the decode step "
                         "on a GPU, compiled once for all shapes), static (compiled once per batch size and cache "
                         "capacity) or 0 (run it eagerly), or unset it")
    return raw


class _WarmedStep(CompiledStep):
    """:class:`~kvlib.core.cache.CompiledStep` whose call that compiles and captures a shape (the first for each
    batch and cache capacity of a model in this process, or one that grows the cache) is timed as the phase
    ``compile warm-up`` (:mod:`kvlib.core.phases`); the other calls cost one set lookup more."""

    def __init__(self, model, compile: bool):
        super().__init__(model, compile, dynamic=compile_dynamic())
        self.warm = _WARM.setdefault(model, set()) if compile else None  # (batch, capacity) already compiled

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: StaticKV) -> tuple[torch.Tensor, torch.Tensor]:
        if self.warm is None or (cache.length + input_ids.shape[1] <= cache.capacity
                                 and (input_ids.shape[0], cache.capacity) in self.warm):
            return super().__call__(input_ids, attention_mask, position_ids, cache)
        with phase("compile warm-up"):
            out = super().__call__(input_ids, attention_mask, position_ids, cache)
        self.warm.add((input_ids.shape[0], cache.capacity))
        return out


_WARM: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(batch, capacity)} compiled once


@dataclass(frozen=True)
class RowHistory:
    """What one row has already appended after its prompt, to resume decoding it (see :mod:`kvlib.runs.replay`).

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
            ``DynamicCache``, or a :class:`kvlib.core.cache.StaticKV` (read both with
            :func:`kvlib.core.cache.cache_layers`).
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
        prompt_ids, prompt_mask: in the partial results only, ``[len(rows), end]``: the rows' inputs (prompt and
            history) right-aligned to the cache column ``end`` where they end, 0 / masked before: what an extractor
            receives as ``input_ids`` / ``attention_mask`` (cache columns ``0 .. end-1``).
    """

    tokens: list[list[int]]
    max_prob: list[list[float]]
    entropy: list[list[float]]
    sampled_mask: list[list[bool]]
    finish_reason: list[str]
    switches: list[list[tuple[int, str]]]
    state: DecodeState
    rows: list[int] | None = None
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None

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
        The model output; its cache via :func:`kvlib.core.cache.output_cache`.
    """
    device = next(model.parameters()).device
    attention_mask = attention_mask.to(device)
    cache = False if kwargs.pop("use_cache", True) is False else kwargs.pop("cache", None)
    out, _ = forward(model, input_ids.to(device), attention_mask, prefill_positions(attention_mask), cache,
                     logits_to_keep=kwargs.pop("logits_to_keep", 0), **kwargs)
    return out


def prefill_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None,
                   max_tokens: int | None = None) -> tuple[torch.Tensor, object]:
    """Prefill a left-padded batch ``[batch, width]`` into ``cache`` (a new one when ``None``) and return the last
    position's logits ``[batch, vocab]`` (fp32) with the cache, in chunks of columns of at most ``max_tokens``
    tokens (rows x columns) each: every chunk attends to the cache the earlier ones wrote, so the result is the
    one-forward prefill's (up to the summation order of the kernels) at a fraction of its activation memory."""
    positions = prefill_positions(attention_mask)
    rows, width = input_ids.shape
    cols = width if max_tokens is None else max(1, max_tokens // max(rows, 1))
    if cols >= width:
        return step_logits(model, input_ids, attention_mask, positions, cache)
    logits = None
    for s in range(0, width, cols):
        e = min(width, s + cols)
        logits, cache = step_logits(model, input_ids[:, s:e], attention_mask[:, :e], positions[:, s:e], cache)
    return logits, cache


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


class DecodeLoop:
    """The one decoding loop: append a step's tokens, apply controller actions, retire finished rows, let waiting
    rows join, feed the next step. :func:`decode` runs it over one batch, :func:`decode_stream` over a queue.

    Rows are *logical* (their place in the order they entered; every per-item list of :attr:`state`) or *physical*
    (their row in the cache and the attention mask, ``state.rows[p]`` is the logical row of physical row ``p``).
    On a dynamic cache finished rows leave (``keep_rows``) and joining rows are appended; on a static cache the
    physical rows stay and a joining row takes the place of a retired one. A joining row is prefilled on its own
    and right-aligned to the batch's write position, its earlier columns masked, so it sees exactly the cache it
    would see alone; columns that no live row attends to are dropped first (compaction).

    Greedy decoding without a controller on a GPU launches step ``t+1`` from the device's greedy picks before the
    host reads step ``t`` (:attr:`lookahead`): the host's bookkeeping then overlaps the device's step instead of
    idling it. A row found finished gets that step's column masked; when rows must leave or join, the launched
    step is taken back (the cache cropped) and the loop goes on step by step. Results are identical (tested).
    """

    def __init__(self, model, config: DecodeConfig, controller: Controller | None = None, static: bool = False,
                 room: int = 0):
        self.model, self.config, self.controller, self.static, self.room = model, config, controller, static, room
        self.device = next(model.parameters()).device
        self.stop = stop_ids(model, config)
        self.fast_step = None
        if static:
            self.fast_step = _WarmedStep(model, compile=config.compile if config.compile is not None
                                         else compile_default(self.device))
        self.state = DecodeState(model=model, cache=None, attention_mask=None, step=-1, tokens=[], slots=[], done=[],
                                 prompt_lengths=[], switches=[], rows=[], withdrawn=[])
        self.max_prob: list[list[float]] = []
        self.entropy: list[list[float]] = []
        self.sampled: list[list[bool]] = []
        self.finish: list[str] = []
        self.inputs: list[torch.Tensor] = []  # per logical row: its input ids (prompt and history), real tokens
        self.input_end: list[int] = []  # per logical row: the cache column after its input
        self.next_pos: list[int] = []  # per physical row: the next position id
        self.generators: list | None = None  # per physical row, when sampling
        self.pending: dict[int, list[int]] = {}  # logical row -> tokens to feed next
        self.logits = self.stats = None  # the last step's [rows, vocab] logits (and their stats when computed)
        self.reported: set[int] = set()  # logical rows handed to on_finish
        self.streaming = False  # rows may join: hand over copies of cache rows, never the live cache
        self.rollback = static or supports_static(model)  # a launched step can be taken back (no sliding window)

    # ---- rows entering -------------------------------------------------------------------------------------
    def _new_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds, history) -> tuple[list, list]:
        """Register left-padded rows ``[n, width]`` as new logical rows (their per-item lists); returns their
        indices and their sampling generators (``None`` each when greedy)."""
        st, first, gens = self.state, len(self.state.tokens), []
        width = input_ids.shape[1]
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()  # one copy, then no device sync per row
        for r in range(input_ids.shape[0]):
            h = history[r]
            real = attention_mask[r].bool()
            self.inputs.append(input_ids[r][real])
            st.prompt_lengths.append(int(real.sum()) - (len(h.tokens) if h else 0))
            st.tokens.append(list(h.tokens) if h else [])
            st.slots.append(list(range(width - len(h.tokens), width)) if h else [])
            st.switches.append([tuple(x) for x in h.switches] if h else [])
            st.withdrawn.append(h.withdrawn if h else 0)
            st.done.append(False)
            self.sampled.append(list(h.sampled) if h else [])
            self.max_prob.append(list(h.max_prob) if h else [])
            self.entropy.append(list(h.entropy) if h else [])
            self.finish.append("length")
            self.input_end.append(width)
            gens.append(torch.Generator(device=self.device).manual_seed(int(seeds[r])) if self.config.do_sample
                        else None)
        return list(range(first, first + input_ids.shape[0])), gens

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds, history) -> None:
        """Prefill the first batch (``[batch, width]``, left-padded) into a new cache."""
        st = self.state
        new, gens = self._new_rows(input_ids, attention_mask, seeds, history)
        self.generators = gens if self.config.do_sample else None
        cache = StaticKV.lend(self.model, input_ids.shape[0], self.room) if self.static else None
        self.logits, st.cache = prefill_logits(self.model, input_ids, attention_mask, cache,
                                               self.config.prefill_tokens)
        st.attention_mask, st.rows = attention_mask, new
        self.next_pos = attention_mask.sum(-1).tolist()

    def park(self, rows) -> None:
        """Logical ``rows`` are idle filler from the start: done, never fed a token, never handed to ``on_finish``
        (their physical rows are free for joining items, like those of retired rows)."""
        for i in rows:
            self.state.done[i], self.finish[i] = True, "filler"
            self.reported.add(i)

    def join(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds, free: list[int]) -> None:
        """Rows ``[n, width]`` (left-padded) join the running batch: prefilled on their own, right-aligned to the
        batch's write position (columns no live row attends to dropped first), their first token appended.

        ``free``: physical rows they replace (static cache, at least ``n``), else ``None``: they are appended."""
        st = self.state
        n, width = input_ids.shape
        new, gens = self._new_rows(input_ids, attention_mask, seeds, [None] * n)
        logits, cache = prefill_logits(self.model, input_ids, attention_mask, None, self.config.prefill_tokens)
        mask = st.attention_mask
        taken = set(free or ())
        live = [p for p in range(mask.shape[0]) if p not in taken]
        held = mask.shape[1]
        start = held if not live else int(mask[live].cumsum(-1).eq(0).sum(-1).min())  # first column in use
        end = max(held - start, width)  # the new write position
        shift = end - (held - start)  # how far the kept columns move
        grid = mask.new_zeros((mask.shape[0] + (0 if self.static else n), end))
        grid[: mask.shape[0], shift:] = mask[:, start:]
        if self.static:
            kv, want = st.cache, bucket(end + self.config.max_new_tokens + 16)  # sized to the need, in buckets
            if want > kv.capacity:
                kv.resize(want)
            move_columns(kv, start, shift)
            if want + 512 <= kv.capacity:  # much room to spare after a compaction: a smaller bucket
                kv.resize(want)
            write_rows(kv, free[:n], cache, end)
            phys = free[:n]
            grid[phys] = 0
            idle = [p for p in free[n:] if not grid[p].any()]
            grid[idle, end - 1] = 1  # a retired row left without a column would attend to nothing (NaN)
        else:
            if live:
                merge_rows(st.cache, start, cache, end)
            else:
                st.cache = cache
            phys = list(range(mask.shape[0], mask.shape[0] + n))
        grid[phys, end - width:] = attention_mask
        for p in set(live) & set(range(len(st.rows))):
            i = st.rows[p]
            if shift != start:
                st.slots[i] = [s - start + shift for s in st.slots[i]]
            self.input_end[i] += shift - start
        lengths = attention_mask.sum(-1).tolist()
        for j, (p, i) in enumerate(zip(phys, new)):
            self.input_end[i] = end
            pos = lengths[j]
            if p < len(st.rows):
                st.rows[p], self.next_pos[p] = i, pos
                if self.generators is not None:
                    self.generators[p] = gens[j]
            else:
                st.rows.append(i)
                self.next_pos.append(pos)
                if self.generators is not None:
                    self.generators.append(gens[j])
        st.attention_mask = grid
        self._append(logits, None, phys)

    # ---- one step ------------------------------------------------------------------------------------------
    def _append(self, logits: torch.Tensor, stats: torch.Tensor | None, phys: list[int], host=None) -> None:
        """Append the token each running physical row in ``phys`` picks from ``logits`` (``[len(phys), vocab]``)
        with its statistics (``host``: already copied, see :class:`_Ahead`); mark rows done at a stop token or
        at the budget."""
        if host is not None:
            mp, ent, tok = host.read()
        else:  # one device-to-host copy per step: max prob, entropy and token id (ids < 2**24 are exact in fp32)
            stats = token_stats(logits) if stats is None else stats
            if self.config.do_sample:
                picked = _pick(logits, self.config, [self.generators[p] for p in phys])
                stats = torch.cat([stats[:2], picked.to(stats.dtype)[None]])
            mp, ent, tok = stats.tolist()
        st = self.state  # a plain loop over rows with its lookups bound once: it runs for every row at every step
        rows, done, tokens, pending, stop = st.rows, st.done, st.tokens, self.pending, self.stop
        sampled, max_prob, entropy, budget = self.sampled, self.max_prob, self.entropy, self.config.max_new_tokens
        for k, p in enumerate(phys):
            i = rows[p]
            if done[i]:
                continue
            t = int(tok[k])
            row = tokens[i]
            row.append(t)
            sampled[i].append(True)
            max_prob[i].append(mp[k])
            entropy[i].append(ent[k])
            if i in pending:
                pending[i].append(t)
            else:
                pending[i] = [t]
            if t in stop:
                done[i], self.finish[i] = True, "stop"
            elif len(row) >= budget:
                done[i] = True

    def next_tokens(self, ahead: "_Ahead | None" = None) -> None:
        """Append the tokens of the last step's logits (nothing when no model ran)."""
        if self.logits is not None:
            self._append(self.logits, self.stats, list(range(len(self.state.rows))), host=ahead)
            self.logits = self.stats = None

    # ---- the next step launched before the host reads this one ---------------------------------------------
    lookahead: bool | None = None  # launch step t+1 before reading step t (None: on CUDA)

    def _can_look_ahead(self) -> bool:
        on = self.lookahead if self.lookahead is not None else torch.device(self.device).type == "cuda"
        return (bool(on) and self.controller is None and not self.config.do_sample and self.logits is not None
                and self.rollback)

    def _launch_ahead(self) -> "_Ahead":
        """Greedy, no controller: feed every running row its greedy token straight from the device and start the
        next step before the host has read this one (the host's bookkeeping then overlaps the device's step).
        Rows that turn out to have finished are masked afterwards (:meth:`_settle`)."""
        st = self.state
        stats = token_stats(self.logits) if self.stats is None else self.stats
        ahead = _Ahead(stats, [not st.done[i] for i in st.rows], st.attention_mask)
        col_pos = torch.tensor([[int(r) for r in ahead.running], self.next_pos], dtype=torch.long)[..., None]
        on_cuda = torch.device(self.device).type == "cuda"  # a pinned source: the copy does not wait for the device
        col, positions = (col_pos.pin_memory() if on_cuda else col_pos).to(self.device, non_blocking=on_cuda)
        st.attention_mask = torch.cat([st.attention_mask, col], dim=1)
        ids = stats[2].to(torch.long)[:, None]
        if self.fast_step is not None:
            ahead.logits, ahead.stats = self.fast_step(ids, st.attention_mask, positions, st.cache)
        else:
            ahead.logits, st.cache = step_logits(self.model, ids, st.attention_mask, positions, st.cache)
        return ahead

    def _settle(self, ahead: "_Ahead", on_finish) -> bool:
        """After the host appended the step before ``ahead``: keep the launched step (rows that finished get its
        column masked, so each row's last token has no cache slot, as when it is decoded alone) when no row must
        leave or join now; else take it back. Whether it was kept."""
        st = self.state
        gone = sum(st.done[i] and i not in self.reported for i in st.rows)
        if self.running() and (on_finish is None or gone < max(1, len(st.rows) // 4)):
            base, ended, done, slots, next_pos = ahead.mask.shape[1], [], st.done, st.slots, self.next_pos
            for p, (i, was) in enumerate(zip(st.rows, ahead.running)):
                if was and done[i]:
                    ended.append(p)
                elif was:
                    slots[i].append(base)
                    next_pos[p] += 1
            if ended:
                st.attention_mask[ended, base] = 0
            self.pending = {}
            return True
        crop_cache(st.cache, ahead.mask.shape[1])
        st.attention_mask, self.logits, self.stats = ahead.mask, None, None
        return False

    def control(self) -> None:
        """Ask the controller and apply its actions."""
        self.apply(self.controller(self.state))

    def apply(self, actions: dict[int, tuple]) -> None:
        """Apply controller actions: inject text into rows, after withdrawing their last tokens (a controller
        stops a row by setting ``state.done``)."""
        st = self.state
        for i, action in actions.items():
            ids, label, n_back = (*action, 0) if len(action) == 2 else action
            if st.done[i] or not ids:
                if n_back and not st.done[i]:
                    raise ValueError(f"row {i}: withdrawing tokens needs text to inject in their place "
                                     "(a row must feed something at every step)")
                continue
            if n_back:
                self.pending[i] = self.pending.get(i, [])
                st.attention_mask = _withdraw(st, i, n_back, self.pending[i], self.sampled[i], self.max_prob[i],
                                              self.entropy[i], st.attention_mask, self.next_pos)
            ids = list(ids)[: self.config.max_new_tokens - len(st.tokens[i])]
            st.switches[i].append((len(st.tokens[i]), label))
            st.tokens[i].extend(ids)
            self.sampled[i].extend([False] * len(ids))
            self.pending.setdefault(i, []).extend(ids)
            if len(st.tokens[i]) >= self.config.max_new_tokens:
                st.done[i] = True

    def feed(self) -> None:
        """Feed every running row its pending tokens as one right-aligned chunk (finished rows: masked filler, so
        a row's last token has no cache slot, exactly as when it is decoded alone) and keep the step's logits."""
        st = self.state
        # built on the host and copied once (a GPU decode step is launch-bound: per-row copies cost more)
        feed = [[] if st.done[i] else self.pending.get(i, []) for i in st.rows]
        self.pending = {}
        width, base = max(len(f) for f in feed), st.attention_mask.shape[1]
        ids_l, mask_l, pos_l = [], [], []  # flat, [rows * width] each (one tensor from three flat lists)
        for p, (i, f) in enumerate(zip(st.rows, feed)):
            pad, start = width - len(f), self.next_pos[p]
            ids_l += [0] * pad + f
            mask_l += [0] * pad + [1] * len(f)
            pos_l += [start] * pad + list(range(start, start + len(f)))
            st.slots[i].extend(range(base + pad, base + width))
            self.next_pos[p] = start + len(f)
        chunk, chunk_mask, positions = (torch.tensor([ids_l, mask_l, pos_l], dtype=torch.long)
                                        .view(3, len(feed), width).to(self.device))
        st.attention_mask = torch.cat([st.attention_mask, chunk_mask], dim=1)
        if self.fast_step is not None and width == 1:
            self.logits, self.stats = self.fast_step(chunk, st.attention_mask, positions, st.cache)
        else:
            (self.logits, st.cache), self.stats = step_logits(self.model, chunk, st.attention_mask, positions,
                                                              st.cache), None

    # ---- rows leaving --------------------------------------------------------------------------------------
    def partial(self, phys: list[int]) -> list[DecodeResult]:
        """The results of physical rows ``phys``, one per group of rows whose inputs end at the same cache column
        (a copy of their cache rows when others stay in the batch)."""
        st, out = self.state, []
        for end in sorted({self.input_end[st.rows[p]] for p in phys}):
            group = [p for p in phys if self.input_end[st.rows[p]] == end]
            rows = [st.rows[p] for p in group]
            whole = group == list(range(len(st.rows))) and not self.streaming
            pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
            sub = DecodeState(model=self.model, cache=st.cache if whole else rows_view(st.cache, group),
                              attention_mask=st.attention_mask[group], step=st.step, tokens=pick(st.tokens),
                              slots=pick(st.slots), done=pick(st.done), prompt_lengths=pick(st.prompt_lengths),
                              switches=pick(st.switches), rows=list(range(len(rows))), withdrawn=pick(st.withdrawn))
            ids = torch.zeros((len(rows), end), dtype=torch.long)
            for r, i in enumerate(rows):
                x = self.inputs[i].cpu()
                ids[r, end - len(x):] = x
            mask = (torch.arange(end)[None, :] >= torch.tensor([end - len(self.inputs[i]) for i in rows])[:, None])
            out.append(DecodeResult(tokens=sub.tokens, max_prob=pick(self.max_prob), entropy=pick(self.entropy),
                                    sampled_mask=pick(self.sampled), finish_reason=pick(self.finish),
                                    switches=sub.switches, state=sub, rows=rows, prompt_ids=ids,
                                    prompt_mask=mask.long()))
        return out

    def retire(self, on_finish, force: bool = False) -> list[int]:
        """Hand finished rows to ``on_finish`` once a quarter of the batch is done (or all, ``force``): on a
        dynamic cache they leave it, on a static one they stay as masked filler. Returns the physical rows free
        for joining rows (static cache)."""
        st = self.state
        gone = [p for p, i in enumerate(st.rows) if st.done[i] and i not in self.reported]
        if gone and (force or len(gone) >= max(1, len(st.rows) // 4)):
            for part in self.partial(gone):
                on_finish(part)
            self.reported.update(st.rows[p] for p in gone)
            if not self.static:
                keep = [p for p in range(len(st.rows)) if p not in gone]
                if keep:
                    keep_rows(st.cache, keep)
                st.attention_mask, self.next_pos = st.attention_mask[keep], [self.next_pos[p] for p in keep]
                if self.generators is not None:
                    self.generators = [self.generators[p] for p in keep]
                st.rows = [st.rows[p] for p in keep]
        return [p for p, i in enumerate(st.rows) if i in self.reported]

    def running(self) -> int:
        """How many rows in the batch are still decoding."""
        return sum(not self.state.done[i] for i in self.state.rows)

    def result(self) -> DecodeResult:
        """Every logical row's outputs (``state`` the live state: its cache holds the rows in ``state.rows``)."""
        st = self.state
        return DecodeResult(tokens=st.tokens, max_prob=self.max_prob, entropy=self.entropy, sampled_mask=self.sampled,
                            finish_reason=self.finish, switches=st.switches, state=st)

    def run(self, on_step=None, on_finish=None, waiting: "_Queue | None" = None) -> DecodeResult:
        """Step until every row (and every waiting one) is done. A running row gains a sampled token per step, so
        a row takes at most ``max_new_tokens`` steps, plus one per token a controller withdraws."""
        for step in itertools.count():
            self.state.step = step
            ahead = self._launch_ahead() if self._can_look_ahead() else None
            self.next_tokens(ahead)
            if ahead is not None:
                self.logits, self.stats = ahead.logits, ahead.stats
            if self.controller is not None:
                self.control()
            if on_step is not None:
                on_step(self.running())
            if ahead is not None and self._settle(ahead, on_finish):
                continue
            if not self._turn_over(on_finish, waiting):
                break
            self.feed()
        if on_finish is not None:
            rest = [p for p, i in enumerate(self.state.rows) if i not in self.reported]
            for part in self.partial(rest) if rest else []:
                on_finish(part)
        return self.result()

    def _turn_over(self, on_finish, waiting) -> bool:
        """Retire finished rows and let waiting ones join; whether any row is left to feed."""
        while True:
            if not self.running() and not waiting:
                return False
            if on_finish is not None:
                free = self.retire(on_finish, force=not self.running())
                if waiting:
                    quarter = max(1, waiting.batch_size // 4)
                    room = len(free) if self.static else waiting.batch_size - len(self.state.rows)
                    if room >= quarter or (room and not self.running()):
                        waiting.join(self, room, free if self.static else None)
            if self.running():
                return True

class _Ahead:
    """A step launched before the host read the one before it: that step's statistics on their way to the host
    (copied before the launch, so the host waits for them only), who was running and the mask before it."""

    def __init__(self, stats: torch.Tensor, running: list[bool], mask: torch.Tensor):
        self.running, self.mask = running, mask
        on_cuda = stats.device.type == "cuda"
        self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=on_cuda)
        self.host.copy_(stats, non_blocking=on_cuda)
        self.event = torch.cuda.Event() if on_cuda else None
        if self.event is not None:  # on the stream of the statistics' device (a model may span several)
            self.event.record(torch.cuda.current_stream(stats.device))
        self.logits = self.stats = None

    def read(self) -> list[list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class _Queue:
    """Items waiting to join a continuous batch: their token ids and seeds, taken in order."""

    def __init__(self, items: list[list[int]], seeds: list[int], batch_size: int, pad_id: int):
        self.items, self.seeds, self.batch_size, self.pad_id, self.next = items, seeds, batch_size, pad_id, 0

    def __len__(self) -> int:
        return len(self.items) - self.next

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The next ``n`` items, left-padded (``[n, width]`` ids and mask), and their seeds."""
        part = self.items[self.next: self.next + n]
        seeds = self.seeds[self.next: self.next + n]
        self.next += len(part)
        width = max(len(x) for x in part)
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + list(x) for x in part], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in part], dtype=torch.long)
        return ids, mask, seeds

    def join(self, loop: DecodeLoop, n: int, free: list[int] | None) -> None:
        """Up to ``n`` waiting items join ``loop`` (in physical rows ``free`` of a static cache)."""
        ids, mask, seeds = self.take(n)
        loop.join(ids.to(loop.device), mask.to(loop.device), seeds, free)


def _check_batch(model, input_ids, attention_mask, config: DecodeConfig, history) -> list:
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must both be [batch, seq]")
    if attention_mask[:, -1].min() == 0:
        raise ValueError("the batch must be left-padded (tokenizer.padding_side = 'left')")
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
    return history


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
    """Decode a left-padded batch on one live cache (:class:`DecodeLoop`).

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
            stored answer: :mod:`kvlib.runs.replay`). A controller sees them in ``state.tokens``.
    """
    history = _check_batch(model, input_ids, attention_mask, config, history)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    batch, prompt_len = input_ids.shape
    static = config.static_for(model, device)
    # room for the budget plus the filler columns of a few injections (StaticKV grows if a run needs more),
    # bucketed so that batches of nearby prompt lengths share one captured step
    loop = DecodeLoop(model, config, controller, static=static, room=bucket(prompt_len + config.max_new_tokens + 16))
    loop.start(input_ids, attention_mask, seeds or [0] * batch, history)
    return loop.run(on_step=on_step, on_finish=on_finish)


def can_stream(model) -> bool:
    """Whether :func:`decode_stream` can decode ``model`` (rows join only a full-attention cache)."""
    return supports_static(model)


@torch.inference_mode()
def decode_stream(
    model,
    items: list[list[int]],
    on_finish: Callable[[DecodeResult], None],
    config: DecodeConfig = DecodeConfig(),
    batch_size: int = 16,
    seeds: list[int] | None = None,
    pad_id: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Continuous batching: decode ``items`` (token ids of each prompt, in the order they should start) with at most
    ``batch_size`` rows at a time; when rows finish, waiting items join the running batch instead of the batch
    draining to its longest row. Every item's output equals decoding it alone (greedy: token for token).

    ``on_finish`` receives each finished row once (:class:`DecodeResult` of a few rows, ``.rows`` their indices in
    ``items``, ``.prompt_ids`` / ``.prompt_mask`` their inputs right-aligned to where they end in the cache), while
    their cache rows are alive: read features there. Items should be sorted by length (less padding).
    Needs a full-attention model (:func:`can_stream`). Returns every item's outputs (``state``: the last batch).
    """
    if not items:
        raise ValueError("decode_stream needs at least one item")
    if not can_stream(model):
        raise ValueError(f"{type(model).__name__} has sliding-window or non-attention layers: rows cannot join its "
                         "cache; decode it in fixed batches (decode)")
    _check_context(model, max(map(len, items)) + config.max_new_tokens)
    device = next(model.parameters()).device
    seeds = list(seeds) if seeds is not None else [0] * len(items)
    queue = _Queue([list(map(int, x)) for x in items], seeds, batch_size, pad_id)
    ids, mask, first_seeds = queue.take(min(batch_size, len(items)))
    longest = max(map(len, items))
    static = config.static_for(model, device)
    n = ids.shape[0]
    fill = filler_rows(n, batch_size) if static and not len(queue) else 0
    if fill:  # a batch of a bucketed size: one compiled step serves sets of nearby sizes
        ids = torch.cat([ids, torch.full((fill, ids.shape[1]), pad_id, dtype=ids.dtype)])
        mask = torch.cat([mask, torch.zeros((fill, ids.shape[1]), dtype=mask.dtype)])
        mask[n:, -1] = 1  # one column each, so a filler row attends to something (no NaN); never read
        first_seeds = list(first_seeds) + [0] * fill
    room = bucket(max(ids.shape[1], longest) + config.max_new_tokens + 16)
    loop = DecodeLoop(model, config, static=static, room=room)
    loop.start(ids.to(device), mask.to(device), first_seeds, [None] * ids.shape[0])
    loop.park(range(n, n + fill))
    loop.streaming = True
    result = loop.run(on_step=on_step, on_finish=on_finish, waiting=queue)
    if fill:
        result = DecodeResult(tokens=result.tokens[:n], max_prob=result.max_prob[:n], entropy=result.entropy[:n],
                              sampled_mask=result.sampled_mask[:n], finish_reason=result.finish_reason[:n],
                              switches=result.switches[:n], state=result.state)
    return result


def filler_rows(n: int, batch_size: int) -> int:
    """How many idle rows pad a static batch of ``n`` rows (all the items there are; at most ``batch_size``) to
    the next power of two, at most ``batch_size``: a compiled step is captured once per batch size and cache
    capacity (tens of seconds each on a GPU), so sets of 400, 493 and 500 items share the step of 512 rows
    instead of compiling three times. Idle rows are done from the start and never reported."""
    return max(min(batch_size, 1 << max(n - 1, 0).bit_length()) - n, 0)


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
