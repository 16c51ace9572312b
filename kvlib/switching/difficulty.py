"""Difficulty from the KV cache: labels, pooled last-N-token features and the MLP that predicts d in [0, 100].

Labels follow the paper (section 6.2): 0 = the fast answer is right and short (< 128 tokens), 25 = right
but long, 75 = only the slow answer is right, 100 = both are wrong.

Features (paper section 6.3 and appendix B): keys and values concatenated, SUMMED over the last ``N``
real tokens, heads flattened, then AVERAGED over the last ``L`` layers -> ``[2 * kv_heads * head_dim]``.
Unlike the paper's code, padding never enters the sum: only positions whose attention mask is 1 count,
so a left-padded batch gives the same features as one prompt at a time (tested). A prompt shorter than
``N`` sums all its tokens.

Storage: :func:`prompt_kv_extractor` keeps, for every prompt of a generation batch, the per-layer sums
``[len(n_grid), kept_layers, D]`` for several ``N`` at once (the last 8 layers by default: the paper's
grid needs no more), so every ``(N, L)`` point of appendix B is a mean over ``L`` rows of one stored slice
and training features cost no extra forward pass. :func:`live_features` computes the same quantity from
a decoding state's last ``N`` fed tokens (prompt and generated alike), for checks during generation: one
gather per layer, no forward pass.

Classifier (departures from the paper's code, which trained Adam 1e-5 for 500 iterations on batches of
1024 with an "eval" split drawn from the training rows): our training sets have hundreds, not tens of
thousands, of questions, so inputs are standardised with training statistics, the target is d / 100,
Adam runs at 1e-3 with mini-batches of 64 and weight decay 1e-4, and training stops early on the MSE of
a validation split that is held out by question; the best-validation weights are kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.cache import cache_layers
from ..runs.generation import record_array
from ..runs.records import GenerationRecord

__all__ = [
    "difficulty_label", "FeatureSpec", "last_n_sums", "prompt_kv_extractor", "features_from_sums",
    "record_features", "live_features", "question_key", "split_by_question", "TrainConfig",
    "DifficultyClassifier", "train_classifier", "PAPER_GRID", "SUMS_ARRAY", "SHORT_ANSWER", "fast_cap",
    "cap_records", "baseline_rmse",
]

PAPER_GRID = ((32, 8), (64, 4), (128, 2))  # (N tokens, L layers): 256 token x layer units each
SUMS_ARRAY = "prompt_kv_sums"
SHORT_ANSWER = 128  # the labels' split between a short (0) and a long (25) correct fast answer


def difficulty_label(fast_correct: bool, fast_tokens: int, slow_correct: bool, short: int = SHORT_ANSWER) -> int:
    """The paper's difficulty label: 0 (fast right, < ``short`` tokens), 25 (fast right, longer),
    75 (fast wrong, slow right), 100 (both wrong)."""
    if fast_correct:
        return 0 if fast_tokens < short else 25
    return 75 if slow_correct else 100


@dataclass(frozen=True)
class FeatureSpec:
    """Which KV slice the classifier reads: the last ``n_tokens`` tokens of the last ``n_layers`` layers."""

    n_tokens: int = 32
    n_layers: int = 8

    def __post_init__(self):
        if self.n_tokens < 1 or self.n_layers < 1:
            raise ValueError("n_tokens and n_layers must be >= 1")


def _last_n_selector(mask: torch.Tensor, n_grid: Sequence[int]) -> torch.Tensor:
    """``[B, G, S]`` 0/1 weights picking each row's last ``N`` real columns of ``mask`` ``[B, S]``."""
    m = mask.long()
    from_end = m.flip(-1).cumsum(-1).flip(-1)  # real columns at or after each column
    n = torch.as_tensor(list(n_grid), device=mask.device).view(1, -1, 1)
    return ((m.unsqueeze(1) == 1) & (from_end.unsqueeze(1) <= n)).float()


def last_n_sums(cache, mask: torch.Tensor, n_grid: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
    """Per-layer sums of concatenated keys and values over each row's last ``N`` real cache columns.

    Args:
        cache: a transformers cache (read through :func:`kvlib.core.cache.cache_layers`).
        mask: ``[B, S]``, 1 on real tokens of cache columns ``0 .. S-1`` (S <= cache length).
        n_grid: the token counts ``N``.
        layers: layer indices.

    Returns:
        ``[B, len(n_grid), len(layers), 2 * kv_heads * head_dim]`` float32. A sliding-window layer that no
        longer holds a selected column gives NaN for that row.
    """
    all_layers = cache_layers(cache)
    sel = _last_n_selector(mask, n_grid)  # [B, G, S]
    out = []
    for i in layers:
        layer = all_layers[i]
        first, held = layer.first_position, layer.keys.shape[-2]
        lo, hi = max(first, 0), min(first + held, mask.shape[1])
        w = sel[:, :, lo:hi].to(layer.keys.device)  # layers may sit on several devices (device_map="auto")
        parts = [torch.einsum("bgs,bksd->bgkd", w, t[:, :, lo - first : hi - first].float()).flatten(2)
                 for t in (layer.keys, layer.values)]
        s = torch.cat(parts, dim=-1).to(sel.device)  # [B, G, D]
        lost = sel[:, :, :lo].sum(-1) + sel[:, :, hi:].sum(-1)  # selected columns this layer no longer holds
        out.append(torch.where(lost.unsqueeze(-1) > 0, torch.full_like(s, float("nan")), s))
    return torch.stack(out, dim=2)


def prompt_kv_extractor(n_grid: Sequence[int] = (32, 64, 128), keep_layers: int | None = 8):
    """An extractor (see :data:`kvlib.runs.generation.Extractor`) storing pooled prompt KV sums per row.

    Arrays per row: ``prompt_kv_sums`` ``[len(n_grid), kept, D]`` float32 (sums over the last ``N`` real
    prompt tokens of each of the last ``keep_layers`` layers, all layers when ``None``), ``prompt_kv_n_grid``
    ``[len(n_grid)]`` and ``prompt_kv_layers`` ``[kept]`` (absolute layer indices), so records describe
    themselves. The prompt is the first ``input_ids.shape[1]`` columns of the cache (left-padded).
    """
    n_grid = tuple(int(n) for n in n_grid)
    if not n_grid or min(n_grid) < 1:
        raise ValueError("n_grid needs positive token counts")

    def extract(model, result, input_ids, attention_mask) -> list[dict[str, np.ndarray]]:
        cache = result.state.cache
        n_layers = len(cache_layers(cache))
        k = n_layers if keep_layers is None else min(keep_layers, n_layers)
        layers = list(range(n_layers - k, n_layers))
        mask = attention_mask.to(result.state.attention_mask.device)
        sums = last_n_sums(cache, mask, n_grid, layers).cpu().numpy()
        grid, lay = np.asarray(n_grid, dtype=np.int32), np.asarray(layers, dtype=np.int32)
        return [{SUMS_ARRAY: sums[r], "prompt_kv_n_grid": grid, "prompt_kv_layers": lay} for r in range(len(sums))]

    return extract


def features_from_sums(sums: np.ndarray, n_grid: Sequence[int], spec: FeatureSpec) -> np.ndarray:
    """``[..., D]`` features: the ``spec.n_tokens`` slice of ``sums`` ``[..., G, kept, D]``, mean of its last
    ``spec.n_layers`` layers."""
    n_grid = [int(n) for n in n_grid]
    if spec.n_tokens not in n_grid:
        raise ValueError(f"no stored sums for N={spec.n_tokens}; the records hold N in {n_grid}: "
                         "regenerate with prompt_kv_extractor(n_grid=...) including it")
    if spec.n_layers > sums.shape[-2]:
        raise ValueError(f"the records keep {sums.shape[-2]} layers, fewer than L={spec.n_layers}: "
                         "regenerate with a larger keep_layers")
    g = n_grid.index(spec.n_tokens)
    return sums[..., g, sums.shape[-2] - spec.n_layers :, :].mean(axis=-2)


def record_features(records: Sequence[GenerationRecord], spec: FeatureSpec) -> np.ndarray:
    """``[len(records), D]`` prompt features of stored records (written by :func:`prompt_kv_extractor`)."""
    if not records:
        raise ValueError("no records")
    rows = [features_from_sums(record_array(r, SUMS_ARRAY), record_array(r, "prompt_kv_n_grid"), spec)
            for r in records]
    return np.stack(rows).astype(np.float32)


def live_features(state, rows: Sequence[int], spec: FeatureSpec) -> torch.Tensor:
    """Features ``[len(rows), D]`` from the last ``spec.n_tokens`` tokens a decoding state has FED to the cache.

    Those are the last real columns of ``state.attention_mask`` (prompt then generated tokens; filler is
    masked), i.e. ``state.slots[row]`` preceded by the prompt slots. The token sampled last has not been
    fed yet and is not included. A row with fewer real tokens sums all of them. No forward pass.
    """
    rows = list(rows)
    layers_kv = cache_layers(state.cache)
    n_layers = len(layers_kv)
    if spec.n_layers > n_layers:
        raise ValueError(f"L={spec.n_layers} layers requested, the model has {n_layers}")
    phys = [state.cache_row(i) for i in rows]  # finished rows may have left the batch
    mask = state.attention_mask[phys]  # [R, S]
    S = mask.shape[1]
    col = torch.arange(S, device=mask.device).expand_as(mask)
    n = min(spec.n_tokens, S)
    score = torch.where(mask.bool(), col, torch.full_like(col, -1))
    top = score.topk(n, dim=-1).values  # [R, n] last n real columns (-1 where a row has fewer)
    valid = (top >= 0).float()
    idx = top.clamp_min(0)
    r_idx = torch.as_tensor(phys, device=mask.device).unsqueeze(1).expand_as(idx)
    acc = None
    for layer in layers_kv[n_layers - spec.n_layers :]:
        local = idx - layer.first_position
        if (local[valid.bool()] < 0).any():
            raise ValueError("a sliding-window layer no longer holds the last N tokens: lower n_tokens "
                             "below the window or use full-attention layers")
        dev = layer.keys.device  # layers may sit on several devices (device_map="auto")
        local, rows_, ok = local.clamp_min(0).to(dev), r_idx.to(dev), valid.to(dev)
        parts = [(t[rows_, :, local].float() * ok[..., None, None]).sum(1).flatten(1)  # [R, kv*hd]
                 for t in (layer.keys, layer.values)]
        x = torch.cat(parts, dim=-1).to(mask.device)
        acc = x if acc is None else acc + x
    return acc / spec.n_layers


# --- the fast answers' budget ---------------------------------------------------------------------------

def fast_cap(lengths: Sequence[int], quantile: float = 0.98, minimum: int = SHORT_ANSWER, multiple: int = 32,
             ceiling: int | None = None) -> int:
    """The fast answers' token cap, chosen on the training split: the ``quantile`` of ``lengths`` (training fast
    answers generated with a generous cap, ``ceiling``) rounded up to a multiple of ``multiple``, at least
    ``minimum`` (the labels' 128: a correct fast answer of 128 tokens or more, label 25, must be able to occur)
    and at most ``ceiling`` (a cap above the generous one cannot be checked on these answers).

    With the 98th percentile, about 2% of training answers reach the cap, so fewer than 5% of test answers do
    unless the test set's answers are longer (the cap-share table reports it).

    Args:
        lengths: ``[n]`` generated tokens of each training fast answer.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if minimum < 1 or multiple < 1:
        raise ValueError("minimum and multiple must be >= 1")
    lengths = np.asarray(lengths, dtype=float)
    if lengths.size == 0:
        raise ValueError("no training fast answers to choose the fast cap from")
    q = float(np.quantile(lengths, quantile, method="higher"))
    cap = max(int(minimum), int(multiple * np.ceil((q + 1) / multiple)))  # an answer of exactly cap tokens reaches it
    return min(cap, int(ceiling)) if ceiling is not None else cap


def cap_records(records: Sequence[Mapping], cap: int) -> list[dict]:
    """Graded answers generated with a larger cap, as they would be with ``cap``: greedy decoding writes the same
    tokens up to the cap, so an answer of more than ``cap`` tokens is cut there, unfinished and therefore wrong.

    Returns one dict per record with ``item_id``, ``question``, ``correct``, ``n_tokens`` and ``finish_reason``
    only (the text is not cut: nothing downstream of the labels may read it).
    """
    out = []
    for r in records:
        cut = r["n_tokens"] > cap
        out.append({"item_id": r["item_id"], "question": r.get("question", ""),
                    "n_tokens": min(int(r["n_tokens"]), cap), "correct": bool(r["correct"]) and not cut,
                    "finish_reason": "length" if cut else r.get("finish_reason", "stop")})
    return out


# --- split by question --------------------------------------------------------------------------------

def question_key(question: str) -> str:
    """Normalised question text (lower case, collapsed spaces, no space before punctuation): the split unit.

    SVAMP, ASDiv and MAWPS share questions; keying on text keeps a question on one side of every split
    even when it has several ids.
    """
    q = " ".join(str(question).lower().split())
    return re.sub(r"\s+([.,?!;:])", r"\1", q)


def split_by_question(questions: Sequence[str], fractions: Mapping[str, float] = None, seed: int = 0,
                      exclude: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Row indices per split, assigning whole questions (never single rows) to one split.

    Args:
        questions: one question text per row (rows of one question go together).
        fractions: split name -> share of the distinct questions (default train 0.8, val 0.2).
        seed: shuffles the distinct questions.
        exclude: question texts that must appear in no split (e.g. the evaluation items); their rows
            are dropped.

    Returns:
        split name -> sorted row indices.
    """
    fractions = dict(fractions or {"train": 0.8, "val": 0.2})
    if any(f < 0 for f in fractions.values()) or not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    keys = [question_key(q) for q in questions]
    banned = {question_key(q) for q in exclude}
    distinct = sorted({k for k in keys if k not in banned})
    order = np.random.default_rng(seed).permutation(len(distinct))
    bounds = np.round(np.cumsum([0.0] + list(fractions.values())) * len(distinct)).astype(int)
    group_of = {}
    for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:]):
        for j in order[lo:hi]:
            group_of[distinct[j]] = name
    return {name: np.array(sorted(i for i, k in enumerate(keys) if group_of.get(k) == name), dtype=int)
            for name in fractions}


# --- the classifier -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """MLP training settings (see the module docstring for why they differ from the paper's)."""

    hidden: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 30
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 1 or self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError("hidden, lr, batch_size, max_epochs and patience must be positive")


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


@dataclass
class DifficultyClassifier:
    """Standardise -> Linear(D, hidden) -> ReLU -> Linear(hidden, 1) -> x100, clipped to [0, 100].

    Attributes:
        spec: the KV slice the features come from.
        mlp: the network (on d / 100).
        mean, std: ``[D]`` input standardisation from the training rows.
        info: free-form metadata saved with it (decision prompt, training sets, validation scores).
    """

    spec: FeatureSpec
    mlp: nn.Sequential
    mean: torch.Tensor
    std: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` features (any device) -> ``[B]`` difficulty on that device."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"features have {x.shape[-1]} dims, the classifier expects {self.dim} "
                             "(2 * kv_heads * head_dim of the model it was trained on)")
        if torch.isnan(x).any():
            raise ValueError("features contain NaN: a sliding-window layer no longer holds the pooled tokens")
        dev = x.device
        if self.mean.device != dev:
            self.mlp.to(dev)
            self.mean, self.std = self.mean.to(dev), self.std.to(dev)
        with torch.no_grad():
            z = (x.float() - self.mean) / self.std
            return (self.mlp(z).squeeze(-1) * 100.0).clamp(0.0, 100.0)

    def predict(self, x) -> np.ndarray:
        """``[B, D]`` array-like -> ``[B]`` numpy difficulty in [0, 100]."""
        return self.predict_tensor(torch.as_tensor(np.asarray(x), dtype=torch.float32)).cpu().numpy()

    def fingerprint(self) -> str:
        """A short hash of weights and settings (part of an adaptive run's store identity)."""
        import hashlib

        h = hashlib.sha256(json.dumps(self._config(), sort_keys=True).encode())
        for t in [*self.mlp.state_dict().values(), self.mean, self.std]:
            h.update(t.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:12]

    def _config(self) -> dict:
        return {"spec": asdict(self.spec), "dim": self.dim, "hidden": self.mlp[0].out_features, "info": self.info}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: weights + standardisation, with the JSON config in its metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"mlp.{k}": v.detach().cpu().contiguous() for k, v in self.mlp.state_dict().items()}
        tensors.update(mean=self.mean.detach().cpu().contiguous(), std=self.std.detach().cpu().contiguous())
        save_file(tensors, str(path), metadata={"kvlib_difficulty": json.dumps(self._config(), default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DifficultyClassifier":
        """Read a classifier written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("kvlib_difficulty")
            if meta is None:
                raise ValueError(f"{path} is not a kvlib difficulty classifier (no 'kvlib_difficulty' metadata)")
            # copies: a tensor backed by the file's memory map would fault (SIGBUS) once the file is rewritten
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        cfg = json.loads(meta)
        mlp = _mlp(cfg["dim"], cfg["hidden"])
        mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        mlp.eval()
        return cls(FeatureSpec(**cfg["spec"]), mlp, tensors["mean"], tensors["std"], cfg.get("info", {}))


def baseline_rmse(y_train: np.ndarray, y_val: np.ndarray, length_train: np.ndarray, length_val: np.ndarray
                  ) -> dict[str, float]:
    """Validation RMSE (difficulty points) of the two baselines a KV classifier must beat, on its own split:

    * ``constant``: predict the training labels' mean for every question;
    * ``prompt_length``: a regressor that reads only the prompt's length (``[n]`` tokens): a cubic spline of its
      logarithm (4 knots at quantiles), ridge-regularised, clipped to [0, 100]; a constant when every training
      prompt has the same length.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    y_train, y_val = np.asarray(y_train, float), np.asarray(y_val, float)
    xt = np.log1p(np.asarray(length_train, float)).reshape(-1, 1)
    xv = np.log1p(np.asarray(length_val, float)).reshape(-1, 1)
    const = np.full(len(y_val), y_train.mean())
    if np.ptp(xt) > 0:
        reg = make_pipeline(SplineTransformer(n_knots=4, degree=3, knots="quantile", extrapolation="constant"),
                            Ridge(alpha=1.0)).fit(xt, y_train)
        by_length = np.clip(reg.predict(xv), 0.0, 100.0)
    else:
        by_length = const

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - y_val) ** 2)))

    return {"constant": rmse(const), "prompt_length": rmse(by_length)}


def train_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     spec: FeatureSpec, config: TrainConfig = TrainConfig(), info: dict | None = None
                     ) -> DifficultyClassifier:
    """Fit the MLP on ``[n, D]`` features and labels in [0, 100], early-stopped on the validation MSE.

    ``info`` gains ``train_rows``, ``val_rows``, ``epochs`` and ``val_rmse`` (in difficulty points).
    """
    x_train, x_val = np.asarray(x_train, np.float32), np.asarray(x_val, np.float32)
    y_train, y_val = np.asarray(y_train, np.float32) / 100.0, np.asarray(y_val, np.float32) / 100.0
    if len(x_train) < 2 or len(x_val) < 1:
        raise ValueError("need at least 2 training rows and 1 validation row")
    # A net this small is all per-op overhead: one thread trains it fastest and stays fast when other processes
    # hold the cores (1,480 rows x 512 features on 2 cores that another process was using: 4.9 s on one
    # thread, 86.7 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x_train, y_train, x_val, y_val, spec, config, info)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, x_val, y_val, spec: FeatureSpec, config: TrainConfig, info) -> DifficultyClassifier:
    g = torch.Generator().manual_seed(config.seed)
    mean = torch.from_numpy(x_train.mean(0))
    std = torch.from_numpy(x_train.std(0)).clamp_min(1e-6)
    xt, yt = (torch.from_numpy(x_train) - mean) / std, torch.from_numpy(y_train)
    xv, yv = (torch.from_numpy(x_val) - mean) / std, torch.from_numpy(y_val)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        mlp = _mlp(xt.shape[1], config.hidden)
    opt = torch.optim.Adam(mlp.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, best_epoch, epoch = float("inf"), None, 0, 0
    for epoch in range(config.max_epochs):
        mlp.train()
        for idx in torch.randperm(len(xt), generator=g).split(config.batch_size):
            opt.zero_grad()
            loss = nn.functional.mse_loss(mlp(xt[idx]).squeeze(-1), yt[idx])
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(mlp(xv).squeeze(-1).clamp(0.0, 1.0), yv).item()  # as predicted
        if val < best - 1e-7:
            best, best_epoch = val, epoch
            best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
        elif epoch - best_epoch >= config.patience:
            break
    mlp.load_state_dict(best_state)
    mlp.eval()
    info = dict(info or {})
    info.update(train_rows=len(xt), val_rows=len(xv), epochs=epoch + 1, best_epoch=best_epoch + 1,
                val_rmse=float(np.sqrt(best) * 100.0), train_config=asdict(config))
    return DifficultyClassifier(spec, mlp, mean, std, info)
