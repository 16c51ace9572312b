"""Findings 2, 9 and 11 on the result store: line checksums, duplicate items, non-UTF-8 lines, a deleted sidecar,
a deleted lock file with two writers, ENOSPC, and symbolic links in place of store and lock files."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvlib.runs.store import CorruptStoreError, DuplicateItemError, ResultStore, StoreLockedError, sidecar_path

MODEL = {"weights": {"kind": "memory", "config": "c", "parameters": "p"}}


def _store(root, **kw) -> ResultStore:
    return ResultStore(root, "m", "d", {"max_new_tokens": 4}, model_identity=MODEL, **kw)


def _filled(root):
    s = _store(root)
    s.add([{"item_id": "a", "answer": "12", "arrays": {"x": np.arange(6, dtype=np.float32)}},
           {"item_id": "b", "answer": "7", "arrays": {"x": np.ones(3, dtype=np.float32)}}])
    s.close()
    return s.path


def test_f02_a_value_edited_inside_valid_json_is_refused_naming_file_and_line(tmp_path):
    path = _filled(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"answer":"12"', b'"answer":"13"'))
    with pytest.raises(CorruptStoreError, match=r"\.jsonl, line 2: checksum mismatch.*Delete that line"):
        _store(tmp_path, readonly=True)


def test_f02_a_second_line_for_a_stored_item_is_reported_at_read(tmp_path):
    path = _filled(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines + [lines[1]]))  # item a again, as a second writer would append it
    with pytest.raises(CorruptStoreError, match=r"line 4: a second record for item 'a' \(the first is on line 2\)"):
        _store(tmp_path, readonly=True)


def test_f02_a_second_record_for_a_stored_item_is_refused_at_write(tmp_path):
    path = _filled(tmp_path)
    store = _store(tmp_path)
    before = path.read_bytes()
    with pytest.raises(DuplicateItemError, match=r"item 'a' is already stored in .*\(line 2\); nothing was added"):
        store.add([{"item_id": "c"}, {"item_id": "a"}])
    assert path.read_bytes() == before and "c" not in store


def test_f02_a_non_utf8_byte_names_file_and_line(tmp_path):
    path = _filled(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"answer":"7"', b'"answer":"\xff"'))
    with pytest.raises(CorruptStoreError, match=r"\.jsonl, line 3: not UTF-8 text"):
        _store(tmp_path, readonly=True)


def test_f02_a_deleted_sidecar_is_found_on_opening_for_every_line(tmp_path):
    """A resume opens the store: every line's sidecar slice is checked there, not one item per run later."""
    path = _filled(tmp_path)
    sidecar_path(path).unlink()
    with pytest.raises(CorruptStoreError, match=r"line\(s\) 2, 3: the arrays of item\(s\) 'a', 'b' .* is missing"):
        _store(tmp_path)


def test_f02_verify_reads_every_array(tmp_path):
    path = _filled(tmp_path)
    assert _store(tmp_path, readonly=True).verify() == 2
    side = sidecar_path(path)
    data = bytearray(side.read_bytes())
    data[-1] ^= 1
    side.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"item 'b' .* changed"):
        _store(tmp_path, readonly=True).verify()


_HOLDER = textwrap.dedent("""
    import sys
    from kvlib.runs.store import ResultStore
    MODEL = {"weights": {"kind": "memory", "config": "c", "parameters": "p"}}
    s = ResultStore(sys.argv[1], "m", "d", {"max_new_tokens": 4}, model_identity=MODEL)
    print("locked", flush=True)
    sys.stdin.readline()  # wait until the lock file is deleted and the other writer wrote
    try:
        s.add([{"item_id": "x"}])
    except Exception as err:
        print(type(err).__name__, err, flush=True)
    else:
        print("added", flush=True)
""")


def test_f09_a_deleted_lock_file_stops_the_first_writer_and_the_second_gets_a_clear_error(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": str(__import__("kvlib").__path__[0].rsplit("/", 1)[0])})
    try:
        assert proc.stdout.readline().strip() == "locked"
        lock = next(tmp_path.rglob("*.jsonl.lock"))
        lock.unlink()  # the mistake: now a second process can lock a new file of that name
        second = _store(tmp_path)
        second.add([{"item_id": "x"}])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        said = proc.stdout.readline()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert said.startswith("StoreLockedError") and "was deleted or replaced while this process held it" in said
    assert len(_store(tmp_path, readonly=True)) == 1
    with pytest.raises(DuplicateItemError, match="already stored"):  # a writer that missed it is told clearly
        second.add([{"item_id": "x"}])


def test_f07_a_full_disk_names_the_store_and_leaves_no_partial_line(tmp_path, monkeypatch):
    """ENOSPC through /dev/full (every write fails with it), in place of the store file."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system to make writes fail with ENOSPC")
    import kvlib.runs.store as st

    store = _store(tmp_path)
    store.add([{"item_id": "a"}])
    real = st.open_nofollow

    def full(path, mode="rb"):
        return open("/dev/full", "ab", buffering=0) if mode == "ab" and str(path).endswith(".jsonl") else real(
            path, mode)

    monkeypatch.setattr(st, "open_nofollow", full)
    with pytest.raises(OSError, match=r"no space left on the device holding .*KVLIB_RUNS.*resume") as err:
        store.add([{"item_id": "b"}])
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
    monkeypatch.setattr(st, "open_nofollow", real)
    assert "b" not in store and len(_store(tmp_path, readonly=True)) == 1


def test_f07_a_full_small_filesystem(tmp_path):
    """The same on a real size-limited file system (a 64 kB tmpfs) where this process may mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs CAP_SYS_ADMIN); ENOSPC is tested via /dev/full")
    try:
        store = _store(mnt)
        with pytest.raises(OSError, match="no space left on the device") as err:
            for k in range(1000):
                store.add([{"item_id": str(k), "arrays": {"x": np.zeros(1024, dtype=np.float32)}}])
        assert err.value.errno == errno.ENOSPC
        store.close()
        reader = _store(mnt, readonly=True)
        n = len(reader)
        reader.close()
        assert n == k  # every item before the failing one is kept, and readable
    finally:  # a file still open keeps the mount busy: detach it lazily then
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_f11_a_symlink_in_place_of_the_store_file_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    probe = _store(tmp_path / "runs")
    path = probe.path
    probe.close()
    path.unlink(missing_ok=True)
    path.symlink_to(victim)
    with pytest.raises(OSError, match="is a symbolic link"):
        s = _store(tmp_path / "runs")
        s.add([{"item_id": "a"}])
    assert victim.read_text() == "precious\n"


def test_f11_a_symlinked_lock_file_is_refused_and_its_target_not_truncated(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    probe = _store(tmp_path / "runs")
    lock = probe.path.with_name(probe.path.name + ".lock")
    probe.close()
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(StoreLockedError, match="is a symbolic link"):
        _store(tmp_path / "runs")
    assert victim.read_text() == "precious\n"


def test_f02_records_survive_a_round_trip_with_their_checksums(tmp_path):
    path = _filled(tmp_path)
    for line in path.read_bytes().splitlines():
        assert json.loads(line)["check"]
    s = _store(tmp_path, readonly=True)
    assert s.get("a")["answer"] == "12" and np.asarray(s.get("b")["arrays"]["x"]).tolist() == [1.0, 1.0, 1.0]
    assert "check" not in s.get("a")
