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

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from ..core.cache import cache_layers
from ..core.decoding import DecodeConfig, DecodeState, decode
from .difficulty import DifficultyClassifier, last_n_sums, live_features
from ..runs.generation import GenerationSettings, Prompt, generate, record_array
from ..runs.identity import callable_identity, model_identity
from ..runs.replay import replay_generate
from ..runs.store import ResultStore, default_store_dir
from .thinking import Mode, ThinkingProtocol, ThinkingWatch, protocol_for, render_prompt

__all__ = ["SwitchConfig", "KVSwitchController", "classifier_difficulty", "adaptive_generate", "initial_difficulty",
           "as_questions", "trace_extractor", "controlled_generate"]

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


def trace_extractor(holder: dict):
    """An extractor storing, per row, the arrays of the batch's controller (``holder["controller"]``)
    and ``holder["extra"][item id]`` (``holder["chunk"]`` names the batch's prompts)."""

    def extract(model, result, input_ids, attention_mask) -> list[dict[str, np.ndarray]]:
        ctl, chunk, extra = holder.get("controller"), holder["chunk"], holder.get("extra", {})
        rows = []
        for r in result.rows:  # the rows finishing now (logical indices into the batch)
            p = chunk[r]
            arrays = dict(extra.get(p.id, {}))
            if ctl is not None and hasattr(ctl, "arrays"):
                arrays.update(ctl.arrays(r))
            rows.append(arrays)
        return rows

    return extract


def controlled_generate(model, tokenizer, prompts: list[Prompt], make_controller, identity: dict, *,
                        model_name: str, dataset: str, settings: GenerationSettings, root=None,
                        batch_size: int = 16, extra: dict | None = None, progress: bool = True,
                        kind: str = "adaptive", references: Mapping[str, Mapping] | None = None) -> list[dict]:
    """:func:`~kvlib.runs.generation.generate` with a per-batch controller whose trace is stored with each record.

    ``make_controller(chunk) -> controller or None``; ``identity`` (method settings) joins the store identity.
    ``references`` (item id -> the stored plain greedy answer of the same prompt): replay those answers and
    decode live only from where the controller changes them (:func:`kvlib.runs.replay.replay_generate`; same records).
    """
    holder: dict = {"extra": extra or {}}

    def factory(chunk):
        holder["chunk"] = chunk
        holder["controller"] = make_controller(chunk)
        return holder["controller"]

    extractors = {"trace": trace_extractor(holder)}
    desc = f"{dataset} {identity.get('method', kind)}"
    with _method_store(model, tokenizer, extractors, identity, model_name, dataset, settings, root, kind) as store:
        if references:
            return replay_generate(model, tokenizer, prompts, store, references, settings, batch_size=batch_size,
                                   extractors=extractors, controller_factory=factory, progress=progress, desc=desc)
        return generate(model, tokenizer, prompts, store, settings, batch_size=batch_size, extractors=extractors,
                        controller_factory=factory, progress=progress, desc=desc)


def _method_store(model, tokenizer, extractors: dict, identity: dict, model_name: str, dataset: str,
                  settings: GenerationSettings, root, kind: str, readonly: bool = False) -> ResultStore:
    """The store of a controlled run: the model, the generation settings and extractors, and the method's
    ``identity`` (its settings: thresholds, classifier fingerprint, difficulty function...)."""
    return ResultStore(root or default_store_dir(), model_name, dataset, {**settings.identity(extractors), **identity},
                       kind=kind, model_identity=model_identity(model, tokenizer), readonly=readonly)


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
            mode
            and is decoded live only from its first switch (:mod:`kvlib.runs.replay`); the records are the same.

    Returns:
        generation records (see :mod:`kvlib.runs.generation`) plus ``question``, ``start_mode``, ``d0``
        (NaN for a fixed start), ``difficulty_trace`` (list of ``(tokens, d)``) and ``decision_prefill_tokens``.
    """
    if config.needs_classifier and classifier is None and (config.start == "auto" or difficulty is None):
        raise ValueError("this SwitchConfig needs a DifficultyClassifier (or a fixed start and a difficulty function)")
    protocol = protocol or protocol_for(tokenizer)
    qs = as_questions(questions)
    identity = {"method": "kv-switch", "switch": asdict(config), "protocol": asdict(protocol),
                "classifier": classifier.fingerprint() if classifier is not None and config.needs_classifier else None,
                "difficulty": callable_identity(difficulty) if difficulty is not None else None}
    # d0 only for items not stored yet (the store is opened again, identically, by controlled_generate)
    probe = _method_store(model, tokenizer, {"trace": trace_extractor({})}, identity, model_name, dataset, settings,
                          root, "adaptive", readonly=True)
    todo = [(i, q) for i, q in qs if i not in probe]
    d0 = {i: float("nan") for i, _ in qs}
    if config.start == "auto" and todo:
        values = initial_difficulty(model, tokenizer, todo, classifier, config.decision_prompt, protocol, batch_size)
        d0.update({i: float(v) for (i, _), v in zip(todo, values)})
    for i, _ in qs:
        if i in probe:
            d0[i] = float(record_array(probe.get(i), "d0")[0])

    def start_mode(i: str) -> Mode:
        return config.start if config.start != "auto" else ("slow" if d0[i] > config.tau else "fast")

    modes = {i: start_mode(i) for i, _ in qs}
    prompts = [Prompt(i, render_prompt(tokenizer, q, modes[i], protocol)) for i, q in qs]
    decision_len = {}
    for i, q in todo:
        decision_len[i] = len(_ids(tokenizer, render_prompt(tokenizer, q, config.decision_prompt, protocol))) \
            if config.start == "auto" else 0
    extra = {i: {"d0": np.asarray([d0[i]], np.float32),
                 "decision_prefill_tokens": np.asarray([decision_len.get(i, 0)], np.int32)} for i, _ in todo}
    switch_ids = {"fast": _ids(tokenizer, protocol.to_fast), "slow": _ids(tokenizer, protocol.to_slow)}
    if difficulty is None and classifier is not None:
        difficulty = classifier_difficulty(classifier)

    def make_controller(chunk):
        if config.check_every is None and config.fast_tokens is None:
            return None
        start = [modes[p.id] for p in chunk]
        watch = ThinkingWatch(tokenizer, protocol, [m == "slow" for m in start])
        return KVSwitchController(difficulty, start, switch_ids, config.check_every, config.tau_fast,
                                  config.tau_slow, config.fast_tokens, watch=watch)

    refs = None
    if references:
        refs = {i: references[modes[i]][i] for i, _ in todo if i in references.get(modes[i], {})}
    records = controlled_generate(model, tokenizer, prompts, make_controller, identity, model_name=model_name,
                                  dataset=dataset, settings=settings, root=root, batch_size=batch_size,
                                  extra=extra, progress=progress, references=refs)
    out = []
    for (i, q), rec in zip(qs, records):
        arrays = rec.get("arrays", {})
        trace = record_array(rec, "difficulty_trace").tolist() if "difficulty_trace" in arrays else []
        out.append({**rec, "question": q, "start_mode": modes[i], "d0": d0[i],
                    "difficulty_trace": [(int(n), float(d)) for n, d in trace],
                    "decision_prefill_tokens": int(record_array(rec, "decision_prefill_tokens")[0])})
    return out
