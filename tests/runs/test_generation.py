"""Batched resumable generation: store records, resume after a kill, corrupt files, trajectories."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlib import GenerationSettings, Prompt, generate, kv_trajectory_extractor, open_store, record_array, tiny_model
from kvlib.core.cache import kv_layers, output_cache
from kvlib.runs.store import CorruptStoreError, StoreIdentityWarning, StoreMismatchError


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
    state = {"calls": 0, "die_at": 2, "seen": []}

    def dying(model_, result, ids, mask):  # state is a dict: mutable state, not part of the store identity
        state["calls"] += 1
        if state["calls"] == state["die_at"]:
            raise Kill  # the process dies while the second batch is in flight
        state["seen"].extend(result.tokens)
        return [{} for _ in result.tokens]

    ex = {"dying": dying}
    store = open_store(tmp_path, "m", "d", SETTINGS, ex)
    with pytest.raises(Kill):
        generate(model, tok, _prompts(), store, SETTINGS, batch_size=3, extractors=ex, progress=False)
    assert len(open_store(tmp_path, "m", "d", SETTINGS, ex, model=model, tokenizer=tok)) == 3
    state.update(die_at=-1, seen=[])
    store = open_store(tmp_path, "m", "d", SETTINGS, ex)
    recs = generate(model, tok, _prompts(), store, SETTINGS, batch_size=3, extractors=ex, progress=False)
    assert len(state["seen"]) == 4  # only the 4 missing items were generated
    ids = [json.loads(line)["item_id"] for line in store.path.read_text().splitlines()[1:]]  # after the header
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
        store = open_store(tmp_path, "m", "d", SETTINGS, model=model, tokenizer=tok)
    assert len(store) == 3
    recs = generate(model, tok, _prompts(4), store, SETTINGS, batch_size=2, progress=False)
    assert len(recs) == 4 and len(store.path.read_text().splitlines()) == 1 + 4  # header + records


def test_corrupt_middle_line_is_a_clear_error_and_nothing_is_deleted(tiny, tmp_path):
    model, tok = tiny
    store = open_store(tmp_path, "m", "d", SETTINGS)
    generate(model, tok, _prompts(3), store, SETTINGS, batch_size=3, progress=False)
    lines = store.path.read_text().splitlines()
    lines[2] = lines[2][:20]  # the second record (line 1 is the header)
    store.path.write_text("\n".join(lines) + "\n")
    before = store.path.read_bytes()
    store.close()
    with pytest.raises(CorruptStoreError, match="line 3"):
        open_store(tmp_path, "m", "d", SETTINGS, model=model, tokenizer=tok)
    assert store.path.read_bytes() == before


def test_settings_change_the_run_identity(tiny, tmp_path):
    model, tok = tiny
    kw = dict(model=model, tokenizer=tok)
    a = open_store(tmp_path, "m", "d", SETTINGS, **kw)
    b = open_store(tmp_path, "m", "d", GenerationSettings(max_new_tokens=11), **kw)
    c = open_store(tmp_path, "m", "d", SETTINGS, EX, **kw)
    d = open_store(tmp_path, "m", "d", SETTINGS, {"kv": kv_trajectory_extractor(("values",))}, **kw)
    assert len({a.path, b.path, c.path, d.path}) == 4


def test_extractor_names_alone_are_refused(tmp_path):
    with pytest.raises(TypeError, match="not their names"):
        open_store(tmp_path, "m", "d", SETTINGS, ["kv"])


def test_generate_refuses_a_store_opened_for_other_settings_or_extractors(tiny, tmp_path):
    model, tok = tiny
    store = open_store(tmp_path, "m", "d", SETTINGS, EX)
    with pytest.raises(StoreMismatchError, match=r"differing: settings\.max_new_tokens"):
        generate(model, tok, _prompts(2), store, GenerationSettings(max_new_tokens=11), extractors=EX, progress=False)
    values_only = {"kv": kv_trajectory_extractor(("values",))}
    with pytest.raises(StoreMismatchError, match=r"differing: settings\.extractors\.kv\.params\.parts"):
        generate(model, tok, _prompts(2), store, SETTINGS, extractors=values_only, progress=False)
    assert not store.path.exists()  # nothing was generated


def test_another_model_under_the_same_name_is_another_store(tiny, tmp_path):
    """Same model name, config, settings and prompts, other weights: a new file, nothing reused."""
    model, tok = tiny
    other, _ = tiny_model("qwen2", seed=4)  # the same config, other random weights
    a = open_store(tmp_path, "m", "d", SETTINGS)
    first = generate(model, tok, _prompts(3), a, SETTINGS, progress=False)
    b = open_store(tmp_path, "m", "d", SETTINGS)
    with pytest.warns(StoreIdentityWarning, match=r"another model .*differing: model\.weights\.parameters"):
        second = generate(other, tok, _prompts(3), b, SETTINGS, progress=False)
    fresh = generate(other, tok, _prompts(3), open_store(tmp_path / "fresh", "m", "d", SETTINGS), SETTINGS,
                     progress=False)
    assert a.path != b.path
    assert [r["token_ids"] for r in second] == [r["token_ids"] for r in fresh] != [r["token_ids"] for r in first]
    with pytest.raises(StoreMismatchError, match=r"differing: model\.weights\.parameters"):
        generate(model, tok, _prompts(3), b, SETTINGS, progress=False)  # a bound store keeps its model


def test_a_changed_prompt_for_a_stored_item_is_an_error_naming_it(tiny, tmp_path):
    model, tok = tiny
    generate(model, tok, _prompts(4), open_store(tmp_path, "m", "d", SETTINGS), SETTINGS, progress=False)
    changed = [Prompt(p.id, p.text + " Explain." if p.id in ("q1", "q3") else p.text) for p in _prompts(5)]
    store = open_store(tmp_path, "m", "d", SETTINGS)
    with pytest.raises(StoreMismatchError, match=r"2 item\(s\) .*'q1', 'q3'.*new ids"):
        generate(model, tok, changed, store, SETTINGS, progress=False)
    assert len(store.path.read_text().splitlines()) == 1 + 4  # q4 was not generated either


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


# ---------- a real SIGKILL in the middle of a run, resumed by a fresh process ----------

ROOT = Path(__file__).resolve().parents[2]
N_KILL = 10
RUNNER = """
import json, sys, time
import torch
torch.set_num_threads(1)
import kvlib.runs.generation as g
from kvlib import GenerationSettings, Prompt, generate, kv_trajectory_extractor, open_store, tiny_model
root, delay, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model, tok = tiny_model("qwen2", seed=3)
prompts = [Prompt(f"q{i}", f"What is {i} + {2 * i}? " + "x" * (i % 4)) for i in range(n)]
settings, ex, rows = GenerationSettings(max_new_tokens=10), {"kv": kv_trajectory_extractor()}, []
decode_stream = g.decode_stream
def paced(model, items, on_finish, *a, **k):  # a pause before each hand-over: the parent kills between two flushes
    def slow(part):
        time.sleep(delay)
        rows.append(len(part.rows))
        on_finish(part)
    return decode_stream(model, items, slow, *a, **k)
g.decode_stream = paced
generate(model, tok, prompts, open_store(root, "m", "d", settings, ex), settings, batch_size=2, extractors=ex,
         progress=False)
print(json.dumps({"generated": sum(rows)}))
"""


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_mid_run_then_resume_in_a_fresh_process(tiny, tmp_path):
    """A generation process is SIGKILLed after its first flushed batch; a fresh process resumes: no item lost
    or repeated, the store loads, and the records equal those of an uninterrupted run."""
    model, tok = tiny
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path)]
    proc = subprocess.Popen([*cmd, "2.0", str(N_KILL)], cwd=ROOT, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        folder = tmp_path / "generation" / "m"
        while not any(len(p.read_bytes().splitlines()) >= 2 for p in folder.glob("d-*.jsonl")):  # header + 1 record
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the generation process flushed nothing in time"
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reader = open_store(tmp_path, "m", "d", SETTINGS, EX, model=model, tokenizer=tok, readonly=True)
    done = len(reader)
    assert 1 <= done < N_KILL

    out = subprocess.run([*cmd, "0", str(N_KILL)], cwd=ROOT, env=_child_env(), capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert json.loads(out.stdout.decode().splitlines()[-1])["generated"] == N_KILL - done  # only the missing items

    prompts = [Prompt(f"q{i}", f"What is {i} + {2 * i}? " + "x" * (i % 4)) for i in range(N_KILL)]
    lines = reader.path.read_text().splitlines()
    ids = [json.loads(line)["item_id"] for line in lines[1:]]
    assert sorted(ids) == sorted(p.id for p in prompts) and len(ids) == len(set(ids))  # none lost, none twice
    store = open_store(tmp_path, "m", "d", SETTINGS, EX, model=model, tokenizer=tok)
    assert len(store) == N_KILL  # loads; and in-process identity == the child processes' identity
    ref = generate(model, tok, prompts, open_store(tmp_path / "ref", "m", "d", SETTINGS, EX), SETTINGS,
                   batch_size=N_KILL, extractors=EX, progress=False)
    got = store.records([p.id for p in prompts])
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(record_array(a, "traj_values"), record_array(b, "traj_values"), atol=2e-3)


def test_repeated_prompt_ids_are_named(tiny, tmp_path):
    model, tok = tiny
    prompts = [Prompt("a", "x"), Prompt("b", "y"), Prompt("a", "z"), Prompt("c", "w"), Prompt("c", "v")]
    with pytest.raises(ValueError, match="prompt ids must be unique; repeated: 'a', 'c'$"):
        generate(model, tok, prompts, open_store(tmp_path, "m", "d", GenerationSettings(max_new_tokens=2)),
                 GenerationSettings(max_new_tokens=2), progress=False)
