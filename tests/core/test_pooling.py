import pytest
import torch

from kvlib.core.cache import cache_layers
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.core.pooling import row_trajectories, token_trajectory
from kvlib.core.tiny import tiny_model


@pytest.mark.parametrize("part", ["keys", "values", "both"])
def test_row_trajectories_equal_each_row_read_alone(part):
    """All rows in one gather == per row, per layer indexing of the cache (bit for bit), rows of unequal lengths
    and an empty one included."""
    model, tok = tiny_model("qwen2")
    enc = tok(["2+2=", "a longer prompt here", "x"], return_tensors="pt", padding=True, add_special_tokens=False)
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=6, stop_token_ids=()))
    layers = cache_layers(res.state.cache)
    slots = [res.state.slots[0], res.state.slots[1][:3], []]
    got = row_trajectories(res.state.cache, [0, 1, 2], slots, part=part)
    names = {"keys": ["keys"], "values": ["values"], "both": ["keys", "values"]}[part]
    for row, (s, traj) in enumerate(zip(slots, got)):
        idx = torch.tensor(s, dtype=torch.long)
        per_layer = [torch.cat([getattr(layer, n)[row][:, idx].transpose(0, 1).flatten(1) for n in names],
                               -1).float() for layer in layers]
        ref = per_layer[0]
        for x in per_layer[1:]:
            ref = ref + x
        assert traj.shape == ref.shape
        assert torch.equal(traj, ref / len(layers))
        if s:
            assert torch.equal(traj, token_trajectory(res.state.cache, row, s, part=part))
