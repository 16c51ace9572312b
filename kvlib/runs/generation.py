"""Batched, resumable generation over a data set, one stored record per finished item.

:func:`generate` renders nothing itself: it takes ready prompt strings (see :mod:`kvlib.switching.thinking`),
sorts them by length and decodes them with continuous batching (:func:`kvlib.core.decoding.decode_stream`: at most
``batch_size`` rows at a time, waiting items joining as rows finish; fixed left-padded batches of
:func:`kvlib.core.decoding.decode` under a controller, or for a model with sliding-window layers), runs the
requested *extractors* on each finished row's cache while it still exists (KV trajectories, pooled features,
a hidden-state re-forward...), and appends its record to a :class:`~kvlib.runs.store.ResultStore` as soon as the
item finishes. Items already in the store are skipped, so a killed run resumes
where it stopped. Results never depend on batch composition (tested: batched == one at a time).

Before reusing anything, :func:`generate` binds the store to the model it runs (weights, dtype, device
kind, tokenizer: :func:`kvlib.runs.identity.model_identity`), checks that the store was opened for its
settings and extractors (with their parameters), and checks each stored item's prompt hash against the
prompt it is given now. A store of another model is another file; other settings or a changed prompt
are errors naming what differs.

A record holds: ``item_id``, ``prompt``, ``input_sha256`` (hash of the prompt), ``output`` (decoded
text), ``token_ids``, ``n_tokens``, ``finish_reason`` (``stop`` | ``length``), per sampled token
``max_prob`` and ``entropy`` (base 2), ``switches`` and, per extractor, its arrays (in the store's binary
sidecar, see :mod:`kvlib.runs.store`; read them with :func:`record_array`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.decoding import Controller, DecodeConfig, DecodeResult, can_stream, context_limit, decode, decode_stream
from ..core.phases import add as add_phase
from ..core.phases import phase
from .identity import callable_identity, digest, model_identity
from .sharding import SINGLE, Shard, current_shard, run_sharded
from .store import ResultStore, decode_array

__all__ = ["Prompt", "GenerationSettings", "Extractor", "generate", "open_store", "record_array", "decode_config",
           "prompt_hash", "make_record", "prepare_store"]

# An extractor reads per-row arrays from a finished batch while its cache is alive:
# (model, result, input_ids, attention_mask) -> one dict of numpy arrays per row.
Extractor = Callable[[torch.nn.Module, DecodeResult, torch.Tensor, torch.Tensor], list[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Prompt:
    """One item to generate for: a stable id and the fully rendered prompt text."""

    id: str
    text: str


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that changes what is generated (hashed into the store's run identity).

    ``batch_size`` is not part of the identity: the generated tokens do not depend on it, but extractor arrays
    (hidden states, KV features) may differ by up to ~2e-4 relative between batch sizes (bf16 and fp32 batched
    matrix products sum in another order for another batch shape); a store keeps the arrays of the batch size
    that first computed each item.
    """

    max_new_tokens: int = 384
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: always decode max_new_tokens

    def identity(self, extractors: Mapping[str, Extractor] | None = None) -> dict:
        """These settings plus, per extractor name, where the extractor is defined and its parameters."""
        if extractors is not None and not isinstance(extractors, Mapping):
            raise TypeError("pass the extractors themselves ({name: extractor}), not their names: their "
                            "parameters are part of the store identity")
        return {**asdict(self), "extractors": {k: callable_identity(v) for k, v in sorted((extractors or {}).items())}}


def decode_config(settings: GenerationSettings, stop_token_ids=None) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        stop_token_ids=() if settings.ignore_eos else stop_token_ids,
    )


def record_array(record: Mapping, name: str) -> np.ndarray:
    """An array stored by an extractor in ``record`` (``KeyError`` naming what is there otherwise)."""
    arrays = record.get("arrays", {})
    if name not in arrays:
        raise KeyError(f"record {record.get('item_id')!r} has no array {name!r}; it has {sorted(arrays)}")
    return decode_array(arrays[name])


def prompt_hash(text: str) -> str:
    """The per-item input hash a generation record stores (``input_sha256``) and checks on reuse."""
    return digest(text.encode())


def _item_seed(seed: int, item_id: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(item_id.encode()[-8:].rjust(8, b"\0"), "little")) % (2**63)


@phase("generation")
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    store: ResultStore,
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 16,
    extractors: Mapping[str, Extractor] | None = None,
    controller_factory: Callable[[list[Prompt]], Controller] | None = None,
    progress: bool = True,
    desc: str | None = None,
    shard: Shard | None = None,
) -> list[dict]:
    """Generate for every prompt not yet in ``store``; return all records in the order of ``prompts``.

    Args:
        store: opened with these ``settings`` and ``extractors`` (see :func:`open_store`); an unbound store
            is bound to ``model`` here, a bound one must be of this model.
        extractors: name -> function run on each finished batch (its arrays go into the record).
        controller_factory: builds a decoding controller for a batch (adaptive generation; the caller puts
            its settings into the store identity).
        progress: show a tqdm bar counting finished items and generated tokens.
        shard: this process's share of a launched run (:mod:`kvlib.runs.sharding`); ``None``: from ``RANK`` and
            ``WORLD_SIZE`` (one process when unset). With several, this process generates its items into its shard
            file, waits for the others, and every process returns all records (rank 0 merges them into ``store``).

    Raises:
        StoreMismatchError: the store is of another model or settings, or a stored item's prompt differs
            from the one given now (nothing is generated).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}: set the profile's batch_size "
                         "(or the batch_size argument) to 1 or more")
    extractors = dict(extractors or {})
    ids = _unique_ids(prompts)
    shard = current_shard() if shard is None else shard
    if shard.world > 1:
        def work(target: ResultStore, part: list[Prompt]) -> None:
            generate(model, tokenizer, part, target, settings, batch_size=batch_size, extractors=extractors,
                     controller_factory=controller_factory, progress=progress,
                     desc=f"{desc or store.dataset} ({shard})", shard=SINGLE)

        def check(missing: list[Prompt]) -> None:  # every rank refuses what a single run would, before any work
            lengths = {p.id: len(tokenizer(p.text, add_special_tokens=False).input_ids) for p in missing}
            _check_lengths(model, lengths, settings.max_new_tokens)

        return run_sharded(store, prompts, {p.id: prompt_hash(p.text) for p in prompts}, shard,
                           model_identity(model, tokenizer), settings.identity(extractors), work, check=check)
    hashes = prepare_store(model, tokenizer, store, settings, extractors, prompts)
    todo = [p for p in prompts if p.id not in store]
    if todo and store.readonly:
        raise PermissionError(f"{len(todo)} item(s) are missing from {store.path}, which is open readonly (or "
                              "closed): open the store without readonly=True to generate them")
    if todo:
        if tokenizer.padding_side != "left":
            tokenizer.padding_side = "left"
        lengths = {p.id: len(tokenizer(p.text, add_special_tokens=False).input_ids) for p in todo}
        _check_lengths(model, lengths, settings.max_new_tokens)
        todo.sort(key=lambda p: lengths[p.id])  # similar lengths share a batch: less padding
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc or store.dataset,
                   unit="item", disable=not progress, dynamic_ncols=True)
        run = _Run(model, tokenizer, store, settings, extractors, hashes, bar)
        if controller_factory is None and can_stream(model):
            run.stream(todo, batch_size)
        else:
            for start in range(0, len(todo), batch_size):
                run.batch(todo[start : start + batch_size], controller_factory)
        bar.close()
        for name, (seconds, calls) in run.extracted.items():  # already inside the generation phase's seconds
            add_phase(f"extract {name}", seconds, calls)
    return store.records(ids)


class _Run:
    """One generation run into ``store``: decodes items and stores each record as its item finishes."""

    def __init__(self, model, tokenizer, store, settings, extractors, hashes, bar):
        self.model, self.tokenizer, self.store, self.settings = model, tokenizer, store, settings
        self.extractors, self.hashes, self.bar = extractors, hashes, bar
        self.config = decode_config(settings)
        self.n_tok, self.t0 = 0, time.perf_counter()
        self.extracted = {name: [0.0, 0] for name in extractors}  # name -> [seconds, calls] of this run

    def extract(self, part: DecodeResult, input_ids, attention_mask) -> tuple[list[dict], dict]:
        """The extractors' arrays per row of ``part`` (read while its cache is alive) and their seconds."""
        arrays, seconds = [dict() for _ in part.rows], dict.fromkeys(self.extractors, 0.0)
        for name, fn in self.extractors.items():
            t = time.perf_counter()
            for row, a in zip(arrays, fn(self.model, part, input_ids, attention_mask)):
                row.update(a)
            seconds[name] += time.perf_counter() - t
            self.extracted[name][0] += seconds[name]  # one call per name: this call's seconds
            self.extracted[name][1] += 1
        return arrays, seconds

    def store_rows(self, prompts: list[Prompt], result: DecodeResult, rows: list[int], arrays: list[dict],
                   seconds: float, extract_seconds: dict) -> None:
        """Store ``result``'s rows ``rows`` (the items ``prompts``), timed per item."""
        n = len(prompts)
        per_item, ex = seconds / n, {k: v / n for k, v in extract_seconds.items()}
        self.store.add([{**make_record(self.tokenizer, p, result, row, a, per_item, ex),
                         "input_sha256": self.hashes[p.id]} for p, row, a in zip(prompts, rows, arrays)])
        self.n_tok += sum(len(result.tokens[r]) for r in rows)
        self.bar.update(n)
        self.bar.set_postfix(tok_s=f"{self.n_tok / (time.perf_counter() - self.t0):.1f}")

    def stream(self, todo: list[Prompt], batch_size: int) -> None:
        """Continuous batching (:func:`kvlib.core.decoding.decode_stream`): each item is stored when it finishes."""
        items = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in todo]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        last = [time.perf_counter()]

        def finished(part: DecodeResult) -> None:
            arrays, ex = self.extract(part, part.prompt_ids, part.prompt_mask)
            now = time.perf_counter()
            self.store_rows([todo[i] for i in part.rows], part, list(range(len(part.rows))), arrays,
                            now - last[0] - sum(ex.values()), ex)
            last[0] = time.perf_counter()

        decode_stream(self.model, items, finished, self.config, batch_size=batch_size,
                      seeds=[_item_seed(self.settings.seed, p.id) for p in todo], pad_id=pad)

    def batch(self, chunk: list[Prompt], controller_factory) -> None:
        """One fixed batch under a controller; its records are stored when all its rows are done."""
        enc = self.tokenizer([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        per_row, extract_seconds = [dict() for _ in chunk], dict.fromkeys(self.extractors, 0.0)

        def finished(part: DecodeResult) -> None:
            # rows leave the batch as they finish: read their features while their cache is alive
            arrays, ex = self.extract(part, enc.input_ids[part.rows], enc.attention_mask[part.rows])
            for row, a in zip(part.rows, arrays):
                per_row[row].update(a)
            for k, v in ex.items():
                extract_seconds[k] += v

        t = time.perf_counter()
        result = decode(self.model, enc.input_ids, enc.attention_mask, self.config,
                        controller=controller_factory(chunk) if controller_factory else None,
                        seeds=[_item_seed(self.settings.seed, p.id) for p in chunk], on_finish=finished)
        seconds = time.perf_counter() - t - sum(extract_seconds.values())
        self.store_rows(chunk, result, list(range(len(chunk))), per_row, seconds, extract_seconds)


def prepare_store(model, tokenizer, store: ResultStore, settings: GenerationSettings,
                  extractors: Mapping[str, Extractor], prompts: Sequence[Prompt]) -> dict[str, str]:
    """Bind ``store`` to the model, check that it was opened for these settings and extractors and that every
    stored item had the prompt it has now; returns each prompt's hash (``StoreMismatchError`` otherwise)."""
    store.bind(model_identity(model, tokenizer))
    store.require_settings(settings.identity(extractors))
    hashes = {p.id: prompt_hash(p.text) for p in prompts}
    store.verify_inputs(hashes)
    return hashes


def _unique_ids(prompts: Sequence[Prompt]) -> list[str]:
    """The prompts' ids (``ValueError`` naming those that repeat)."""
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for i in ids:
            if i in seen and i not in dup:
                dup.append(i)
            seen.add(i)
        raise ValueError(f"prompt ids must be unique; repeated: {', '.join(map(repr, dup[:10]))}"
                         + (f" and {len(dup) - 10} more" if len(dup) > 10 else ""))
    return ids


def _check_lengths(model, lengths: Mapping[str, int], max_new_tokens: int) -> None:
    """Refuse, before generating anything, prompts whose answer would not fit the model's context."""
    limit = context_limit(model)
    if limit is None:
        return
    over = sorted((n, pid) for pid, n in lengths.items() if n + max_new_tokens > limit)
    if over:
        shown = ", ".join(f"{pid!r} ({n} tokens)" for n, pid in over[:5]) + (" ..." if len(over) > 5 else "")
        raise ValueError(
            f"{len(over)} prompt(s) leave no room for {max_new_tokens} new tokens in the model's context of {limit}: "
            f"{shown}. Shorten or drop them, or lower max_new_tokens; nothing was generated or stored."
        )


def make_record(tokenizer, prompt: Prompt, result: DecodeResult, row: int, arrays: dict, seconds: float,
                extract_seconds: dict) -> dict:
    """The stored record of ``result``'s row ``row`` (see the module docstring for its fields)."""
    tokens = result.tokens[row]
    rec = {
        "item_id": prompt.id,
        "prompt": prompt.text,
        "output": tokenizer.decode(tokens, skip_special_tokens=True),
        "token_ids": tokens,
        "n_tokens": len(tokens),
        "finish_reason": result.finish_reason[row],
        "max_prob": [round(x, 6) for x in result.max_prob[row]],
        "entropy": [round(x, 6) for x in result.entropy[row]],
        "switches": result.switches[row],
        "seconds": round(seconds, 4),
        "extract_seconds": {k: round(v, 5) for k, v in extract_seconds.items()},
        "arrays": {k: np.asarray(v) for k, v in arrays.items()},  # the store writes them to its binary sidecar
    }
    if not all(result.sampled_mask[row]):
        rec["sampled_mask"] = result.sampled_mask[row]
    return rec


def open_store(root, model_name: str, dataset: str, settings: GenerationSettings,
               extractors: Mapping[str, Extractor] | None = None, kind: str = "generation", *, model=None,
               tokenizer=None, readonly: bool = False) -> ResultStore:
    """The store of one generation run (see :mod:`kvlib.runs.store` for what its identity holds).

    Args:
        model_name: the folder name of the model's runs (what the model *is* comes from ``model``).
        extractors: the extractors the run uses (their parameters are part of the identity).
        model, tokenizer: bind the store now (needed to read it before :func:`generate`, which binds an
            unbound store to the model it runs).
        readonly: read without taking the writer lock (see :class:`~kvlib.runs.store.ResultStore`).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model= and tokenizer= (or neither, and let generate() bind the store)")
    identity = model_identity(model, tokenizer) if model is not None else None
    return ResultStore(root, model_name, dataset, settings.identity(extractors), kind=kind, model_identity=identity,
                       readonly=readonly)
