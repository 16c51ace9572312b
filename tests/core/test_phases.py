"""Wall-clock phases (:mod:`kvlib.core.phases`): nesting, the process registry, the ``$KVLIB_PHASES`` hand-off to
another process, and the compile warm-up of the decoding loop's compiled step."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from kvlib.core import phases
from kvlib.core.phases import phase


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(phases.ENV, raising=False)
    phases.reset()
    yield
    phases.reset()


@phase("step")
def _step(seconds: float, again: bool = False) -> str:
    time.sleep(seconds)
    if again:  # a function that calls itself (generate() on its share of a launch) stays one phase
        _step(seconds)
    return phases.current()


def test_nested_phases_record_their_path_and_sum_seconds_and_calls():
    with phase("outer"):
        with phase("inner"):
            time.sleep(0.02)
        assert _step(0.01) == "outer/step"
        assert _step(0.01, again=True) == "outer/step"  # re-entered: no "outer/step/step"
        phases.add("measured", 0.5, calls=3)
    with phase("outer"):
        pass
    got = phases.totals()
    assert list(got) == ["outer", "outer/inner", "outer/step", "outer/measured"]  # the order they first started
    assert got["outer"][1] == 2 and got["outer/inner"][1] == 1 and got["outer/step"][1] == 2
    assert got["outer/measured"] == (0.5, 3)
    assert got["outer/inner"][0] >= 0.02 and got["outer/step"][0] >= 0.03
    assert got["outer"][0] >= got["outer/inner"][0] + got["outer/step"][0]  # a parent holds its children
    assert phases.current() == ""


def test_a_phase_that_raises_is_timed_and_names_are_checked():
    with pytest.raises(KeyError):
        with phase("failing"):
            raise KeyError("x")
    assert phases.totals()["failing"][1] == 1 and phases.current() == ""
    for bad in ("", "a/b", None):
        with pytest.raises(ValueError, match="phase name"):
            with phase(bad):
                pass


def test_the_file_gets_the_phases_when_the_outermost_one_ends(tmp_path, monkeypatch):
    """One JSON line per path, written when the outermost phase ends (never per inner phase); a truncated last
    line (a killed process) is skipped on reading."""
    target = tmp_path / "p.jsonl"
    monkeypatch.setenv(phases.ENV, str(target))
    with phase("outer"):
        for _ in range(5):
            with phase("inner"):
                pass
        assert not target.exists()
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    assert [(x["phase"], x["calls"]) for x in lines] == [("outer", 1), ("outer/inner", 5)]
    with phase("outer"):
        pass
    with target.open("a") as f:
        f.write('{"phase": "outer", "seco')
    read = phases.read(target)
    assert list(read) == ["outer", "outer/inner"] and read["outer"][1] == 2
    assert read["outer"][0] == pytest.approx(phases.totals()["outer"][0], abs=1e-5)
    assert phases.read(tmp_path / "missing.jsonl") == {}


def test_a_child_process_hands_its_phases_over_through_the_environment(tmp_path):
    """What the notebook runner relies on: a kernel (here a plain subprocess) inherits ``$KVLIB_PHASES`` and appends
    its phases; the parent reads them back without any code in the child that knows of the file."""
    target = tmp_path / "kernel.phases.jsonl"
    code = textwrap.dedent("""
        from kvlib.core.phases import phase
        for _ in range(2):
            with phase("load"):
                pass
            with phase("work"):
                with phase("part"):
                    pass
    """)
    env = {**os.environ, phases.ENV: str(target)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    got = phases.read(target)
    assert {p: n for p, (_, n) in got.items()} == {"load": 2, "work": 2, "work/part": 2}
    assert phases.totals() == {}  # the parent's own registry saw none of it


def test_the_first_compiled_call_of_each_shape_is_the_compile_warm_up(monkeypatch):
    """The decoding loop times the compiled step's first call per (batch, capacity) of a model as
    ``compile warm-up``, nested in the caller's phase; a second decode of the same shape compiles nothing. (On the
    CPU the "compiled" step is the eager one, so only the bookkeeping is under test here.)"""
    from kvlib.core import cache
    from kvlib.core.decoding import DecodeConfig, decode
    from kvlib.core.tiny import tiny_model

    monkeypatch.setattr(cache, "_compiled_step_stats", lambda dynamic=True: cache._step_stats)
    model, tok = tiny_model("llama", seed=0)
    enc = tok(["hello there", "hi"], return_tensors="pt", padding=True)
    config = DecodeConfig(max_new_tokens=6, stop_token_ids=(-1,), cache="static", compile=True)
    with phase("run"):
        first = decode(model, enc.input_ids, enc.attention_mask, config)
        decode(model, enc.input_ids, enc.attention_mask, config)
    assert phases.totals()["run/compile warm-up"][1] == 1
    eager = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=6, stop_token_ids=(-1,),
                                                                          cache="static", compile=False))
    assert eager.tokens == first.tokens and phases.totals()["run/compile warm-up"][1] == 1
