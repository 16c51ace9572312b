"""Chain-of-Embedding (CoE) scores of a trajectory, and the hidden-state trajectory of the original CoE.

A trajectory is ``N`` consecutive points ``x_0 .. x_{N-1}`` in ``R^D``: the layer-wise, output-token
averaged hidden states of the original CoE (``N = L + 1``), or the per-token, layer-averaged KV vectors
of KV-CoE (``N = T``, see :func:`kvlib.core.pooling.token_trajectory`). Each step has a magnitude
``dr_i = ||x_{i+1} - x_i||`` and an angle ``dtheta_i = angle(x_{i+1}, x_i)``. Two forms turn the steps
into scores:

* ``form="reference"`` -- the original CoE code. Steps are normalised by the whole trajectory's
  first-to-last distance and angle, ``M_i = dr_i / ||x_{N-1} - x_0||``, ``A_i = dtheta_i / angle(x_{N-1}, x_0)``;
  ``R = mean(M) - mean(A)`` and ``C = |mean(M_i e^{i A_i})|``.
* ``form="paper"`` -- the reproduced paper's equations (4)/(5) and (8)/(9): unnormalised steps,
  ``R = mean(alpha dr_i + beta dtheta_i)`` and ``C = |mean(dr_i + i dtheta_i)|``. (The paper writes
  ``1/(L-1)`` in front of a sum of ``L`` terms; we take the mean over the ``N - 1`` steps.)

Both are used as they are: larger means "more likely correct" (the original CoE's orientation).

Numerical rules (no silent inf; every undefined case gives NaN for both scores):

* fewer than 3 points (``N < 3``): NaN. With one step the reference normalisers equal that step and the
  scores are the constants ``R = 0``, ``C = 1``; we return NaN rather than a constant without information.
* a point with (near-)zero norm (``||x|| <= 1e-12 * max_i ||x_i||``, or all points zero): its angles are
  undefined, NaN.
* reference form only: a first-to-last distance or angle at or below ``1e-12 * max_i ||x_i||`` / ``1e-12``
  rad (zero normaliser, e.g. ``x_{N-1} == x_0`` or a trajectory ending on the ray it started on): NaN.
* non-finite inputs: NaN.
* identical consecutive (non-zero) points are fine: ``dr = 0`` and ``dtheta = 0``.

Angles use ``2 atan2(||u - v||, ||u + v||)`` on unit vectors ``u, v``: the same value as
``arccos(clip(cos, -1, 1))`` but exact for tiny angles (arccos loses half the digits near 1), which the
reference normaliser needs. Everything is computed in float64.

:func:`hidden_coe_extractor` produces the original CoE's trajectory: it re-forwards every row's prompt and
answer with ``output_hidden_states=True`` -- the extra cost that KV-CoE avoids, measured by
:func:`kvlib.runs.generation.generate` as ``extract_seconds["hidden_coe"]``.
"""

from __future__ import annotations

from typing import Literal, Sequence, TypeVar

import numpy as np
import torch

from ..core.cache import forward, masked_mean
from ..core.decoding import prefill_positions
from ..core.phases import phase
from ..runs.identity import digest, model_identity
from ..runs.records import GenerationRecord
from ..runs.sharding import current_shard, run_sharded
from ..runs.store import ResultStore, default_store_dir

__all__ = ["coe_scores", "coe_steps", "step_angles", "hidden_coe_extractor", "hidden_trajectories"]

Form = Literal["reference", "paper"]
FORMS = ("reference", "paper")
_REL_EPS = 1e-12
_NAN = {"R": float("nan"), "C": float("nan")}


def step_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles in radians between rows of ``a`` and ``b`` (both ``[n, D]``, non-zero rows), in ``[0, pi]``."""
    u = a / np.linalg.norm(a, axis=-1, keepdims=True)
    v = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 2.0 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))


def _as_points(trajectory) -> np.ndarray:
    if isinstance(trajectory, torch.Tensor):
        trajectory = trajectory.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(trajectory, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"a trajectory is [N, D] (one point per row); got shape {x.shape}")
    return x


def coe_steps(trajectory, form: Form = "reference") -> tuple[np.ndarray, np.ndarray] | None:
    """Magnitude and angle steps of a trajectory, ``([N-1], [N-1])``, or ``None`` when undefined.

    ``form="reference"`` returns ``(M, A)`` (normalised by the first-to-last distance and angle);
    ``form="paper"`` returns ``(dr, dtheta)``. ``None`` follows the NaN rules of the module docstring.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    x = _as_points(trajectory)
    if x.shape[0] < 3 or not np.isfinite(x).all():
        return None
    norms = np.linalg.norm(x, axis=-1)
    scale = norms.max()
    if scale == 0 or norms.min() <= _REL_EPS * scale:
        return None
    dr = np.linalg.norm(np.diff(x, axis=0), axis=-1)
    dtheta = step_angles(x[1:], x[:-1])
    if form == "paper":
        return dr, dtheta
    total_r = float(np.linalg.norm(x[-1] - x[0]))
    total_theta = float(step_angles(x[-1:], x[:1])[0])
    if total_r <= _REL_EPS * scale or total_theta <= _REL_EPS:
        return None
    return dr / total_r, dtheta / total_theta


def coe_scores(trajectory, form: Form = "reference", alpha: float = 1.0, beta: float = 1.0) -> dict[str, float]:
    """CoE-R and CoE-C of a ``[N, D]`` trajectory (tensor or array), larger = more likely correct.

    Args:
        trajectory: ``[N, D]`` consecutive points (layers for CoE, tokens for KV-CoE).
        form: ``"reference"`` (original CoE code) or ``"paper"`` (the seed's eqs. 4/5, 8/9).
        alpha, beta: weights of magnitude and angle in the paper form's R (the reference form has none:
            passing other values with it is an error).

    Returns:
        ``{"R": float, "C": float}``; both NaN for an undefined trajectory (see the module docstring).
    """
    if form == "reference" and (alpha != 1.0 or beta != 1.0):
        raise ValueError("alpha/beta only apply to form='paper'; the reference CoE-R is mean(M) - mean(A)")
    steps = coe_steps(trajectory, form)
    if steps is None:
        return dict(_NAN)
    mag, ang = steps
    if form == "reference":
        r = mag.mean() - ang.mean()
        c = abs(np.mean(mag * np.exp(1j * ang)))
    else:
        r = np.mean(alpha * mag + beta * ang)
        c = abs(np.mean(mag + 1j * ang))
    return {"R": float(r), "C": float(c)}


@torch.inference_mode()
def hidden_trajectories(model, prompt_ids: list[list[int]], output_ids: list[list[int]], pad_id: int = 0,
                        ) -> tuple[list[torch.Tensor], list[int]]:
    """The original CoE trajectories of a batch: one forward of prompt + answer with hidden states.

    Args:
        model: a causal LM.
        prompt_ids: per row, the real prompt token ids (no padding).
        output_ids: per row, the generated token ids (every one of them, the final token included).
        pad_id: filler id for left padding (masked out; its value never matters).

    Returns:
        per row a ``[L + 1, hidden]`` float32 tensor -- for each hidden-state layer (embedding output
        first, the final normed state last, as ``output_hidden_states`` returns them) the mean over the
        row's output positions -- and per row the bytes the hidden states of that row alone occupy
        (``(L + 1) x (prompt + output length) x hidden x element size``: the activation memory a
        one-item re-forward holds and KV-CoE does not need). A row with no output gives zeros.
    """
    seqs = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    out_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, o) in enumerate(zip(seqs, output_ids)):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
        out_mask[i, width - len(o):] = 1 if len(o) else 0
    ids, mask, out_mask = ids.to(device), mask.to(device), out_mask.to(device)
    out, _ = forward(model, ids, mask, prefill_positions(mask), cache=False, output_hidden_states=True)
    hs = out.hidden_states  # L+1 tensors [B, S, hidden]
    # layers may sit on several devices (device_map="auto"): each mean is taken where its layer is
    per_layer = torch.stack([masked_mean(h, out_mask).to(out_mask.device) for h in hs], dim=1)  # [B, L+1, hidden]
    nbytes = [len(hs) * len(s) * hs[0].shape[-1] * hs[0].element_size() for s in seqs]
    return [t.float().cpu() for t in per_layer], nbytes


def hidden_coe_extractor(dtype=np.float32):
    """An :data:`kvlib.runs.generation.Extractor` for the original (hidden-state) CoE.

    Re-forwards each finished row's prompt + generated tokens (one batched, left-padded, masked forward
    with ``output_hidden_states=True``) and stores per row ``hidden_traj`` ``[L + 1, hidden]`` (layer-wise
    mean over the output tokens) and ``hidden_bytes`` (``[1]`` int64: bytes of that row's hidden states, see
    :func:`hidden_trajectories`).
    """

    def extract(model, result, input_ids, attention_mask) -> list[dict[str, np.ndarray]]:
        prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
        trajs, nbytes = hidden_trajectories(model, prompts, result.tokens)
        return [{"hidden_traj": t.numpy().astype(dtype), "hidden_bytes": np.asarray([b], dtype=np.int64)}
                for t, b in zip(trajs, nbytes)]

    return extract


_Record = TypeVar("_Record", bound=GenerationRecord)  # answer records stay answer records


def token_batches(items: Sequence, sizes: Sequence[int], max_rows: int, max_tokens: int | None) -> list[list]:
    """Consecutive groups of ``items`` with at most ``max_rows`` items and, padded to the longest, at most
    ``max_tokens`` tokens (``rows x max size``; an item longer than that forms a group alone)."""
    groups, cur, longest = [], [], 0
    for item, n in zip(items, sizes):
        wide = max(longest, n)
        if cur and (len(cur) >= max_rows or (max_tokens is not None and (len(cur) + 1) * wide > max_tokens)):
            groups.append(cur)
            cur, wide = [], n
        cur.append(item)
        longest = wide
    return groups + ([cur] if cur else [])


@phase("hidden-state CoE")
def hidden_coe_pass(model, tokenizer, model_name: str, dataset: str, records: Sequence[_Record], batch_size: int = 8,
                    root=None, progress: bool = True, shard=None, max_tokens: int | None = 1 << 16) -> list[_Record]:
    """Add the original CoE's ``hidden_traj`` to stored answer records by a re-forward (resumable).

    Hidden-state CoE needs every layer's hidden states of the answer, which generation does not keep:
    this pass re-forwards prompt + answer with ``output_hidden_states=True`` (see
    :func:`hidden_trajectories`) for the records given, and stores the result in its own run
    (``kind="hidden_coe"``), so it is computed once. That run is tied to the answers: its identity holds
    the answer runs' keys and the re-forwarding model, and each of its records the hash of the prompt and
    token ids it was computed from, checked on reuse. Its cost is recorded as
    ``extract_seconds["hidden_coe"]`` (seconds per item) next to the KV extractor's.

    Records are re-forwarded shortest first, at most ``batch_size`` rows and ``max_tokens`` tokens (rows x padded
    width) per forward (``None``: rows only): every layer's hidden states of a forward are held at once, about
    ``(layers + 1) x hidden x 2`` bytes a token in bf16 (89 KB for the 1.5B model), so the token cap bounds that
    memory whatever the answers' lengths.

    Under a launcher (``RANK`` / ``WORLD_SIZE``, or ``shard``) each process re-forwards its share of the records
    into its own shard file and rank 0 merges them, as :func:`kvlib.runs.generation.generate` does
    (:func:`kvlib.runs.sharding.run_sharded`).

    Returns:
        copies of ``records`` with ``hidden_traj`` / ``hidden_bytes`` added to ``arrays``.

    Raises:
        kvlib.runs.store.StoreMismatchError: a stored trajectory was computed from another answer of the same item.
    """
    import time
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    if not records:
        return []
    inputs = {r["item_id"]: digest([r["prompt"], r["token_ids"]]) for r in records}
    settings = {"answers": sorted({r["settings_key"] for r in records}), "pass": "hidden_coe@1"}
    identity = model_identity(model, tokenizer)
    shard = current_shard() if shard is None else shard
    pad = tokenizer.pad_token_id or 0

    def work(target: ResultStore, todo: list) -> None:
        desc = f"{dataset} hidden CoE" + (f" ({shard})" if shard.world > 1 else "")
        encoded = {r["item_id"]: tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in todo}
        sizes = {r["item_id"]: len(encoded[r["item_id"]]) + len(r["token_ids"]) for r in todo}
        bar = tqdm(total=len(todo), desc=desc, disable=not progress)
        todo = sorted(todo, key=lambda r: sizes[r["item_id"]])
        for chunk in token_batches(todo, [sizes[r["item_id"]] for r in todo], batch_size, max_tokens):
            prompts = [encoded[r["item_id"]] for r in chunk]
            t0 = time.perf_counter()
            trajs, nbytes = hidden_trajectories(model, prompts, [r["token_ids"] for r in chunk], pad_id=pad)
            seconds = (time.perf_counter() - t0) / len(chunk)
            target.add([{"item_id": r["item_id"], "input_sha256": inputs[r["item_id"]], "seconds": round(seconds, 4),
                         "arrays": {"hidden_traj": t.numpy().astype(np.float32),
                                    "hidden_bytes": np.asarray([b], dtype=np.int64)}}
                        for r, t, b in zip(chunk, trajs, nbytes)])
            bar.update(len(chunk))
        bar.close()

    with ResultStore(root or default_store_dir(), model_name, dataset, settings, kind="hidden_coe") as store:
        if shard.world > 1:
            items = [SimpleNamespace(id=r["item_id"], record=r) for r in records]
            run_sharded(store, items, inputs, shard, identity, settings,
                        lambda target, part: work(target, [x.record for x in part]))
        else:
            store.bind(identity)
            store.verify_inputs(inputs)
            work(store, [r for r in records if r["item_id"] not in store])
        stored = {r["item_id"]: store.get(r["item_id"]) for r in records}
    out = []
    for r in records:
        h = stored[r["item_id"]]
        out.append({**r, "arrays": {**r.get("arrays", {}), **h["arrays"]},
                    "extract_seconds": {**r.get("extract_seconds", {}), "hidden_coe": h["seconds"]}})
    return out
