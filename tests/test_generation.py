"""Batched resumable generation: store records, resume after a kill, corrupt files, trajectories."""

import json

import numpy as np
import pytest
import torch

from kvlib import GenerationSettings, Prompt, generate, kv_trajectory_extractor, open_store, record_array, tiny_model
from kvlib.cache import kv_layers, output_cache
from kvlib.store import CorruptStoreError


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=3)


def _prompts(n=7):
    return [Prompt(f"q{i}", f"What is {i} + {2 * i}? " + "x" * (i % 4)) for i in range(n)]


SETTINGS = GenerationSettings(max_new_tokens=10)
EX = {"kv": kv_trajectory_extractor()}


def test_batched_equals_one_at_a_time(tiny, tmp_path):
    model, tok = tiny
    a = generate(model, tok, _prompts(), open_store(tmp_path / "a", "m", "d", SETTINGS, EX), SETTINGS,
                 batch_size=4, extractors=EX, progress=False)
    b = generate(model, tok, _prompts(), open_store(tmp_path / "b", "m", "d", SETTINGS, EX), SETTINGS,
                 batch_size=1, extractors=EX, progress=False)
    for ra, rb in zip(a, b):
        assert ra["item_id"] == rb["item_id"] and ra["token_ids"] == rb["token_ids"]
        assert np.allclose(ra["max_prob"], rb["max_prob"], atol=1e-5)
        assert np.allclose(record_array(ra, "traj_values"), record_array(rb, "traj_values"), atol=2e-3)


class Kill(Exception):
    pass


def test_resume_after_kill_loses_and_repeats_nothing(tiny, tmp_path):
    model, tok = tiny
    calls = {"n": 0}

    def dying(model_, result, ids, mask):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Kill  # the process dies while the second batch is in flight
        return [{} for _ in result.tokens]

    ex = {"dying": dying}
    store = open_store(tmp_path, "m", "d", SETTINGS, ex)
    with pytest.raises(Kill):
        generate(model, tok, _prompts(), store, SETTINGS, batch_size=3, extractors=ex, progress=False)
    assert len(open_store(tmp_path, "m", "d", SETTINGS, ex)) == 3
    seen = []
    ex2 = {"dying": lambda m, r, i, a: (seen.extend(r.tokens), [{} for _ in r.tokens])[1]}
    store = open_store(tmp_path, "m", "d", SETTINGS, ex2)
    recs = generate(model, tok, _prompts(), store, SETTINGS, batch_size=3, extractors=ex2, progress=False)
    assert len(seen) == 4  # only the 4 missing items were generated
    ids = [json.loads(line)["item_id"] for line in store.path.read_text().splitlines()]
    assert sorted(ids) == sorted(p.id for p in _prompts()) and len(ids) == len(set(ids))
    ref = generate(model, tok, _prompts(), open_store(tmp_path / "ref", "m", "d", SETTINGS), SETTINGS,
                   batch_size=7, progress=False)
    assert [r["token_ids"] for r in recs] == [r["token_ids"] for r in ref]


def test_partial_last_line_is_dropped_and_redone(tiny, tmp_path):
    model, tok = tiny
    store = open_store(tmp_path, "m", "d", SETTINGS)
    generate(model, tok, _prompts(4), store, SETTINGS, batch_size=2, progress=False)
    text = store.path.read_text()
    store.path.write_text(text[: len(text) - 40])  # killed in the middle of writing the last record
    with pytest.warns(UserWarning, match="partial last record"):
        store = open_store(tmp_path, "m", "d", SETTINGS)
    assert len(store) == 3
    recs = generate(model, tok, _prompts(4), store, SETTINGS, batch_size=2, progress=False)
    assert len(recs) == 4 and len(store.path.read_text().splitlines()) == 4


def test_corrupt_middle_line_is_a_clear_error_and_nothing_is_deleted(tiny, tmp_path):
    model, tok = tiny
    store = open_store(tmp_path, "m", "d", SETTINGS)
    generate(model, tok, _prompts(3), store, SETTINGS, batch_size=3, progress=False)
    lines = store.path.read_text().splitlines()
    lines[1] = lines[1][:20]
    store.path.write_text("\n".join(lines) + "\n")
    before = store.path.read_bytes()
    with pytest.raises(CorruptStoreError, match="line 2"):
        open_store(tmp_path, "m", "d", SETTINGS)
    assert store.path.read_bytes() == before


def test_settings_change_the_run_identity(tmp_path):
    a = open_store(tmp_path, "m", "d", SETTINGS)
    b = open_store(tmp_path, "m", "d", GenerationSettings(max_new_tokens=11))
    c = open_store(tmp_path, "m", "d", SETTINGS, ["kv"])
    assert len({a.path, b.path, c.path}) == 3


def test_trajectory_equals_the_cache_of_a_fresh_forward(tiny, tmp_path):
    """traj_values[t] = mean over layers of the cached values of generated token t (eq. 6)."""
    model, tok = tiny
    rec = generate(model, tok, _prompts(1), open_store(tmp_path, "m", "d", SETTINGS, EX), SETTINGS,
                   extractors=EX, progress=False)[0]
    prompt_ids = tok(rec["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
    gen = torch.tensor([rec["token_ids"][:-1]])
    with torch.no_grad():
        cache = output_cache(model(torch.cat([prompt_ids, gen], 1), use_cache=True))
    p = prompt_ids.shape[1]
    ref = torch.stack([v[0, :, p:, :].permute(1, 0, 2).reshape(gen.shape[1], -1) for _, v in kv_layers(cache)]).mean(0)
    traj = record_array(rec, "traj_values")
    assert traj.shape == tuple(ref.shape)
    assert np.allclose(traj, ref.numpy(), atol=2e-3)  # stored as float16


def test_prompt_longer_than_the_context_is_refused_before_anything_runs(tiny, tmp_path):
    model, tok = tiny
    limit = model.config.max_position_embeddings
    prompts = _prompts(3) + [Prompt("long", "y" * (limit + 5))]
    store = open_store(tmp_path, "m", "d", SETTINGS, EX)
    with pytest.raises(ValueError, match=r"1 prompt\(s\).*'long'.*nothing was generated"):
        generate(model, tok, prompts, store, SETTINGS, batch_size=2, extractors=EX, progress=False)
    assert not any(p.id in store for p in prompts)
