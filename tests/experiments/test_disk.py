"""The disk estimate the runner prints: an upper bound close to what a store really takes."""

import pytest

from kvlib import tiny_model
from kvlib.switching.answers import answer_extractors
from kvlib.experiments.disk import describe, estimate_disk, record_bytes
from kvlib.runs.generation import GenerationSettings, Prompt, generate, open_store
from kvlib.core.memory import load_config, shipped_configs
from kvlib.profiles import get_profile
from kvlib.switching.thinking import render_prompt


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_size_model_bounds_a_real_answer_store_closely(tmp_path, arch):
    model, tok = tiny_model(arch, seed=0)
    ex, settings = answer_extractors(), GenerationSettings(max_new_tokens=30)
    prompts = [Prompt(f"q{i}", render_prompt(tok, f"What is {i} + {2 * i}?", "slow")) for i in range(6)]
    recs = generate(model, tok, prompts, open_store(tmp_path, "m", "x", settings, ex), settings, extractors=ex,
                    progress=False)
    actual = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.name.endswith((".jsonl", ".jsonl.bin")))
    estimate = sum(record_bytes(model.config)["answer"](r["n_tokens"], len(tok(r["prompt"]).input_ids)) for r in recs)
    assert actual <= estimate <= 1.5 * actual


def test_profiles_are_estimated_from_their_sizes_and_the_model_shape():
    small = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2}
    big = load_config(shipped_configs()["Qwen3-8B"])
    est_small = estimate_disk(get_profile("small"), small)
    est_full = estimate_disk(get_profile("full"), big)
    assert est_small["total"] == pytest.approx(sum(v for k, v in est_small.items() if k != "total"))
    assert 0.02e9 < est_small["total"] < 0.5e9  # the small profile's stores took 47 MB in a cold run
    assert est_full["total"] > 100 * est_small["total"]
    assert describe(est_small).startswith("at most 0.")
