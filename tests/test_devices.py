"""Cache readers on a model whose layers sit on several devices (``device_map="auto"`` on a large model).

Layers 0-1 of a tiny model on ``cuda:0`` and the rest on the CPU (accelerate's dispatch, as ``device_map`` does):
every reader gives what it gives on the CPU alone. Skipped without CUDA.
"""

import pytest
import torch

from kvlib import tiny_model
from kvlib.core.decoding import DecodeConfig, decode, prefill
from kvlib.switching.difficulty import FeatureSpec, last_n_sums, live_features
from kvlib.core.pooling import token_trajectory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = ["hello there, what is 3+4?", "hi", "a much longer prompt with many characters in it, really"]


def _split(model):
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map) if DEVICE == "cuda" else model


DEVICE = "cuda"


def test_readers_work_when_layers_sit_on_cuda_and_cpu():
    from kvlib.core.cache import cache_layers, output_cache
    from kvlib.selfeval.coe import hidden_trajectories

    cpu, tok = tiny_model("qwen3", seed=4)
    split, _ = tiny_model("qwen3", seed=4)
    split = _split(split)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=12, stop_token_ids=(-1,))
    assert not cfg.static_for(split, "cuda:0")  # spread over devices: eager, dynamic cache
    a, b = decode(cpu, enc.input_ids, enc.attention_mask, cfg), decode(split, enc.input_ids, enc.attention_mask, cfg)
    assert {layer.keys.device.type for layer in cache_layers(b.state.cache)} == {DEVICE, "cpu"}
    assert a.tokens == b.tokens
    for row in range(len(PROMPTS)):
        ta = token_trajectory(a.state.cache, row, a.state.slots[row], part="both")
        tb = token_trajectory(b.state.cache, row, b.state.slots[row], part="both")
        assert torch.allclose(ta, tb.cpu(), atol=1e-4)
    fa = live_features(a.state, range(len(PROMPTS)), FeatureSpec(n_tokens=4, n_layers=3))
    fb = live_features(b.state, range(len(PROMPTS)), FeatureSpec(n_tokens=4, n_layers=3))
    assert torch.allclose(fa, fb.cpu(), atol=1e-4)
    ma = enc.attention_mask
    sa = last_n_sums(output_cache(prefill(cpu, enc.input_ids, ma)), ma, (2, 4), [0, 2])
    sb = last_n_sums(output_cache(prefill(split, enc.input_ids, ma)), ma.to(DEVICE), (2, 4), [0, 2])
    assert torch.allclose(sa, sb.cpu(), atol=1e-4, equal_nan=True)
    ha, _ = hidden_trajectories(cpu, [[5, 6, 7]], [[8, 9]])
    hb, _ = hidden_trajectories(split, [[5, 6, 7]], [[8, 9]])
    assert torch.allclose(ha[0], hb[0], atol=1e-4)
