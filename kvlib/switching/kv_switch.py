"""Fast/slow thinking switches driven by KV-cache difficulty, inside one decoding loop (paper section 6).

Two controllers, both built on :func:`kvlib.core.decoding.decode` and run through :func:`kvlib.runs.generation.generate`
(batched, resumable):

* **KV-Classification** (one step): ``d0`` is predicted from the prefill cache of the *decision prompt*
  (the slow prompt by default); ``d0 > tau`` -> answer with the slow prompt, else with the fast prompt.
  Why the slow prompt and not a mode-neutral one: the classifier is trained on the prompt features
  stored with the slow answers (no extra forward pass for training), so the decision must read the same
  prompt; and when slow is chosen a server would keep decoding on that very cache. Our batched runner
  prefills the decision prompts in a separate pass and then prefills the chosen prompt again, so the
  decision costs one extra prompt prefill per item: it is compute overhead, never counted as generated
  tokens, and each record stores its length (``decision_prefill_tokens``).
* **KV-Generative** (in generation): start as KV-Classification decides, then every ``check_every``
  appended tokens recompute ``d`` from the LIVE cache (the last ``N`` fed tokens, the same MLP, see
  :func:`kvlib.switching.difficulty.live_features`). In slow mode ``d < tau_fast`` injects the protocol's switch-to-fast
  text; in fast mode ``d > tau_slow`` injects the switch-to-slow text. Decoding continues on the same
  cache (never regenerated). Rule: each direction at most once per item, and never back to slow after a
  switch to fast (the final answer is being written). A row whose model has ended its thinking itself
  (``</think>``, or the prompt form's boxed answer: :class:`kvlib.switching.thinking.ThinkingWatch`) is no longer
  checked and never gets switch text. Every appended token counts, injected text included; each switch
  is recorded as ``(tokens before it, label)`` and each check as ``(tokens, d)``.

The paper's own code made the in-generation switch post hoc (generate a whole answer, find the first
crossing, regenerate from the cut text, count only the second stage): this module is the online version.
With no checks and a fixed start mode, :func:`adaptive_generate` is plain greedy :func:`~kvlib.runs.generation.generate`
on that mode's prompts (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from ..core.cache import cache_layers
from ..core.decoding import Controller, DecodeConfig, DecodeState, decode
from .difficulty import DifficultyClassifier, last_n_sums, live_features
from ..runs.generation import GenerationSettings, Prompt, generate, record_array
from ..runs.identity import callable_identity, model_identity
from ..runs.replay import replay_generate
from ..runs.store import ResultStore, default_store_dir
from .thinking import Mode, ThinkingProtocol, ThinkingWatch, protocol_for, render_prompt

__all__ = ["SwitchConfig", "KVSwitchController", "classifier_difficulty", "adaptive_generate", "initial_difficulty",
           "as_questions", "trace_extractor", "controlled_generate", "RunContext", "ControllerSpec", "ControllerTraces",
           "method_store", "switch_identity", "switch_start", "SwitchStart"]

# (state, rows) -> difficulty per row: the classifier on live features, or a scripted function in tests
DifficultyFn = Callable[[DecodeState, list[int]], Sequence[float]]


@dataclass(frozen=True)
class SwitchConfig:
    """How an adaptive run chooses and changes modes.

    Attributes:
        start: ``"auto"`` (KV-Classification: slow if ``d0 > tau``), or a fixed ``"fast"`` / ``"slow"``.
        tau: one-step threshold on ``d0``.
        check_every: tokens between in-generation checks (KV-Generative); ``None`` = no checks.
        tau_fast: in slow mode, switch to fast when ``d < tau_fast``.
        tau_slow: in fast mode, switch to slow when ``d > tau_slow``.
        decision_prompt: the prompt whose prefill gives ``d0`` (the classifier's training prompt).
        fast_tokens: budget of an answer that stays in fast mode (as fast answers get their own, smaller
            budget); ``None``: the run's ``max_new_tokens``. An item that hits it ends unfinished.
    """

    start: Literal["auto", "fast", "slow"] = "auto"
    tau: float = 50.0
    check_every: int | None = None
    tau_fast: float = 30.0
    tau_slow: float = 70.0
    decision_prompt: Mode = "slow"
    fast_tokens: int | None = None

    def __post_init__(self):
        if self.start not in ("auto", "fast", "slow"):
            raise ValueError(f"start must be auto, fast or slow, not {self.start!r}")
        if self.decision_prompt not in ("fast", "slow"):
            raise ValueError("decision_prompt must be fast or slow")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError("check_every must be >= 1 (or None for no in-generation checks)")
        if self.tau_fast > self.tau_slow:
            raise ValueError("need tau_fast <= tau_slow")
        if self.fast_tokens is not None and self.fast_tokens < 1:
            raise ValueError("fast_tokens must be >= 1 (or None)")

    @classmethod
    def off(cls, mode: Mode = "slow") -> "SwitchConfig":
        """No switching at all: every item in ``mode`` (equals plain greedy generation)."""
        return cls(start=mode)

    @classmethod
    def classification(cls, tau: float = 50.0, fast_tokens: int | None = None) -> "SwitchConfig":
        return cls(start="auto", tau=tau, fast_tokens=fast_tokens)

    @classmethod
    def generative(cls, tau: float = 50.0, tau_fast: float = 30.0, tau_slow: float = 70.0,
                   check_every: int = 32, fast_tokens: int | None = None) -> "SwitchConfig":
        return cls(start="auto", tau=tau, check_every=check_every, tau_fast=tau_fast, tau_slow=tau_slow,
                   fast_tokens=fast_tokens)

    @property
    def needs_classifier(self) -> bool:
        return self.start == "auto" or self.check_every is not None


class KVSwitchController:
    """In-generation switch (see the module docstring). ``trace[row]`` lists ``(tokens so far, d)`` per check.

    Args:
        difficulty: ``(state, rows) -> d per row``.
        modes: start mode of each batch row.
        switch_ids: ``{"fast": ids of the to-fast text, "slow": ids of the to-slow text}``.
        check_every: tokens between checks (``None``: never check).
        fast_cap: ends (unfinished) a row that has stayed in fast mode for this many tokens, by marking it
            done in the decoding state (``None``: no cap).
        watch: follows whether each row's model ended its thinking itself (its ``thinking`` flags are the
            rows' slow modes); a closed row is never checked nor switched again. ``None``: nobody watches.
    """

    def __init__(self, difficulty: DifficultyFn | None, modes: Sequence[Mode], switch_ids: dict[str, list[int]],
                 check_every: int | None, tau_fast: float, tau_slow: float, fast_cap: int | None = None, *,
                 watch: ThinkingWatch | None = None):
        self.difficulty, self.modes, self.fast_cap, self.watch = difficulty, list(modes), fast_cap, watch
        self.start = list(modes)
        self.switch_ids, self.k = switch_ids, check_every
        self.tau_fast, self.tau_slow = tau_fast, tau_slow
        self.last = [0] * len(self.modes)
        self.went = [set() for _ in self.modes]
        self.trace: list[list[tuple[int, float]]] = [[] for _ in self.modes]

    def _can_switch(self, i: int) -> bool:
        if "fast" in self.went[i]:
            return False
        return self.modes[i] == "slow" or "slow" not in self.went[i]

    def __call__(self, state: DecodeState) -> dict[int, tuple[list[int], str]]:
        closed = self.watch.update(state) if self.watch is not None else [False] * len(self.modes)
        if self.fast_cap is not None:
            for i, mode in enumerate(self.start):
                if mode == "fast" and not self.went[i] and not state.done[i] and len(state.tokens[i]) >= self.fast_cap:
                    state.done[i] = True  # the fast budget is spent: the item ends unfinished
        if self.k is None:
            return {}
        due = [i for i in range(len(self.modes)) if not state.done[i] and not closed[i] and self._can_switch(i)
               and len(state.tokens[i]) - self.last[i] >= self.k]
        if not due:
            return {}
        d = [float(x) for x in self.difficulty(state, due)]
        out = {}
        for i, di in zip(due, d):
            n = len(state.tokens[i])
            self.last[i] = n
            self.trace[i].append((n, di))
            target = None
            if self.modes[i] == "slow" and di < self.tau_fast:
                target = "fast"
            elif self.modes[i] == "fast" and di > self.tau_slow:
                target = "slow"
            if target is not None:
                self.modes[i] = target
                self.went[i].add(target)
                if self.watch is not None:
                    self.watch.set_thinking(i, target == "slow")
                out[i] = (self.switch_ids[target], f"to_{target}")
                self.last[i] = n + len(self.switch_ids[target])  # the next check counts from after the switch text
        return out

    def arrays(self, row: int) -> dict[str, np.ndarray]:
        return {"difficulty_trace": np.asarray(self.trace[row], dtype=np.float32).reshape(-1, 2)}


def classifier_difficulty(classifier: DifficultyClassifier) -> DifficultyFn:
    """The live difficulty function: the MLP on the last-N-token features of the live cache (no forward pass)."""

    def difficulty(state: DecodeState, rows: list[int]) -> list[float]:
        return classifier.predict_tensor(live_features(state, rows, classifier.spec)).tolist()

    return difficulty


def as_questions(questions) -> list[tuple[str, str]]:
    """``(id, question)`` pairs from ``MathItem``-like objects (``.id``, ``.question``) or pairs."""
    out = []
    for q in questions:
        if hasattr(q, "id") and hasattr(q, "question"):
            out.append((str(q.id), q.question))
        else:
            qid, text = q
            out.append((str(qid), text))
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def initial_difficulty(model, tokenizer, questions, classifier: DifficultyClassifier, mode: Mode = "slow",
                       protocol: ThinkingProtocol | None = None, batch_size: int = 16) -> np.ndarray:
    """``d0`` per question from the prefill cache of its ``mode`` prompt (one forward pass per batch).

    Equals the classifier applied to the ``prompt_kv_sums`` stored with that mode's answers.
    """
    protocol = protocol or protocol_for(tokenizer)
    qs = as_questions(questions)
    texts = [render_prompt(tokenizer, q, mode, protocol) for _, q in qs]
    tokenizer.padding_side = "left"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    d0 = np.zeros(len(texts), dtype=np.float64)
    spec = classifier.spec
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=1))
        n_layers = len(cache_layers(res.state.cache))
        layers = list(range(n_layers - spec.n_layers, n_layers))
        mask = res.state.attention_mask[:, : enc.input_ids.shape[1]]
        feats = last_n_sums(res.state.cache, mask, (spec.n_tokens,), layers)[:, 0].mean(1)  # [B, D]
        d0[rows] = classifier.predict_tensor(feats).cpu().numpy()
    return d0


@dataclass(frozen=True)
class RunContext:
    """Where a controlled run stores its records and how it decodes: what every ``*_generate`` wrapper shares.

    Attributes:
        model_name: the folder name of the model's runs (what the model *is* comes from the model itself).
        dataset: the data set's name in the store.
        settings: decoding settings (part of the store identity).
        root: store directory (``None``: :func:`kvlib.runs.store.default_store_dir`).
        batch_size: items decoded together (not part of the identity: records do not depend on it).
        protocol: the thinking protocol (``None``: the tokenizer's, :func:`kvlib.switching.thinking.protocol_for`).
        progress: show a progress bar.
        references: item id -> the stored plain greedy answer of the same prompt: replayed, and decoded live only
            from where the controller changes it (:func:`kvlib.runs.replay.replay_generate`; the same records).
            ``None``: every item is decoded live.
    """

    model_name: str = "model"
    dataset: str = "questions"
    settings: GenerationSettings = GenerationSettings()
    root: str | Path | None = None
    batch_size: int = 16
    protocol: ThinkingProtocol | None = None
    progress: bool = True
    references: Mapping[str, Mapping] | None = None

    def thinking(self, tokenizer) -> ThinkingProtocol:
        """The run's thinking protocol: the one given, else the tokenizer's."""
        return self.protocol or protocol_for(tokenizer)


@dataclass(frozen=True)
class ControllerSpec:
    """What a method adds to plain greedy generation.

    Attributes:
        identity: the method's settings (thresholds, classifier fingerprint, protocol...): they join the store
            identity, so another setting is another store.
        make_controller: ``(the batch's prompts) -> a decoding controller, or None``; a controller with an
            ``arrays(row) -> {name: array}`` method hands each finishing row's arrays (its trace) to the row's record.
        extra: item id -> arrays known before decoding, stored with the item's record (e.g. ``d0``).
        kind: the store's folder level.
    """

    identity: Mapping
    make_controller: Callable[[list[Prompt]], Controller | None]
    extra: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    kind: str = "adaptive"


class ControllerTraces:
    """The controllers of one run, batch by batch: builds each batch's controller and collects, per finishing row,
    the arrays its record stores (the spec's ``extra`` of the item and the controller's ``arrays(row)``)."""

    def __init__(self, spec: ControllerSpec):
        self.spec = spec
        self.chunk: list[Prompt] = []
        self.controller: Controller | None = None

    def controller_for(self, chunk: list[Prompt]) -> Controller | None:
        """The controller of the batch ``chunk`` (the runner's ``controller_factory``)."""
        self.chunk, self.controller = chunk, self.spec.make_controller(chunk)
        return self.controller

    def arrays(self, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The arrays of the current batch's ``rows`` (logical indices into the batch), one dict per row."""
        out = []
        for r in rows:
            arrays = dict(self.spec.extra.get(self.chunk[r].id, {}))
            if self.controller is not None and hasattr(self.controller, "arrays"):
                arrays.update(self.controller.arrays(r))
            out.append(arrays)
        return out


def trace_extractor(traces: ControllerTraces):
    """The extractor that stores, per finishing row, the arrays :class:`ControllerTraces` collects for it.

    Its closure (one dict named ``holder``) is hashed into every controlled run's store identity
    (:func:`kvlib.runs.identity.callable_identity` names a closure's variables and the type of a dict): it is
    kept as it is so that stored runs keep being reused.
    """
    holder = {"traces": traces}

    def extract(model, result, input_ids, attention_mask) -> list[dict[str, np.ndarray]]:
        return holder["traces"].arrays(result.rows)  # the rows finishing now

    return extract


def method_store(model, tokenizer, spec: ControllerSpec, run: RunContext, readonly: bool = False) -> ResultStore:
    """The store of a controlled run: the model, the run's settings and trace extractor, and the method's identity."""
    extractors = {"trace": trace_extractor(ControllerTraces(spec))}
    return ResultStore(run.root or default_store_dir(), run.model_name, run.dataset,
                       {**run.settings.identity(extractors), **spec.identity}, kind=spec.kind,
                       model_identity=model_identity(model, tokenizer), readonly=readonly)


def controlled_generate(model, tokenizer, prompts: list[Prompt], controller: ControllerSpec,
                        run: RunContext = RunContext()) -> list[dict]:
    """The one runner of the controlled methods: :func:`~kvlib.runs.generation.generate` (or, with
    ``run.references``, :func:`~kvlib.runs.replay.replay_generate`) with the spec's controller on every batch, each
    record storing its row's arrays (see :class:`ControllerSpec`). Returns one record per prompt, in order.
    """
    traces = ControllerTraces(controller)
    extractors = {"trace": trace_extractor(traces)}
    desc = f"{run.dataset} {controller.identity.get('method', controller.kind)}"
    common = dict(batch_size=run.batch_size, extractors=extractors, controller_factory=traces.controller_for,
                  progress=run.progress, desc=desc)
    with method_store(model, tokenizer, controller, run) as store:
        if run.references:
            return replay_generate(model, tokenizer, prompts, store, run.references, run.settings, **common)
        return generate(model, tokenizer, prompts, store, run.settings, **common)


def switch_identity(config: SwitchConfig, protocol: ThinkingProtocol, classifier: DifficultyClassifier | None,
                    difficulty: DifficultyFn | None) -> dict:
    """The settings of a KV-switching run that join its store identity."""
    return {"method": "kv-switch", "switch": asdict(config), "protocol": asdict(protocol),
            "classifier": classifier.fingerprint() if classifier is not None and config.needs_classifier else None,
            "difficulty": callable_identity(difficulty) if difficulty is not None else None}


@dataclass(frozen=True)
class SwitchStart:
    """A KV-switching run before decoding: each item's ``d0`` and start mode, its prompt, and the controller spec.

    ``todo``: the items not stored yet (the only ones whose ``d0`` was computed now; stored ones read theirs).
    """

    prompts: list[Prompt]
    spec: ControllerSpec
    modes: dict[str, Mode]
    d0: dict[str, float]
    todo: list[str]


def _stored_and_new_d0(model, tokenizer, qs: list[tuple[str, str]], classifier, config: SwitchConfig,
                       run: RunContext, spec: ControllerSpec) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """``d0`` per item (stored items read theirs; NaN for a fixed start) and the items not stored yet."""
    probe = method_store(model, tokenizer, spec, run, readonly=True)  # opened again, identically, by the runner
    todo = [(i, q) for i, q in qs if i not in probe]
    d0 = {i: float("nan") for i, _ in qs}
    if config.start == "auto" and todo:
        values = initial_difficulty(model, tokenizer, todo, classifier, config.decision_prompt, run.thinking(tokenizer),
                                    run.batch_size)
        d0.update({i: float(v) for (i, _), v in zip(todo, values)})
    for i, _ in qs:
        if i in probe:
            d0[i] = float(record_array(probe.get(i), "d0")[0])
    return d0, todo


def switch_start(model, tokenizer, questions, classifier: DifficultyClassifier | None, config: SwitchConfig,
                 run: RunContext = RunContext(), difficulty: DifficultyFn | None = None) -> SwitchStart:
    """Everything :func:`adaptive_generate` decides before decoding (same arguments; see there)."""
    protocol = run.thinking(tokenizer)
    qs = as_questions(questions)
    identity = switch_identity(config, protocol, classifier, difficulty)
    d0, todo = _stored_and_new_d0(model, tokenizer, qs, classifier, config, run, ControllerSpec(identity, None))
    modes = {i: config.start if config.start != "auto" else ("slow" if d0[i] > config.tau else "fast") for i, _ in qs}
    prompts = [Prompt(i, render_prompt(tokenizer, q, modes[i], protocol)) for i, q in qs]
    decision_len = {i: len(_ids(tokenizer, render_prompt(tokenizer, q, config.decision_prompt, protocol)))
                    if config.start == "auto" else 0 for i, q in todo}
    extra = {i: {"d0": np.asarray([d0[i]], np.float32),
                 "decision_prefill_tokens": np.asarray([decision_len.get(i, 0)], np.int32)} for i, _ in todo}
    switch_ids = {"fast": _ids(tokenizer, protocol.to_fast), "slow": _ids(tokenizer, protocol.to_slow)}
    if difficulty is None and classifier is not None:
        difficulty = classifier_difficulty(classifier)

    def make_controller(chunk: list[Prompt]) -> KVSwitchController | None:
        if config.check_every is None and config.fast_tokens is None:
            return None
        start = [modes[p.id] for p in chunk]
        watch = ThinkingWatch(tokenizer, protocol, [m == "slow" for m in start])
        return KVSwitchController(difficulty, start, switch_ids, config.check_every, config.tau_fast,
                                  config.tau_slow, config.fast_tokens, watch=watch)

    return SwitchStart(prompts, ControllerSpec(identity, make_controller, extra), modes, d0, [i for i, _ in todo])


def adaptive_generate(model, tokenizer, questions, classifier: DifficultyClassifier | None,
                      config: SwitchConfig, *, model_name: str = "model", dataset: str = "questions",
                      settings: GenerationSettings = GenerationSettings(), root=None, batch_size: int = 16,
                      protocol: ThinkingProtocol | None = None, difficulty: DifficultyFn | None = None,
                      progress: bool = True, references: Mapping[str, Mapping[str, Mapping]] | None = None
                      ) -> list[dict]:
    """Answer ``questions`` with KV-based fast/slow switching; one stored record per question, in order.

    Args:
        questions: ``MathItem``-like objects or ``(id, question)`` pairs.
        classifier: the difficulty MLP (``None`` only when ``config`` needs none).
        config: see :class:`SwitchConfig`.
        difficulty: overrides the live difficulty function (tests script it); ``d0`` still uses ``classifier``.
        references: ``{mode: {item id: stored plain greedy answer}}`` (the fast and slow answers of the same
            prompts, e.g. :func:`kvlib.switching.answers.answer_records`): each item replays the answer of its start
            mode and is decoded live only from its first switch (:mod:`kvlib.runs.replay`); the records are the same.
        the others: see :class:`RunContext`.

    Returns:
        generation records (see :mod:`kvlib.runs.generation`) plus ``question``, ``start_mode``, ``d0``
        (NaN for a fixed start), ``difficulty_trace`` (list of ``(tokens, d)``) and ``decision_prefill_tokens``.
    """
    if config.needs_classifier and classifier is None and (config.start == "auto" or difficulty is None):
        raise ValueError("this SwitchConfig needs a DifficultyClassifier (or a fixed start and a difficulty function)")
    run = RunContext(model_name, dataset, settings, root, batch_size, protocol, progress)
    start = switch_start(model, tokenizer, questions, classifier, config, run, difficulty)
    refs = None
    if references:
        modes = start.modes
        refs = {i: references[modes[i]][i] for i in start.todo if i in references.get(modes[i], {})}
    records = controlled_generate(model, tokenizer, start.prompts, start.spec, replace(run, references=refs))
    out = []
    for (i, q), rec in zip(as_questions(questions), records):
        arrays = rec.get("arrays", {})
        trace = record_array(rec, "difficulty_trace").tolist() if "difficulty_trace" in arrays else []
        out.append({**rec, "question": q, "start_mode": start.modes[i], "d0": start.d0[i],
                    "difficulty_trace": [(int(n), float(d)) for n, d in trace],
                    "decision_prefill_tokens": int(record_array(rec, "decision_prefill_tokens")[0])})
    return out
