"""The cache view on every tiny architecture, and masked pooling helpers."""

import pytest
import torch

from kvlib import TINY_ARCHS, cache_layers, cache_length, kv_layers, masked_mean, masked_sum, output_cache, tiny_model
from kvlib.core.cache import UnsupportedCacheError, cache_kwargs
from kvlib.core.decoding import prefill_positions


def _prefill(arch, texts):
    model, tok = tiny_model(arch)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=True)
    return model, tok, enc, output_cache(out)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shapes_match_config(arch):
    model, _, enc, cache = _prefill(arch, ["hello world", "hi"])
    cfg = model.config
    layers = kv_layers(cache)
    assert len(layers) == cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    seq = enc.input_ids.shape[1]
    for view, (k, v) in zip(cache_layers(cache), layers):
        assert k.shape[:2] == (2, cfg.num_key_value_heads) and k.shape[-1] == head_dim
        assert v.shape == k.shape
        if view.sliding_window is None:
            assert k.shape[2] == seq and view.first_position == 0
        else:  # a sliding layer keeps the last window - 1 positions and says which
            assert k.shape[2] < seq
            assert list(view.positions) == list(range(seq - k.shape[2], seq))
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cache_length(cache) == seq


def test_sliding_layers_hold_the_last_positions():
    """Layer 0 is sliding; its values depend on the token alone (no RoPE, no attention below it), so
    the values it keeps must equal a no-window model's layer-0 values at the positions it reports."""
    import copy

    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("gemma3")
    wide_cfg = copy.deepcopy(model.config)
    wide_cfg.sliding_window = 10_000
    wide = AutoModelForCausalLM.from_config(wide_cfg).eval()
    wide.load_state_dict(model.state_dict())
    enc = tok(["abcdefghijklmnop"], return_tensors="pt")
    with torch.no_grad():
        views = cache_layers(output_cache(model(**enc, use_cache=True)))
        ref = cache_layers(output_cache(wide(**enc, use_cache=True)))
    sliding = [i for i, v in enumerate(views) if v.sliding_window is not None]
    assert sliding and len(sliding) < len(views)
    assert sliding[0] == 0 and views[0].values.shape[2] < enc.input_ids.shape[1]
    assert torch.allclose(views[0].values, ref[0].values[:, :, list(views[0].positions)], atol=1e-5)
    assert not torch.allclose(views[0].values, ref[0].values[:, :, : views[0].values.shape[2]], atol=1e-3)


def test_legacy_forms_and_clear_errors():
    k = torch.zeros(1, 2, 3, 4)
    assert len(kv_layers(((k, k), (k, k)))) == 2
    with pytest.raises(UnsupportedCacheError, match="cannot read a cache of type"):
        kv_layers({"not": "a cache"})
    with pytest.raises(UnsupportedCacheError, match="use_cache=True"):
        kv_layers(None)


def test_cache_kwargs_names_an_argument_forward_accepts():
    model, _ = tiny_model("llama")
    (name,) = cache_kwargs(model, None)
    import inspect
    assert name in inspect.signature(type(model).forward).parameters


def test_masked_pooling_ignores_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    x_padded = x.clone()
    x_padded[0, :2] = 1e6  # garbage in pad positions must not leak
    assert torch.allclose(masked_mean(x_padded, mask)[0], x[0, 2:].mean(0))
    assert torch.allclose(masked_sum(x_padded, mask)[0], x[0, 2:].sum(0))
    assert torch.allclose(masked_mean(x, mask)[1], x[1].mean(0))
    assert torch.equal(masked_mean(x, torch.zeros(2, 5))[0], torch.zeros(3))
    with pytest.raises(ValueError, match="does not match"):
        masked_mean(x, mask[:, :4])


def test_padding_does_not_change_the_cached_vectors():
    """Left padding leaves the real positions' keys and values unchanged (up to float noise),
    provided position ids count real tokens only (a plain forward without them shifts RoPE)."""
    model, tok = tiny_model("qwen2")
    alone = tok(["hi"], return_tensors="pt")
    batch = tok(["hi", "a much longer neighbour"], return_tensors="pt", padding=True)
    with torch.no_grad():
        c1 = kv_layers(output_cache(model(**alone, position_ids=prefill_positions(alone.attention_mask))))
        c2 = kv_layers(output_cache(model(**batch, position_ids=prefill_positions(batch.attention_mask))))
    n = alone.input_ids.shape[1]
    for (k1, v1), (k2, v2) in zip(c1, c2):
        assert torch.allclose(k1[0], k2[0, :, -n:], atol=1e-5)
        assert torch.allclose(v1[0], v2[0, :, -n:], atol=1e-5)
