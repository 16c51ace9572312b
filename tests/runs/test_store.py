"""The result store: identity of models and extractors, one writer per file, readers, tie of derived stores."""

import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvlib.core.models
import kvlib.runs.store
from kvlib import GenerationSettings, Prompt, generate, kv_trajectory_extractor, open_store, tiny_model
from kvlib.selfeval.coe import hidden_coe_pass
from kvlib.switching.difficulty import prompt_kv_extractor
from kvlib.runs.identity import callable_identity, differences, model_identity
from kvlib.runs.store import CorruptStoreError, ResultStore, StoreIdentityWarning, StoreLockedError, StoreMismatchError

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"weights": {"kind": "memory", "config": "c", "parameters": "p"}}  # a stand-in model identity


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=3)


def _store(root, **kw) -> ResultStore:
    return ResultStore(root, "m", "d", {"max_new_tokens": 4}, model_identity=MODEL, **kw)


def _held_elsewhere(store: ResultStore) -> bool:
    """Whether another open file description could take the store's lock now (as another process would)."""
    fd = os.open(store.path.with_name(store.path.name + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ---------- model identity ----------

def test_model_identity_tells_weights_dtype_and_tokenizer_apart(tiny):
    model, tok = tiny
    ident = model_identity(model, tok)
    assert ident == model_identity(*tiny_model("qwen2", seed=3))  # stable for the same weights
    assert ident["device"] == "cpu" and ident["dtype"] == "float32" and ident["weights"]["kind"] == "memory"
    assert differences(ident, model_identity(*tiny_model("qwen2", seed=4))) == ["weights.parameters"]
    assert differences(ident, model_identity(model.to(torch.float64), tok)) == ["dtype", "weights.parameters"]
    model.to(torch.float32)
    other_tok = tiny_model("qwen2", seed=3)[1]
    other_tok.chat_template = other_tok.chat_template + "{{ '' }}"
    assert differences(ident, model_identity(model, other_tok)) == ["tokenizer"]


def test_embedded_models_are_identified_by_their_pinned_hash(tiny, monkeypatch):
    model, tok = tiny
    model.kvlib_source = "qwen2.5-0.5b"  # as load_model("qwen2.5-0.5b") marks it
    try:
        weights = model_identity(model, tok)["weights"]
        spec = kvlib.core.models.EMBEDDED_MODELS["qwen2.5-0.5b"]
        assert weights["kind"] == "embedded" and weights["sha256"] == spec.sha256
        monkeypatch.setitem(
            kvlib.core.models.EMBEDDED_MODELS, "qwen2.5-0.5b", dataclasses.replace(spec, sha256="0" * 64)
        )
        assert model_identity(model, tok)["weights"]["sha256"] == "0" * 64
    finally:
        del model.kvlib_source


def test_a_local_folder_is_identified_by_its_config_and_weight_files(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("qwen2", seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    weights = model_identity(loaded, tok)["weights"]
    assert weights["kind"] == "local" and weights["files"]["model.safetensors"] > 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "note": "edited"}))
    assert differences(weights, model_identity(loaded, tok)["weights"]) == ["config_sha256"]


def test_a_hub_model_is_identified_by_its_commit(tiny):
    model, tok = tiny
    model.config._name_or_path, model.config._commit_hash = "org/name", "a" * 40
    try:
        weights = model_identity(model, tok)["weights"]
        assert weights["kind"] == "hub" and weights["id"] == "org/name" and weights["commit"] == "a" * 40
        model.config._commit_hash = "b" * 40
        assert differences(weights, model_identity(model, tok)["weights"]) == ["commit"]
    finally:
        model.config._name_or_path, model.config._commit_hash = "", None


# ---------- extractor identity ----------

def test_extractor_parameters_are_part_of_their_identity():
    assert callable_identity(kv_trajectory_extractor()) == callable_identity(kv_trajectory_extractor())
    assert callable_identity(kv_trajectory_extractor()) != callable_identity(kv_trajectory_extractor(("values",)))
    assert (callable_identity(kv_trajectory_extractor(dtype=np.float32))
            != callable_identity(kv_trajectory_extractor(dtype=np.float16)))
    kv_sums = callable_identity(prompt_kv_extractor((4, 8), keep_layers=3))
    assert kv_sums != callable_identity(prompt_kv_extractor((4, 8), keep_layers=2))
    assert kv_sums != callable_identity(prompt_kv_extractor((4, 16), keep_layers=3))

    def scaled(model, result, ids, mask, scale=1.0):
        return []

    assert callable_identity(functools.partial(scaled, scale=2.0)) != callable_identity(functools.partial(scaled))
    assert callable_identity(scaled) != callable_identity(lambda model, result, ids, mask: [])
    state = {"calls": 0}
    counting = lambda model, result, ids, mask: state.update(calls=state["calls"] + 1)  # noqa: E731
    before = callable_identity(counting)
    state["calls"] = 5  # a dict in the closure is state, not a parameter
    assert callable_identity(counting) == before
    counting.kvlib_identity = {"version": 2}
    assert callable_identity(counting) == {"declared": {"version": 2}}


def test_format_version_is_part_of_the_identity(tmp_path, monkeypatch):
    a = _store(tmp_path, readonly=True)
    monkeypatch.setattr(kvlib.runs.store, "FORMAT_VERSION", kvlib.runs.store.FORMAT_VERSION + 1)
    assert _store(tmp_path, readonly=True).path != a.path


def test_a_file_under_another_identity_name_is_refused_naming_the_difference(tmp_path):
    a = _store(tmp_path)
    a.add([{"item_id": "x", "input_sha256": "h"}])
    a.close()
    b = ResultStore(tmp_path, "m", "d", {"max_new_tokens": 5}, readonly=True)
    b.bind(MODEL)
    shutil.copy(a.path, b.path)  # a renamed or copied file
    with pytest.raises(CorruptStoreError, match=r"header of another run \(differing: settings\.max_new_tokens\)"):
        len(b)


# ---------- one writer, many readers ----------

def test_the_same_process_may_open_a_store_twice_and_both_stay_coherent(tmp_path):
    a = _store(tmp_path)
    b = _store(tmp_path)  # e.g. a notebook cell run again: no refusal of itself
    a.add([{"item_id": "x", "input_sha256": "h"}])
    assert "x" in b  # b re-reads what a appended
    with pytest.raises(ValueError, match="'x' is already stored"):
        b.add([{"item_id": "x", "input_sha256": "h"}])
    b.add([{"item_id": "y", "input_sha256": "h"}])
    assert [r["item_id"] for r in a.records()] == ["x", "y"]
    assert len(a.path.read_text().splitlines()) == 1 + 2
    a.close()
    assert _held_elsewhere(b)  # b still holds the lock
    b.close()
    assert not _held_elsewhere(b)  # the last close releases it


def test_a_reader_never_truncates_a_partial_last_line(tmp_path):
    a = _store(tmp_path)
    a.add([{"item_id": "x", "input_sha256": "h"}])
    with open(a.path, "ab") as f:
        f.write(b'{"item_id":"y","settin')  # a write in progress (or torn by a kill)
    before = a.path.read_bytes()
    reader = _store(tmp_path, readonly=True)
    assert len(reader) == 1 and a.path.read_bytes() == before
    with pytest.raises(PermissionError, match="readonly"):
        reader.add([{"item_id": "z", "input_sha256": "h"}])
    with pytest.warns(UserWarning, match="partial last record"):
        a.add([{"item_id": "z", "input_sha256": "h"}])  # the writer (lock holder) repairs the tail
    assert len(reader) == 2 and [r["item_id"] for r in reader.records()] == ["x", "z"]


HOLDER = """
import sys, time
from kvlib.runs.store import ResultStore
store = ResultStore(sys.argv[1], "m", "d", {"max_new_tokens": 4},
                    model_identity={"weights": {"kind": "memory", "config": "c", "parameters": "p"}})
store.add([{"item_id": "x", "input_sha256": "h"}])
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    path = _store(tmp_path, readonly=True).path
    try:
        deadline = time.time() + 240
        while not (path.exists() and "x" in _store(tmp_path, readonly=True)):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the holder process did not start in time"
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match=rf"{path.name} is being written by pid {proc.pid} on host .*"
                                                   r"wait for that run to finish"):
            _store(tmp_path)
        assert len(_store(tmp_path, readonly=True)) == 1  # reading is always allowed
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = _store(tmp_path)  # the kernel dropped the dead holder's lock: taken over
    store.add([{"item_id": "y", "input_sha256": "h"}])
    assert [r["item_id"] for r in store.records()] == ["x", "y"]
    assert json.loads(path.with_name(path.name + ".lock").read_text())["pid"] == os.getpid()


# ---------- derived stores ----------

def test_hidden_coe_store_is_tied_to_the_answers_it_was_computed_from(tiny, tmp_path):
    model, tok = tiny
    settings = GenerationSettings(max_new_tokens=6)
    prompts = [Prompt(f"q{i}", f"What is {i} + {i}?") for i in range(3)]
    records = generate(model, tok, prompts, open_store(tmp_path, "m", "d", settings), settings, progress=False)
    hidden_coe_pass(model, tok, "m", "d", records, root=tmp_path / "h", progress=False)
    changed = [dict(r, token_ids=r["token_ids"][:-1]) if r["item_id"] == "q1" else r for r in records]
    with pytest.raises(StoreMismatchError, match=r"1 item\(s\) .*'q1'"):
        hidden_coe_pass(model, tok, "m", "d", changed, root=tmp_path / "h", progress=False)
    other, _ = tiny_model("qwen2", seed=4)  # another re-forwarding model: another store, recomputed
    with pytest.warns(StoreIdentityWarning, match=r"differing: model\.weights\.parameters\)"):
        again = hidden_coe_pass(other, tok, "m", "d", records, root=tmp_path / "h", progress=False)
    assert len(list((tmp_path / "h" / "hidden_coe" / "m").glob("*.jsonl"))) == 2 and len(again) == 3


# ---------- binary sidecars ----------


def test_arrays_live_in_a_binary_sidecar_read_only_when_asked(tmp_path):
    from kvlib.runs.store import StoredArray, decode_array, encode_array, sidecar_path

    traj = np.arange(24, dtype=np.float16).reshape(6, 4) / 7
    store = _store(tmp_path)
    store.add([{"item_id": "a", "arrays": {"traj": traj, "n": np.asarray([3], dtype=np.int64)}},
               {"item_id": "b", "arrays": {"old": encode_array(np.ones(2, dtype=np.float32))}},  # base64 in: binary out
               {"item_id": "c", "output": "no arrays"}])
    side = sidecar_path(store.path)
    assert side.stat().st_size == traj.nbytes + 8 + 8  # raw bytes, no header, no base64
    assert "AAAA" not in store.path.read_text() and '"$bin"' in store.path.read_text()
    for reader in (store, ResultStore(tmp_path, "m", "d", {"max_new_tokens": 4}, model_identity=MODEL, readonly=True)):
        a = reader.get("a")["arrays"]
        assert all(isinstance(v, StoredArray) for v in a.values())  # handles in memory, not arrays
        got = decode_array(a["traj"])
        assert got.dtype == np.float16 and np.array_equal(got, traj) and np.asarray(a["n"]).tolist() == [3]
        assert decode_array(reader.get("b")["arrays"]["old"]).tolist() == [1.0, 1.0]
    # a record read back can be stored again elsewhere (e.g. a shard merged into its store): the bytes are copied
    other = ResultStore(tmp_path, "m", "d2", {"max_new_tokens": 4}, model_identity=MODEL)
    other.add([store.get("a")])
    assert np.array_equal(decode_array(other.get("a")["arrays"]["traj"]), traj)


def test_a_damaged_sidecar_names_the_item_and_a_run_killed_between_the_two_writes_loses_nothing(tmp_path):
    from kvlib.runs.store import decode_array, sidecar_path

    store = _store(tmp_path)
    store.add([{"item_id": "a", "arrays": {"x": np.arange(8, dtype=np.float32)}}])
    side = sidecar_path(store.path)
    with open(side, "ab") as f:  # a run killed after its arrays, before its line: bytes nothing refers to
        f.write(b"\x00" * 13)
    store.add([{"item_id": "b", "arrays": {"x": np.full(3, 2.0, dtype=np.float32)}}])
    fresh = _store(tmp_path)
    assert decode_array(fresh.get("b")["arrays"]["x"]).tolist() == [2.0, 2.0, 2.0]
    data = bytearray(side.read_bytes())
    data[4] ^= 0xFF  # one flipped byte in item a's array
    side.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"item 'a' .* changed \(checksum mismatch\)"):
        decode_array(_store(tmp_path).get("a")["arrays"]["x"])
    side.write_bytes(bytes(data[:20]))  # cut short: found on opening, every line checked, not when read
    with pytest.raises(CorruptStoreError, match=r"line\(s\) 2, 3: the arrays of item\(s\) 'a', 'b' lie beyond the end"):
        _store(tmp_path)
