"""The model-size axis reads each model's result folder and copies its numbers, smallest model first."""

import pandas as pd

from kvlib.experiments.model_size import differences_by_model, model_dirs, table2_by_model, table3_by_model


def _table2(folder, auroc):
    folder.mkdir(parents=True)
    pd.DataFrame({"method": ["MaxProb", "KV-probe"], "GSM8K AUROC": [auroc, auroc + 10],
                  "GSM8K AUROC lo": [auroc - 2, auroc + 8], "GSM8K AUROC hi": [auroc + 2, auroc + 12],
                  "GSM8K n correct": [40, 40], "GSM8K n wrong": [60, 60]}).to_csv(folder / "table2_kv_coe.csv",
                                                                                   index=False)


def test_models_are_ordered_by_size_and_numbers_copied(tmp_path):
    _table2(tmp_path / "qwen-7B", 70.0)
    _table2(tmp_path / "qwen-0.5b", 60.0)
    (tmp_path / "timings").mkdir()
    (tmp_path / "timings" / "coe_cost.csv").write_text("set,seconds\nGSM8K,1\n")  # not a model
    dirs = model_dirs(tmp_path)
    assert list(dirs) == ["qwen-0.5b", "qwen-7B"]
    t2 = table2_by_model(dirs)
    assert list(t2.columns) == [("GSM8K", "qwen-0.5b (40✓/60✗)"), ("GSM8K", "qwen-7B (40✓/60✗)")]
    assert t2.loc["KV-probe", ("GSM8K", "qwen-7B (40✓/60✗)")] == "80.0 [78.0, 82.0]"


def test_a_folder_holding_tables_itself_is_one_model(tmp_path):
    _table2(tmp_path / "tables", 55.0)
    assert model_dirs(tmp_path / "tables", default_model="m") == {"m": tmp_path / "tables"}
    assert model_dirs(tmp_path / "missing") == {}
    assert table3_by_model({}).empty and differences_by_model({}).empty


def test_differences_keep_sign_and_interval(tmp_path):
    d = tmp_path / "m-1b"
    d.mkdir()
    pd.DataFrame({"set": ["GSM8K"], "score": ["KV-probe"], "baseline": ["MaxProb"], "AUROC difference": [3.21],
                  "lo": [-0.5], "hi": [6.0]}).to_csv(d / "table2_differences.csv", index=False)
    out = differences_by_model({"m-1b": d})
    assert out.loc["KV-probe − MaxProb", ("GSM8K", "m-1b")] == "+3.2 [-0.5, +6.0]"


def test_captions_and_flat_tables_for_the_csv(tmp_path):
    from kvlib.experiments.model_size import caption, flat_table

    _table2(tmp_path / "qwen-0.5b", 60.0)
    dirs = model_dirs(tmp_path)
    assert caption("gpu", dirs, "table2") == ("Profile gpu; models: qwen-0.5b; each cell copied from that model's "
                                              "table (its caption gives sets, sizes and hardware). Table 2: AUROC x100 "
                                              "[95% CI].")
    assert "none yet" in caption("gpu", {})
    flat = flat_table(table2_by_model(dirs), names="score")
    assert list(flat.columns) == ["score", "GSM8K · qwen-0.5b (40✓/60✗)"] and list(flat["score"]) == ["MaxProb",
                                                                                                        "KV-probe"]
    assert flat_table(pd.DataFrame(), names=["set", "method"]).empty


def test_a_deer_row_of_an_older_table_without_trials_is_named_for_what_ran(tmp_path):
    """Tables written before DEER-style rows were named by what ran still show "no DEER trial ran" when their
    trial_tokens say no trial fired, and keep the DEER name when one did."""
    import pandas as pd

    from kvlib.experiments.labels import Method
    from kvlib.experiments.model_size import table3_by_model

    for model, trials in (("a", 0.0), ("b", 3.5)):
        (tmp_path / model).mkdir()
        pd.DataFrame([{"method": Method.DEER, "set": "gsm8k", "accuracy": 0.5, "mean_tokens": 100.0,
                       "trial_tokens": trials}]).to_csv(tmp_path / model / "table3_switching.csv", index=False)
    t = table3_by_model({"a": tmp_path / "a", "b": tmp_path / "b"})
    old = " (earlier protocol: no cap shares, no budget curve)"  # neither table reports caps or a curve
    assert t.loc[("gsm8k", Method.deer(0.0)), "a" + old] == "0.500 / 100"
    assert t.loc[("gsm8k", Method.DEER), "b" + old] == "0.500 / 100"
