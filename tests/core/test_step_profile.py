"""benchmarks/step_profile.py takes each step as DecodeLoop.run does, in every variant: the early-launched step
(what a GPU decodes by default, forced on here) and the plain one, on a tiny random model on the CPU."""

import sys
from pathlib import Path

import pytest
import torch

from kvlib.core.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
step_profile = pytest.importorskip("step_profile")


@pytest.mark.parametrize("ahead", [True, False], ids=["early launch", "step by step"])
def test_every_variant_steps_like_the_loop(ahead):
    model = load_model("random:tiny", device="cpu", dtype=torch.float32)[0]
    row = step_profile.measure(model, batch=3, prompt=16, steps=4, warm=2, compile_step=False, ahead=ahead)
    assert row["wall"] > 0 and row["cache capacity"] >= 16 + 4 + 2


def test_an_arm_that_runs_out_of_device_memory_is_a_nan_column_not_a_lost_run(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    model = load_model("random:tiny", device="cpu", dtype=torch.float32)[0]
    ok = step_profile.measure_apart(model, 3, 16, 2, 1, False, False)
    assert ok["wall"] > 0
    monkeypatch.setattr(step_profile, "measure", oom)
    row = step_profile.measure_apart(model, 3, 16, 2, 1, False, False)
    assert row["wall"] != row["wall"] and "peak device memory (GB)" in row   # NaN, and the memory row kept


def test_each_arm_runs_in_a_process_of_its_own_and_a_dead_one_is_a_nan_column(capsys):
    argv = ["--shape", "tiny", "--batch", "2", "--prompt", "8", "--steps", "2", "--warm", "1"]
    row = step_profile.arm_in_process("eager step", argv)
    assert row["wall"] > 0 and row["cache capacity"] >= 8 + 2 + 1
    assert row["bandwidth floor"] > 0 and row["wall / floor"] == row["wall"] / row["bandwidth floor"]
    dead = step_profile.arm_in_process("eager step", [*argv, "--steps", "not-a-number"])
    assert dead["wall"] != dead["wall"] and "that column is NaN" in capsys.readouterr().out
