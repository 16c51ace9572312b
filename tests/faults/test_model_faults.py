"""Findings 1, 7 and 8 on the converted-model cache: damaged or truncated converted files, staging left by a
killed conversion, a damaged KVLIB_GGUF_DIR copy, an unwritable cache. The conversion runs for real on a fake
GGUF package whose "dequantized" model is a tiny random one."""

import errno
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import transformers

from kvlib.core import models
from kvlib.core.models import EMBEDDED_MODELS, EmbeddedModel, ModelFileError, load_model
from kvlib.core.tiny import tiny_model

from .conftest import REPO


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """An embedded model "fake" (one package file) converted into a tiny random qwen2 model in $KVLIB_CACHE."""
    site = tmp_path / "site" / "kvlibfaultpkg"
    site.mkdir(parents=True)
    gguf = b"GGUF" + bytes(range(256)) * 4
    (site / "model.gguf").write_bytes(gguf)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KVLIB_GGUF_DIR", raising=False)
    spec = EmbeddedModel("fake", "a fake model", ("kvlib-fault-pkg==1.0",), ("kvlibfaultpkg/model.gguf",),
                         hashlib.sha256(gguf).hexdigest(), len(gguf))
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", spec)
    model, tok = tiny_model("qwen2", seed=3)
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: model if "gguf_file" in kw else real_model(*a, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: tok if "gguf_file" in kw else real_tok(*a, **kw))
    getattr(models, "_VERIFIED", {}).clear()
    return tmp_path / "cache" / "fake"


def test_f01_a_flipped_bit_in_a_converted_file_is_refused_naming_the_entry(fake_model):
    load_model("fake")
    weights = fake_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model.safetensors changed since its conversion .*Delete that cache "
                                             r"entry \(rm -r '.*fake'\)"):
        load_model("fake")


def test_f01_a_truncated_converted_file_is_refused_naming_the_entry(fake_model):
    load_model("fake")
    weights = fake_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"is 1000 bytes, not the .* written at conversion \(truncated"):
        load_model("fake")


def test_f01_a_truncated_safetensors_in_a_local_folder_is_a_clear_error(tmp_path):
    model, tok = tiny_model("qwen2", seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"a \.safetensors file there is damaged or truncated"):
        load_model(str(tmp_path / "m"))


def test_f01_an_entry_converted_without_digests_is_converted_again(fake_model, caplog):
    import json

    load_model("fake")
    marker = fake_model / models._MARKER
    old = json.loads(marker.read_text())
    del old["files"]
    marker.write_text(json.dumps(old))
    caplog.set_level("INFO", logger="kvlib")
    load_model("fake")
    assert "converting" in caplog.text and "files" in json.loads(marker.read_text())


_KILLED = textwrap.dedent("""
    import sys, time
    import transformers
    from kvlib import models
    from kvlib.core.models import EMBEDDED_MODELS, EmbeddedModel
    EMBEDDED_MODELS["fake"] = EmbeddedModel("fake", "a fake model", ("kvlib-fault-pkg==1.0",),
                                            ("kvlibfaultpkg/model.gguf",), None, 1)
    def slow(*a, **kw):
        print("converting", flush=True)
        time.sleep(600)
    transformers.AutoModelForCausalLM.from_pretrained = slow
    models.embedded_model_dir("fake")
""")


def test_f08_staging_of_a_killed_conversion_is_removed_at_the_next_start(fake_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "site")])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "converting"
    staging = list((tmp_path / "cache").glob(".fake.tmp-*"))
    assert len(staging) == 1
    assert models.clean_staging(tmp_path / "cache") == []  # a running conversion's staging stays
    proc.kill()
    proc.wait(timeout=30)
    assert staging[0].exists()  # SIGKILL: nothing cleaned up
    load_model("fake")
    assert not list((tmp_path / "cache").glob(".fake.tmp-*"))


def test_f07_a_damaged_kvlib_gguf_dir_copy_says_to_copy_it_again(fake_model, tmp_path, monkeypatch):
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / "fake.gguf").write_bytes(b"GGUF damaged")
    monkeypatch.setenv("KVLIB_GGUF_DIR", str(copies))
    with pytest.raises(ModelFileError) as err:
        load_model("fake")
    msg = str(err.value)
    assert "KVLIB_GGUF_DIR" in msg and "copy the assembled GGUF again" in msg and "pip" not in msg


def test_f07_a_read_only_cache_names_the_folder_and_what_to_do(fake_model, monkeypatch):
    def refuse(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(models.tempfile, "mkdtemp", refuse)
    with pytest.raises(ModelFileError, match=r"the model cache .*cache cannot be written \(Read-only file system\)"
                                             r".*set KVLIB_CACHE to a writable folder"):
        load_model("fake")


def test_f07_a_full_disk_during_conversion_names_the_folder(fake_model, monkeypatch):
    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(ModelFileError, match=r"no space left on the device holding .*cache"):
        load_model("fake")
    assert not list(fake_model.parent.glob(".fake.tmp-*"))
