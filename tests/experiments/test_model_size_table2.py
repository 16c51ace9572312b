"""Notebook 06's Table 2 and differences read the control rows (Length, below-chance flags) of each model's table."""

import pandas as pd

from kvlib.experiments.model_size import KEY_COMPARISONS, TABLE2_SCORES, differences_by_model, table2_by_model


def test_length_row_and_below_chance_flags_are_copied(tmp_path):
    d = tmp_path / "m-0.5b"
    d.mkdir()
    pd.DataFrame({"method": ["MaxProb", "Length", "CoE-R"], "GSM8K AUROC": [67.5, 71.5, 46.0],
                  "GSM8K AUROC lo": [64.7, 68.8, 43.2], "GSM8K AUROC hi": [70.3, 74.1, 49.3],
                  "GSM8K n correct": [714] * 3, "GSM8K n wrong": [605] * 3,
                  "GSM8K below chance": [False, False, True]}).to_csv(d / "table2_kv_coe.csv", index=False)
    t2 = table2_by_model({"m-0.5b": d}, scores=("MaxProb", "Length", "CoE-R"))
    col = ("GSM8K", "m-0.5b (714✓/605✗)")
    assert t2.loc["Length", col] == "71.5 [68.8, 74.1]"
    assert t2.loc["CoE-R", col] == "46.0 [43.2, 49.3] (below chance)"
    assert t2.loc["MaxProb", col] == "67.5 [64.7, 70.3]"
    assert "Length" in TABLE2_SCORES and table2_by_model({"m-0.5b": d}).index.tolist() == ["MaxProb", "Length"]
    pd.DataFrame({"set": ["GSM8K"], "score": ["KV-CoE-C (V)"], "baseline": ["Length"], "AUROC difference": [-13.6],
                  "lo": [-17.0], "hi": [-10.1]}).to_csv(d / "table2_differences.csv", index=False)
    assert ("KV-CoE-C (V)", "Length") in KEY_COMPARISONS
    assert differences_by_model({"m-0.5b": d}).loc["KV-CoE-C (V) − Length", ("GSM8K", "m-0.5b")] == (
        "-13.6 [-17.0, -10.1]")
