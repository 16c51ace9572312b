"""Tiny random models built in-process: no weights, no downloads, well under a second.

Tests and examples use them to exercise every code path on the architectures kvlib claims
(Llama, Qwen2, Qwen3, Gemma 3 with sliding-window layers, Mistral). The tokenizer is a
character-level ``PreTrainedTokenizerFast`` built from scratch with a ChatML chat template; the
qwen3 variant has ``<think>``/``</think>`` as real special tokens and a template that honours
``enable_thinking`` as Qwen3's does.
"""

from __future__ import annotations

import string

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["tiny_model", "tiny_tokenizer", "TINY_ARCHS"]

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
