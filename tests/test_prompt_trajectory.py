"""The prompt + answer KV trajectory: read from the live cache at the prompt's real slots, padding never changes it,
and the prompt+answer KV-CoE scores are CoE over the prompt's points followed by the answer's."""

import numpy as np
import pytest
import torch

from kvlib import GenerationSettings, Prompt, generate, kv_layers, kv_trajectory_extractor, open_store, output_cache
from kvlib import record_array, tiny_model
from kvlib.selfeval.coe import coe_scores
from kvlib.core.pooling import prompt_slots
from kvlib.selfeval.scores import kv_coe_name, score_records

SETTINGS = GenerationSettings(max_new_tokens=9)
EX = {"kv": kv_trajectory_extractor()}
# prompts of different lengths: a batch of them is left-padded
QUESTIONS = ["1+1?", "What is seven times eight, exactly, in base ten?", "Name a prime.", "2*3 = ? " + "x " * 9]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def runs(request, tmp_path_factory):
    model, tok = tiny_model(request.param, seed=3)
    prompts = [Prompt(f"q{i}", tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True)) for i, q in enumerate(QUESTIONS)]
    out = {}
    for batch in (4, 1):
        root = tmp_path_factory.mktemp(f"{request.param}-{batch}")
        out[batch] = generate(model, tok, prompts, open_store(root, "m", "d", SETTINGS, EX), SETTINGS,
                              batch_size=batch, extractors=EX, progress=False)
    return model, tok, out


def test_prompt_trajectory_is_the_layer_mean_of_the_prompt_cache(runs):
    """traj_prompt_<part> [P, D] == layer mean of the cached keys/values at the P real prompt positions of one plain
    unpadded forward; P is the prompt's token count, D = kv_heads x head_dim."""
    model, tok, out = runs
    lengths = set()
    for rec in out[4]:
        prompt = tok(rec["prompt"], add_special_tokens=False).input_ids
        lengths.add(len(prompt))
        with torch.no_grad():
            layers = kv_layers(output_cache(model(input_ids=torch.tensor([prompt]), use_cache=True)))
        for part, idx in (("keys", 0), ("values", 1)):
            direct = torch.stack([kv[idx][0].permute(1, 0, 2).reshape(len(prompt), -1) for kv in layers]).mean(0)
            got = record_array(rec, f"traj_prompt_{part}")
            assert got.dtype == np.float16
            assert got.shape == (len(prompt), layers[0][0].shape[1] * layers[0][0].shape[-1])
            np.testing.assert_allclose(got.astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)
    assert len(lengths) > 1  # the batch of 4 really was left-padded


def test_padding_never_changes_the_prompt_and_answer_trajectory(runs):
    """Batched (left-padded) == one at a time, for the prompt's and the answer's trajectories and the scores."""
    _, _, out = runs
    for a, b in zip(out[4], out[1]):
        assert a["token_ids"] == b["token_ids"]
        for name in ("traj_prompt_keys", "traj_prompt_values", "traj_keys", "traj_values"):
            x, y = record_array(a, name), record_array(b, name)
            assert x.shape == y.shape
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=3e-3)
    graded = [[{**r, "correct": i % 2 == 0} for i, r in enumerate(out[k])] for k in (4, 1)]
    sa, sb = (score_records(g, probe=False) for g in graded)
    col = kv_coe_name("C", "V", "prompt+answer")
    assert sa[col].notna().all()
    np.testing.assert_allclose(sa[col], sb[col], rtol=2e-2, atol=2e-3)


def test_prompt_and_answer_scores_are_coe_of_the_concatenation(runs):
    _, _, out = runs
    rec = {**out[4][1], "correct": True}
    row = score_records([rec], probe=False).iloc[0]
    p = record_array(rec, "traj_prompt_values").astype(np.float64)
    a = record_array(rec, "traj_values").astype(np.float64)
    for form in ("reference", "paper"):
        want = coe_scores(np.concatenate([p, a]), form=form)
        assert row[kv_coe_name("R", "V", "prompt+answer", form)] == pytest.approx(want["R"])
        assert row[kv_coe_name("C", "V", "prompt+answer", form)] == pytest.approx(want["C"])
        assert row[kv_coe_name("C", "V", "prompt+answer", form)] != pytest.approx(row[kv_coe_name("C", "V",
                                                                                                   form=form)])


def test_prompt_slots_are_the_real_columns_without_resumed_answer_tokens():
    mask = torch.tensor([0, 0, 1, 1, 1, 1])
    assert prompt_slots(mask) == [2, 3, 4, 5]
    # a resumed row carries two earlier answer tokens at the end of its input: they are answer, not prompt
    assert prompt_slots(mask, fed=[4, 5, 6, 7]) == [2, 3]
    assert prompt_slots(torch.zeros(3, dtype=torch.long)) == []


def test_without_prompt_arrays_the_prompt_rows_are_left_out(runs, tmp_path):
    model, tok, _ = runs
    ex = {"kv": kv_trajectory_extractor(prompt=False)}
    recs = generate(model, tok, [Prompt("q", "What is 1 + 2?")], open_store(tmp_path, "m", "d", SETTINGS, ex),
                    SETTINGS, extractors=ex, progress=False)
    assert "traj_prompt_values" not in recs[0]["arrays"]
    df = score_records([{**recs[0], "correct": True}], probe=False)
    assert "KV-CoE-C (V)" in df and not any("prompt+answer" in c for c in df.columns)
