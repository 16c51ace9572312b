"""Notebook 01's wiring: Fig. 1's long table, its two panels, caption, figure and summary."""

from pathlib import Path

import torch

from kvlib.experiments.vram import (GPU_CSV, fig1_caption, fig1_figure, fig1_markdown, fig1_panels, fig1_summary,
                                    fig1_table, gpu_measurements, gpu_table, model_lengths)
from kvlib.core.memory import measure_cache_bytes
from kvlib.core.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_fig1_table_panels_caption_and_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model, tok = tiny_model("qwen2")
    lengths = model_lengths("smoke")
    rows = measure_cache_bytes(model, tok, lengths)
    gpu = gpu_measurements(ROOT / GPU_CSV)
    table = fig1_table("Qwen3-32B", [1024, 2048], torch.bfloat16, gpu_csv=ROOT / GPU_CSV, cpu_rows=rows,
                       cpu_model="tiny", profile="smoke")
    assert table.columns[0] == "profile" and set(table.panel) == {"scale", "model"}
    scale_gb, model_bytes = fig1_panels(table)
    assert list(model_bytes.index) == lengths and "measured: kv_cache" in model_bytes.columns
    assert "estimate: model_kv_hidden" in scale_gb.columns and (model_bytes.dtypes == "int64").all()
    caption = fig1_caption(gpu, rows, lengths, "tiny", "CPU", "smoke", lengths=[1024, 2048])
    assert "at 1024-2048 tokens" in caption
    assert "of tiny (float32) after prefills of [16, 32, 64] tokens on CPU; profile smoke." in caption
    md = fig1_markdown(table, caption)
    assert md.startswith(caption) and "Panel 'model' (bytes):" in md
    assert len(fig1_figure(table, "tiny", lengths, lengths=[1024, 2048]).axes) == 2
    summary = fig1_summary(gpu, rows, "tiny").splitlines()
    assert summary[0].startswith("Qwen3-32B at 32k tokens") and summary[-1].endswith("0.00e+00")
    assert isinstance(gpu_table(gpu_measurements(tmp_path / "none.csv")), str)
