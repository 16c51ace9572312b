"""Item loops sharded over launched processes (RANK / WORLD_SIZE): each writes its own shard file, rank 0 merges."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kvlib.runs.generation
from kvlib import GenerationSettings, Prompt, generate, open_store, tiny_model
from kvlib.runs.sharding import SINGLE, Shard, ShardError, current_shard, shard_path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = GenerationSettings(max_new_tokens=8)


def _prompts(n=7):
    return [Prompt(f"q{i}", f"What is {i} + {2 * i}? " + "x" * (i % 4)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=3)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """token_ids per item of a plain single-process run."""
    model, tok = tiny
    store = open_store(tmp_path_factory.mktemp("single"), "m", "d", SETTINGS)
    recs = generate(model, tok, _prompts(), store, SETTINGS, batch_size=7, progress=False, shard=SINGLE)
    return {r["item_id"]: r["token_ids"] for r in recs}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.shard-*"))


# ---------- Shard, current_shard ----------

def test_current_shard_reads_the_launcher_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current_shard() == SINGLE == Shard(0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert current_shard() == Shard(1, 3)
    assert current_shard({"RANK": "0", "WORLD_SIZE": "1"}) == SINGLE
    with pytest.raises(ValueError, match="set both or neither"):
        current_shard({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        current_shard({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK=2, WORLD_SIZE=2: .*rank is in 0\.\.1"):
        current_shard({"RANK": "2", "WORLD_SIZE": "2"})


def test_a_shard_is_validated_and_owns_every_world_th_position():
    for bad in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError):
            Shard(*bad)
    for bad in [(True, 2), (0, 2.0), ("0", 2)]:
        with pytest.raises(TypeError):
            Shard(*bad)
    s = Shard(1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rank = 0
    assert s.select(list("abcdefg")) == ["b", "e"] and str(s) == "shard 1 of 3"
    assert shard_path(Path("r/d-0123.jsonl"), s) == Path("r/d-0123.shard-1-of-3.jsonl")


# ---------- two real processes ----------

WORKER = """
import json, sys, torch
torch.set_num_threads(1)
import kvlib.runs.generation as g
from kvlib import GenerationSettings, Prompt, generate, open_store, tiny_model
rows = []
decode = g.decode
g.decode = lambda model, ids, *a, **k: (rows.append(ids.shape[0]), decode(model, ids, *a, **k))[1]
stream = g.decode_stream
g.decode_stream = lambda model, items, *a, **k: (rows.append(len(items)), stream(model, items, *a, **k))[1]
model, tok = tiny_model("qwen2", seed=3)
settings = GenerationSettings(max_new_tokens=8)
prompts = [Prompt(f"q{i}", f"What is {i} + {2 * i}? " + "x" * (i % 4)) for i in range(7)]
recs = generate(model, tok, prompts, open_store(sys.argv[1], "m", "d", settings), settings, batch_size=2,
                progress=False)
print(json.dumps({"generated": sum(rows), "records": [[r["item_id"], r["token_ids"]] for r in recs]}))
"""


def _launch(root: Path, world: int = 2) -> list[dict]:
    """``world`` processes as a launcher starts them: the same script, RANK / WORLD_SIZE in the environment."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "KVLIB_SHARD_TIMEOUT": "120"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(root)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rank {rank}:\n{err[-3000:]}"
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_share_the_items_merge_once_and_a_relaunch_reuses_them(tiny, single, tmp_path):
    first = _launch(tmp_path)
    assert first[0]["records"] == first[1]["records"]  # every rank returns all records, in prompt order
    assert [i for i, _ in first[0]["records"]] == [p.id for p in _prompts()]
    assert {i: t for i, t in first[0]["records"]} == single
    assert [o["generated"] for o in first] == [4, 3]  # positions 0,2,4,6 and 1,3,5: each item once
    assert _leftovers(tmp_path) == []  # the shard files, their locks: merged and gone

    model, tok = tiny
    store = open_store(tmp_path, "m", "d", SETTINGS, model=model, tokenizer=tok, readonly=True)
    lines = store.path.read_text().splitlines()
    assert len(lines) == 1 + 7  # the header and each item once
    assert {r["item_id"]: r["token_ids"] for r in store.records()} == single

    again = _launch(tmp_path)
    assert [o["generated"] for o in again] == [0, 0]
    assert again[0]["records"] == again[1]["records"] == first[0]["records"]
    assert store.path.read_text().splitlines() == lines and _leftovers(tmp_path) == []


# ---------- waiting: a shard that does not come, one that failed, resuming ----------

def _count_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    decode = kvlib.runs.generation.decode

    def counting(model, ids, *a, **k):
        rows.append(ids.shape[0])
        return decode(model, ids, *a, **k)

    monkeypatch.setattr(kvlib.runs.generation, "decode", counting)
    stream = kvlib.runs.generation.decode_stream

    def counting_stream(model, items, *a, **k):  # continuous batching: the items decoded
        rows.append(len(items))
        return stream(model, items, *a, **k)

    monkeypatch.setattr(kvlib.runs.generation, "decode_stream", counting_stream)
    return rows


def test_a_missing_shard_times_out_naming_it_and_a_relaunch_resumes_from_the_shard_files(tiny, single, tmp_path,
                                                                                       monkeypatch):
    model, tok = tiny
    rows = _count_rows(monkeypatch)
    monkeypatch.setenv("KVLIB_SHARD_TIMEOUT", "0.3")
    run = lambda shard: generate(
        model,
        tok,
        _prompts(),
        open_store(tmp_path, "m", "d", SETTINGS),
        SETTINGS,  # noqa: E731
        batch_size=2,
        progress=False,
        shard=shard,
    )
    with pytest.raises(ShardError, match=r"shard 1 of 2 lacks 3 item\(s\) \('q1', 'q3', 'q5'; file "
                                         r"d-[0-9a-f]+\.shard-1-of-2\.jsonl, not started\)"):
        run(Shard(0, 2))
    assert sum(rows) == 4  # rank 0's part, kept in its shard file
    assert [n.split(".", 1)[1] for n in _leftovers(tmp_path)] == ["shard-0-of-2.jsonl", "shard-0-of-2.jsonl.lock"]
    with pytest.raises(ShardError, match="Every shard is done, but rank 0 has not merged them"):
        run(Shard(1, 2))  # rank 1 does its part; nobody merges
    assert sum(rows) == 7
    recs = run(Shard(0, 2))  # rank 0 relaunched: its part is in its file; it merges
    assert sum(rows) == 7 and {r["item_id"]: r["token_ids"] for r in recs} == single
    assert _leftovers(tmp_path) == []


def test_a_failed_shard_stops_the_waiting_ones_at_once(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("KVLIB_SHARD_TIMEOUT", "60")
    results = {}

    def rank0():
        try:
            generate(model, tok, _prompts(), open_store(tmp_path, "m", "d", SETTINGS), SETTINGS, batch_size=4,
                     progress=False, shard=Shard(0, 2))
        except Exception as e:  # noqa: BLE001
            results[0] = e

    def broken(chunk):
        raise RuntimeError("out of memory (scripted)")

    t0 = time.monotonic()
    waiting = threading.Thread(target=rank0)
    waiting.start()
    while not list(tmp_path.rglob("*.shard-0-of-2.jsonl")):  # rank 0 has done its part and waits
        assert waiting.is_alive() and time.monotonic() - t0 < 30, results
        time.sleep(0.02)
    with pytest.raises(RuntimeError, match="scripted"):
        generate(model, tok, _prompts(), open_store(tmp_path, "m", "d", SETTINGS), SETTINGS, batch_size=4,
                 progress=False, controller_factory=broken, shard=Shard(1, 2))
    waiting.join(30)
    assert isinstance(results.get(0), ShardError), results
    assert "rank 1 of 2" in str(results[0]) and "RuntimeError: out of memory (scripted)" in str(results[0])
    assert time.monotonic() - t0 < 20


def test_replay_is_sharded_the_same_way(tiny, tmp_path, monkeypatch):
    from kvlib.runs.replay import replay_generate

    model, tok = tiny
    plain = generate(model, tok, _prompts(), open_store(tmp_path / "plain", "m", "d", SETTINGS), SETTINGS,
                     progress=False, shard=SINGLE)
    references = {r["item_id"]: r for r in plain if r["item_id"] != "q3"}  # q3 has none: generated live
    monkeypatch.setenv("KVLIB_SHARD_TIMEOUT", "0.3")
    run = lambda shard: replay_generate(model, tok, _prompts(), open_store(tmp_path, "m", "d", SETTINGS),  # noqa: E731
                                        references, SETTINGS, batch_size=2, progress=False, shard=shard)
    with pytest.raises(ShardError, match=r"shard 0 of 2 lacks 4 item\(s\)"):
        run(Shard(1, 2))  # rank 1 first: its part (q3 live), then nobody else comes
    recs = run(Shard(0, 2))
    assert [r["token_ids"] for r in recs] == [r["token_ids"] for r in plain]
    assert [r["item_id"] for r in recs if "replayed_until" not in r] == ["q3"]
    assert _leftovers(tmp_path) == []


def test_shards_with_arrays_merge_their_sidecars_into_the_store(tiny, tmp_path):
    """Shard files keep their arrays in their own sidecars; the merge copies the bytes into the store's sidecar
    and deletes the shard sidecars with the shard files."""
    import numpy as np

    from kvlib import kv_trajectory_extractor
    from kvlib.runs.generation import record_array

    model, tok = tiny
    ex = {"kv": kv_trajectory_extractor()}
    run = lambda root, shard: generate(model, tok, _prompts(), open_store(root, "m", "d", SETTINGS, ex),  # noqa: E731
                                       SETTINGS, extractors=ex, batch_size=2, progress=False, shard=shard)
    alone = {r["item_id"]: record_array(r, "traj_values") for r in run(tmp_path / "one", SINGLE)}
    with pytest.raises(ShardError):  # rank 1 has not run yet: rank 0 keeps its part in its shard files
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KVLIB_SHARD_TIMEOUT", "0.2")
            run(tmp_path / "two", Shard(0, 2))
    assert any(n.endswith(".jsonl.bin") for n in _leftovers(tmp_path / "two"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLIB_SHARD_TIMEOUT", "0.2")
        with pytest.raises(ShardError):
            run(tmp_path / "two", Shard(1, 2))
    merged = run(tmp_path / "two", Shard(0, 2))
    assert _leftovers(tmp_path / "two") == []
    for r in merged:
        a = record_array(r, "traj_values")
        assert a.dtype == np.float16 and np.allclose(a, alone[r["item_id"]], atol=2e-3)  # other batch neighbours
