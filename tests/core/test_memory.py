"""memory_estimate against real byte counts (tiny models) and the published / measured Qwen3-32B numbers."""

import csv
from pathlib import Path

import pytest
import torch

from kvlib.core.memory import (attention_layer_types, load_config, measure_cache_bytes, memory_estimate,
                          parameter_count, prefill_peak, shipped_configs, vram_curve)
from kvlib.core.tiny import TINY_ARCHS, tiny_model

ROOT = Path(__file__).resolve().parents[2]
GPU_CSV = ROOT / "benchmarks" / "results" / "fig1_vram_gpu.csv"


def test_qwen3_32b_matches_the_h200_numbers():
    est = memory_estimate("Qwen3-32B", 32_768)
    assert est["parameters"] == 32_762_123_264
    assert round(est["weights"] / 1e9, 2) == 65.52
    assert est["kv_cache"] == 2 * 64 * 8 * 128 * 32_768 * 2 and round(est["kv_cache"] / 1e9, 2) == 8.59
    assert est["hidden_states"] == 65 * 32_768 * 5120 * 2 and round(est["hidden_states"] / 1e9, 2) == 21.81
    assert memory_estimate("Qwen3-32B", 32_768, dtype=torch.float32, batch_size=3)["kv_cache"] == 6 * est["kv_cache"]


@pytest.mark.parametrize("name,billions", [("Qwen3-8B", 8.19), ("Llama-3.1-8B-Instruct", 8.03),
                                           ("Qwen2-7B-Instruct", 7.62), ("DeepSeek-R1-Distill-Qwen-14B", 14.77)])
def test_shipped_configs_give_published_parameter_counts(name, billions):
    assert name in shipped_configs()
    assert parameter_count(name) / 1e9 == pytest.approx(billions, abs=0.006)
    assert set(attention_layer_types(name)) == {"full_attention"}


def test_config_forms_agree_and_unknown_names_raise():
    by_name = memory_estimate("Qwen3-8B", 1000)
    assert memory_estimate("Qwen/Qwen3-8B", 1000) == by_name
    assert memory_estimate(load_config("qwen3-8b"), 1000) == by_name
    assert memory_estimate(dict(load_config("Qwen3-8B")), 1000, dtype="bfloat16") == by_name
    with pytest.raises(ValueError, match="Qwen3-32B"):
        memory_estimate("Qwen9-1T", 10)
    with pytest.raises(ValueError, match=r"need context_length >= 0 and batch_size >= 1, got -1, 1"):
        memory_estimate("Qwen3-8B", -1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parameter_formula_matches_real_models(arch):
    model, _ = tiny_model(arch)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("extra", [{"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}])
def test_parameter_formula_with_biases_and_tied_embeddings(extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, **extra)
    model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_mixture_of_experts_is_counted_exactly():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", vocab_size=50, hidden_size=16, intermediate_size=24,
                                  moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(config.to_dict()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                        ("qwen3", torch.float32), ("gemma3", torch.float32)])
def test_estimate_equals_real_cache_and_hidden_state_bytes(arch, dtype):
    model, tok = tiny_model(arch)
    model = model.to(dtype)
    for batch in (1, 2):
        rows = measure_cache_bytes(model, tok, lengths=(3, 5, 17), batch_size=batch)
        for row in rows:
            for part in ("weights", "kv_cache", "hidden_states"):
                assert row[f"{part}_measured"] == row[f"{part}_estimate"], (arch, batch, row)
    if arch == "gemma3":  # two sliding layers hold min(T, window - 1) positions, the full one holds T
        est = memory_estimate(model.config, 17, dtype)
        assert est["kv_cache"] == 2 * 2 * 8 * (5 + 5 + 17) * dtype.itemsize


def test_sliding_window_layers_from_plain_dicts():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2)
    mistral = dict(base, sliding_window=4)  # no model_type: raw dict, every layer slides
    assert memory_estimate(mistral, 100, torch.float32)["kv_cache"] == 2 * 2 * 4 * 3 * 4 * 4
    qwen2 = dict(base, model_type="qwen2", sliding_window=4, use_sliding_window=True, max_window_layers=2)
    assert attention_layer_types(qwen2) == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert attention_layer_types(dict(qwen2, use_sliding_window=False)) == ["full_attention"] * 4


def test_vram_curve_totals():
    df = vram_curve("Qwen3-32B", [1024, 131072])
    assert list(df["model_kv_hidden"]) == list(df["weights"] + df["kv_cache"] + df["hidden_states"])
    assert df["model_kv_hidden"].iloc[-1] / 1e9 == pytest.approx(65.52 + 34.36 + 87.24, abs=0.02)


@pytest.mark.skipif(not GPU_CSV.exists(), reason="no GPU measurements committed")
def test_committed_gpu_measurements_are_within_5_percent_of_the_estimate():
    rows = [r for r in csv.DictReader(GPU_CSV.open()) if r["status"] == "ok"]
    assert len(rows) >= 6
    for r in rows:
        t, hidden = int(r["context_length"]), r["output_hidden_states"] == "True"
        est = memory_estimate(r["config"], t)
        assert int(r["kv_cache_measured"]) == est["kv_cache"]
        if hidden:
            assert int(r["hidden_states_measured"]) == est["hidden_states"]
        peak_estimate = prefill_peak(r["config"], t, hidden_states=hidden)
        assert int(r["peak_measured"]) / peak_estimate == pytest.approx(1, abs=0.05)
        kept = est["weights"] + est["kv_cache"] + (est["hidden_states"] if hidden else 0)
        assert int(r["resident_measured"]) / kept == pytest.approx(1, abs=0.05)
