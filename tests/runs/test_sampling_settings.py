"""Sampling: top-k before top-p, per-item seeds, and settings read from a model's generation config."""

import pytest
import torch
from transformers import GenerationConfig

from kvlib import tiny_model
from kvlib.core.decoding import DecodeConfig, decode, next_token_probs, prefill
from kvlib.runs.generation import GenerationSettings, Prompt, decode_config, generate, open_store
from kvlib.runs.sampling_settings import sampling_from_generation_config

PROMPTS = ["hello there, what is 3+4?", "hi", "a much longer prompt with many characters in it, really", "2+2="]


def test_top_k_then_top_p_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    k3 = next_token_probs(logits, DecodeConfig(do_sample=True, top_k=3))
    assert torch.allclose(k3, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)
    # top-p reads the distribution left by top-k: 0.4/0.85 + 0.3/0.85 = 0.82 >= 0.8, so two tokens stay
    k3p = next_token_probs(logits, DecodeConfig(do_sample=True, top_k=3, top_p=0.8))
    assert torch.allclose(k3p, torch.tensor([[0, 0.4, 0, 0.3, 0]]) / 0.7)
    p_only = next_token_probs(logits, DecodeConfig(do_sample=True, top_p=0.8))  # 0.4 + 0.3 + 0.15 = 0.85
    assert (p_only > 0).sum() == 3
    hot = next_token_probs(logits, DecodeConfig(do_sample=True, temperature=0.5, top_k=2))
    assert torch.allclose(hot, torch.tensor([[0, 16, 0, 9, 0]]) / 25.0)  # temperature before top-k
    with pytest.raises(ValueError, match="top_k"):
        DecodeConfig(top_k=-1)


def test_top_k_restricts_the_support_of_every_sample():
    model, tok = tiny_model("qwen2")
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=1, do_sample=True, temperature=3.0, top_k=4)
    out = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=1))
    logits = prefill(model, enc.input_ids, enc.attention_mask).logits[:, -1]  # positions as decode() counts them
    allowed = [set(row.topk(4).indices.tolist()) for row in logits]
    seen = [set(), set()]
    for seed in range(60):
        res = decode(model, enc.input_ids, enc.attention_mask, cfg, seeds=[seed, seed + 1000])
        for i in range(2):
            seen[i].add(res.tokens[i][0])
    assert all(s <= a for s, a in zip(seen, allowed))
    assert all(len(s) >= 3 for s in seen)  # a hot temperature visits the other allowed tokens
    assert [out.tokens[i][0] in seen[i] for i in range(2)] == [True, True]


def test_top_k_one_is_greedy():
    model, tok = tiny_model("llama", seed=1)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    greedy = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=12))
    k1 = decode(model, enc.input_ids, enc.attention_mask,
                DecodeConfig(max_new_tokens=12, do_sample=True, temperature=1.7, top_k=1), seeds=[3, 1, 4, 1])
    assert k1.tokens == greedy.tokens


def test_batched_sampling_equals_one_at_a_time_with_the_same_seeds():
    model, tok = tiny_model("qwen3", seed=2)
    cfg = DecodeConfig(max_new_tokens=14, do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    seeds = [11, 22, 33, 44]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    batched = decode(model, enc.input_ids, enc.attention_mask, cfg, seeds=seeds)
    for i, (text, seed) in enumerate(zip(PROMPTS, seeds)):
        one = tok([text], return_tensors="pt")
        alone = decode(model, one.input_ids, one.attention_mask, cfg, seeds=[seed])
        assert alone.tokens[0] == batched.tokens[i]
    other = decode(model, enc.input_ids, enc.attention_mask, cfg, seeds=[11, 22, 99, 44])
    assert other.tokens[0] == batched.tokens[0] and other.tokens[2] != batched.tokens[2]


def test_settings_read_from_a_generation_config():
    qwen3_card = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    s = sampling_from_generation_config(qwen3_card, max_new_tokens=512, seed=7)
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed) == (True, 0.6, 0.95, 20, 512, 7)
    cfg = decode_config(s)
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p) == (True, 0.6, 20, 0.95)
    greedy = sampling_from_generation_config(GenerationConfig(do_sample=False, top_k=20), 64)
    assert greedy == GenerationSettings(max_new_tokens=64)  # greedy: one identity whatever the unused values
    unset = sampling_from_generation_config(GenerationConfig(do_sample=True), 64)
    assert (unset.temperature, unset.top_k, unset.top_p) == (1.0, 50, 1.0)  # what generate() fills in
    with pytest.raises(ValueError, match="min_p"):
        sampling_from_generation_config(GenerationConfig(do_sample=True, min_p=0.05), 64)
    with pytest.raises(ValueError, match="temperature"):
        sampling_from_generation_config(GenerationConfig(do_sample=True, temperature=0.0), 64)
    model, _ = tiny_model("qwen3")
    assert sampling_from_generation_config(model.generation_config, 8).do_sample is False


def test_generate_samples_each_item_as_it_would_alone(tmp_path):
    model, tok = tiny_model("qwen3", seed=2)
    settings = sampling_from_generation_config(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95,
                                                                top_k=20), max_new_tokens=10, seed=5)
    prompts = [Prompt(f"p{i}", t) for i, t in enumerate(PROMPTS)]
    together = generate(model, tok, prompts, open_store(tmp_path / "a", "m", "d", settings), settings, batch_size=4,
                        progress=False)
    apart = generate(model, tok, prompts, open_store(tmp_path / "b", "m", "d", settings), settings, batch_size=1,
                     progress=False)
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in apart]
