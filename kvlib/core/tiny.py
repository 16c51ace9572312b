"""Random models built in-process: tiny ones for tests, and full-size shapes for speed and dry runs.

Tiny models need no weights and no downloads and build in well under a second.

Tests and examples use them to exercise every code path on the architectures kvlib claims
(Llama, Qwen2, Qwen3, Gemma 3 with sliding-window layers, Mistral). The tokenizer is a
character-level ``PreTrainedTokenizerFast`` built from scratch with a ChatML chat template; the
qwen3 variant has ``<think>``/``</think>`` as real special tokens and a template that honours
``enable_thinking`` as Qwen3's does.

:func:`random_model` builds a thinking Qwen3 model with random weights at a real model's shape
(``load_model("random:qwen3-8b")``): every notebook can run at the size of the paper's model, on the
device, with no weights to download, to check memory, speed and code paths before a real run.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["tiny_model", "tiny_tokenizer", "TINY_ARCHS", "SHAPES", "SHAPE_TOKENIZER", "shape_config", "random_model"]

TINY_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mistral")

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def tiny_tokenizer(thinking: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens (and ``<think>`` tokens if ``thinking``)."""
    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if thinking:
        specials += ["<think>", "</think>"]
    chars = list(string.printable)
    vocab: dict[str, int] = {}
    for tok in specials + chars:
        vocab.setdefault(tok, len(vocab))
    vocab["<unk>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )
    tok.chat_template = _CHATML
    tok.padding_side = "left"
    return tok


def _config(arch: str, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        common.update(head_dim=8)
    if arch == "gemma3":
        common.update(
            head_dim=8,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=8,
        )
        return AutoConfig.for_model("gemma3_text", **common)
    if arch == "mistral":
        common.update(sliding_window=None)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0):
    """Build a random ``(model, tokenizer)`` of architecture ``arch``, deterministic for ``seed``.

    3 decoder layers, hidden 32, 4 attention heads, 2 KV heads (GQA), head_dim 8; fp32, eval mode, CPU.
    Gemma 3 layers 0-1 use a sliding window of 6 positions.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(thinking=arch == "qwen3")
    config = _config(arch, len(tok), tok.pad_token_id, tok.eos_token_id)
    config._attn_implementation = "eager" if arch == "gemma3" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    return model, tok


SHAPES: dict[str, dict] = {
    # Qwen3-8B's config.json (36 layers, GQA 32/8, head_dim 128, untied 151,936-token head)
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                     rope_theta=1_000_000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False),
}


def _thinking_tokenizer(folder: str | Path | None):
    """The tiny thinking tokenizer (``None``), or the tokenizer in ``folder`` given ``<think>`` /
    ``</think>`` special tokens and the Qwen3-style template that honours ``enable_thinking``."""
    if folder is None:
        return tiny_tokenizer(thinking=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")],
                   special_tokens=True)
    tok.chat_template = _CHATML
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


SHAPE_TOKENIZER = "qwen2.5-0.5b"  # the embedded model whose tokenizer a random model at a real shape uses


def shape_config(shape: str) -> dict:
    """The Qwen3 config (as keyword arguments, ``model_type`` included) of a key of :data:`SHAPES`; the tiny
    shape's vocabulary is the tiny thinking tokenizer's."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    dims = {"model_type": "qwen3", **SHAPES[shape]}
    dims.setdefault("vocab_size", len(tiny_tokenizer(thinking=True)))
    return dims


def random_model(shape: str, device: str = "cpu", dtype=None, seed: int = 0,
                 tokenizer_dir: str | Path | None = None):
    """A thinking Qwen3 ``(model, tokenizer)`` with random weights at ``shape`` (a key of :data:`SHAPES`).

    ``"tiny"`` uses the tiny character tokenizer; a real shape uses the tokenizer in ``tokenizer_dir``, the
    embedded :data:`SHAPE_TOKENIZER`'s (the same 151k vocabulary family), with ``<think>`` tokens added:
    ``load_model("random:<shape>")`` passes it. The weights are drawn on ``device`` directly (an 8B model in
    seconds on a GPU); the model answers nonsense, and every item runs to its budget, which is what a memory
    and speed dry run needs.
    """
    dims = shape_config(shape)
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape != "tiny" and tokenizer_dir is None:
        raise ValueError(f"the {shape!r} shape needs the folder of the {SHAPE_TOKENIZER} tokenizer: load it with "
                         f"kvlib.load_model('random:{shape}')")
    tok = _thinking_tokenizer(None if shape == "tiny" else tokenizer_dir)
    if len(tok) > dims["vocab_size"]:  # the added <think> tokens: grow the embedding to the next 64 rows
        dims["vocab_size"] = -(-len(tok) // 64) * 64
    config = AutoConfig.for_model(dims.pop("model_type"), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=None, **dims)
    dtype = dtype or torch.float32
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    return model, tok
