"""Scores from answer records, their orientation, the KV probe's grouping and the Table 2 assembly."""

import math

import numpy as np
import pandas as pd
import pytest

from kvlib import record_array
from kvlib.coe import coe_scores
from kvlib.experiments.kv_coe import coe_cost, table2, table2_markdown
from kvlib.metrics import auroc
from kvlib.selfeval import HEADLINE, grouped_folds, kv_probe_scores, output_scores, score_records
from kvlib.store import encode_array

D = 6


def _rec(item_id, correct, max_prob, entropy, values, keys, hidden=None):
    arrays = {"traj_values": values.astype(np.float16), "traj_keys": keys.astype(np.float16)}
    if hidden is not None:
        arrays["hidden_traj"] = hidden.astype(np.float32)
        arrays["hidden_bytes"] = np.array([1000], dtype=np.int64)
    return {"item_id": item_id, "correct": correct, "n_tokens": len(values) + 1, "finish_reason": "stop",
            "max_prob": list(max_prob), "entropy": list(entropy), "seconds": 1.0,
            "extract_seconds": {"kv": 0.001, "hidden_coe": 0.01},
            "arrays": {k: encode_array(v) for k, v in arrays.items()}}


def _walk(rng, n, step):
    """A random walk of n points from a fixed offset, with steps of scale ``step``."""
    return 3.0 + np.cumsum(step * rng.normal(size=(n, D)), axis=0)


@pytest.fixture(scope="module")
def synthetic():
    """60 answers; correct ones are confident (high max prob, low entropy), take small smooth KV steps and
    have a shifted mean value vector (what the probe can learn)."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(60):
        ok = i % 2 == 0
        n = 8 + i % 5
        mp = np.clip(rng.normal(0.8 if ok else 0.6, 0.05, n), 0.01, 1.0)
        ent = np.clip(rng.normal(0.5 if ok else 1.5, 0.2, n), 0.0, None)
        values = _walk(rng, n - 1, 0.1) + (1.0 if ok else 0.0)
        keys = _walk(rng, n - 1, 0.1)
        hidden = _walk(rng, 5, 1.0)
        recs.append(_rec(f"q{i}", ok, mp, ent, values, keys, hidden))
    return recs


def test_output_scores_values():
    r = _rec("a", True, [0.5, 0.25], [1.0, 3.0], np.ones((3, D)), np.ones((3, D)))
    s = output_scores(r)
    assert s["MaxProb"] == pytest.approx(0.375)
    assert s["PPL"] == pytest.approx(math.sqrt(0.125))  # 1/PPL = exp(mean log maxprob)
    assert s["Entropy"] == pytest.approx(-2.0)
    assert all(math.isnan(v) for v in output_scores({"max_prob": [], "entropy": []}).values())


def test_every_output_score_is_oriented_larger_is_correct(synthetic):
    df = score_records(synthetic, probe=False)
    for m in ("MaxProb", "PPL", "Entropy"):
        assert auroc(df["correct"], df[m]) > 90, m


def test_coe_scores_are_used_as_is(synthetic):
    df = score_records(synthetic, probe=False)
    rec, row = synthetic[3], df.iloc[3]
    values = record_array(rec, "traj_values").astype(np.float64)
    keys = record_array(rec, "traj_keys").astype(np.float64)
    for form, suffix in (("reference", ""), ("paper", " [paper]")):
        sv, skv = coe_scores(values, form=form), coe_scores(np.concatenate([keys, values], 1), form=form)
        assert row[f"KV-CoE-R (V){suffix}"] == pytest.approx(sv["R"])
        assert row[f"KV-CoE-C (V){suffix}"] == pytest.approx(sv["C"])
        assert row[f"KV-CoE-R (KV){suffix}"] == pytest.approx(skv["R"])
        sh = coe_scores(record_array(rec, "hidden_traj"), form=form)
        assert row[f"CoE-C{suffix}"] == pytest.approx(sh["C"])
    # larger paper-form R (bigger steps) must give larger score: no sign flip anywhere
    rng = np.random.default_rng(5)
    small = _rec("s", True, [0.9] * 9, [0.1] * 9, _walk(rng, 8, 0.1), _walk(rng, 8, 0.1))
    big = _rec("b", False, [0.9] * 9, [0.1] * 9, _walk(rng, 8, 1.0), _walk(rng, 8, 1.0))
    d = score_records([small, big], probe=False)
    assert d.loc[0, "KV-CoE-R (V) [paper]"] < d.loc[1, "KV-CoE-R (V) [paper]"]


def test_probe_learns_and_folds_respect_questions(synthetic):
    p = kv_probe_scores(synthetic)
    y = [r["correct"] for r in synthetic]
    assert np.isfinite(p).all() and auroc(y, p) > 90
    # several answers per question: no question may be on both sides of a split
    y_rep, g = np.repeat([0, 1] * 10, 3), np.repeat(np.arange(20), 3)
    folds = grouped_folds(y_rep, g, 5, seed=0)
    assert len(folds) == 5
    for train, test in folds:
        assert not set(g[train]) & set(g[test])
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(60))
    assert grouped_folds(np.array([1, 0, 0]), np.array([0, 1, 2]), 5) == []  # one correct question: no folds
    assert np.isnan(kv_probe_scores(synthetic[:1] + [r for r in synthetic if not r["correct"]][:5])).all()


def test_score_records_columns_and_errors(synthetic):
    df = score_records(synthetic)
    assert len(df) == 60 and df["item_id"].tolist() == [r["item_id"] for r in synthetic]
    assert set(HEADLINE) <= set(df.columns)
    assert {"kv_seconds", "hidden_seconds", "kv_bytes", "hidden_bytes"} <= set(df.columns)
    assert df["kv_bytes"].iloc[0] == 2 * 4 * 7 * D  # keys + values, float32, [T_fed, D]
    with pytest.raises(KeyError, match="not graded"):
        score_records([{k: v for k, v in synthetic[0].items() if k != "correct"}])
    short = _rec("t", True, [0.9], [0.1], np.ones((1, D)), np.ones((1, D)))  # one fed token: CoE undefined
    row = score_records([short], probe=False).iloc[0]
    assert math.isnan(row["KV-CoE-R (V)"]) and row["MaxProb"] == pytest.approx(0.9)


def test_table2_layout_and_small_sets(synthetic):
    big = score_records(synthetic)
    small = big[big["correct"] | (np.arange(60) < 10)]  # 30 correct, 5 wrong
    tab = table2({"A": big, "B": small}, min_class=10, n_boot=200)
    assert tab.index.tolist()[:5] == ["MaxProb", "PPL", "Entropy", "CoE-R", "CoE-C"]
    assert "KV-probe" in tab.index and "KV-CoE-C (KV) [paper]" in tab.index
    assert tab.loc["MaxProb", "A AUROC"] == pytest.approx(auroc(big["correct"], big["MaxProb"]))
    assert tab.loc["MaxProb", "A AUROC lo"] <= tab.loc["MaxProb", "A AUROC"] <= tab.loc["MaxProb", "A AUROC hi"]
    assert (tab["B n correct"] == 30).all() and (tab["B n wrong"] == 5).all()
    assert tab["B AUROC"].isna().all() and tab["A AUROC"].notna().all()
    md = table2_markdown(tab, ["A", "B"], caption="Model m, sets A/B.")
    assert md.startswith("Model m") and "B (30✓/5✗) AUROC [95% CI]" in md and "| –" in md


def test_coe_cost(synthetic):
    cost = coe_cost({"A": score_records(synthetic, probe=False)})
    row = cost.iloc[0]
    assert row["seconds_ratio"] == pytest.approx(10.0)
    assert row["hidden_coe_bytes"] == 1000 and row["n"] == 60
    assert isinstance(cost, pd.DataFrame)


def test_auroc_differences(synthetic):
    from kvlib.experiments.kv_coe import auroc_differences

    df = score_records(synthetic)
    diffs = auroc_differences({"A": df}, pairs=[("MaxProb", "KV-CoE-C (V)"), ("MaxProb", "missing")], n_boot=200)
    assert len(diffs) == 1
    row = diffs.iloc[0]
    assert row["AUROC difference"] == pytest.approx(auroc(df["correct"], df["MaxProb"]) -
                                                    auroc(df["correct"], df["KV-CoE-C (V)"]))
    assert row["lo"] <= row["AUROC difference"] <= row["hi"]
    assert auroc_differences({"A": df.iloc[:12]}, pairs=[("MaxProb", "PPL")])["AUROC difference"].isna().all()


def test_save_table_writes_timings_apart(synthetic, tmp_path):
    """Wall-clock columns leave the result table (which must be byte-identical across runs) for timings/."""
    from kvlib.experiments.report import save_table, timing_columns

    cost = coe_cost({"A": score_records(synthetic, probe=False)}).assign(model="m", profile="p")
    assert set(timing_columns(cost)) == {"gen_seconds", "kv_coe_seconds", "hidden_coe_seconds", "seconds_ratio"}
    save_table(cost, tmp_path / "tables" / "coe_cost", "Model m; extra cost per answer.")
    result = pd.read_csv(tmp_path / "tables" / "coe_cost.csv")
    assert not timing_columns(result) and {"kv_coe_bytes", "bytes_ratio", "mean_tokens"} <= set(result.columns)
    timings = pd.read_csv(tmp_path / "tables" / "timings" / "coe_cost.csv")
    assert timings.columns.tolist() == ["set", "model", "profile", "gen_seconds", "kv_coe_seconds",
                                        "hidden_coe_seconds", "seconds_ratio"]
    assert timings["seconds_ratio"].iloc[0] == pytest.approx(10.0)
    md = (tmp_path / "tables" / "coe_cost.md").read_text()
    assert md.startswith("Model m; extra cost per answer. Timings: timings/coe_cost.md.") and "seconds" not in md
    assert "vary from run to run" in (tmp_path / "tables" / "timings" / "coe_cost.md").read_text()
    # a table without timings writes no timings file; timings=[] keeps every column
    save_table(pd.DataFrame({"set": ["A"], "AUROC": [0.5]}), tmp_path / "t2" / "table2", "cap")
    assert not (tmp_path / "t2" / "timings").exists()
    save_table(cost, tmp_path / "t3" / "coe_cost", "cap", timings=[])
    assert "gen_seconds" in pd.read_csv(tmp_path / "t3" / "coe_cost.csv")
    with pytest.raises(KeyError, match="not in the table coe_cost"):
        save_table(cost, tmp_path / "t4" / "coe_cost", "cap", timings=["wall_s"])


def test_collect_scores_keeps_skipped_sets_for_the_caption(synthetic, monkeypatch):
    """A missing optional set reaches the Table 2 caption, not only a print; an empty set is an error naming it."""
    from kvlib import answers
    from kvlib.data import SelectedSets, SkippedSet
    from kvlib.experiments.kv_coe import caption, collect_scores

    monkeypatch.setattr(answers, "answer_records", lambda *a, **k: synthetic[:12])
    sets = SelectedSets({"gsm8k": ["item"] * 12},
                        skipped=[SkippedSet("theoremqa", "needs DATA_DIR holding theoremqa_test.json")])
    scores = collect_scores(None, None, "m", sets, 24, min_class=100)
    assert list(scores) == ["GSM8K"] and scores.skipped == sets.skipped
    cap = caption("m", "smoke", scores, 24)
    assert cap.endswith("Skipped: TheoremQA (needs DATA_DIR holding theoremqa_test.json).")
    assert "Skipped" not in caption("m", "smoke", {"GSM8K": scores["GSM8K"]}, 24)
    with pytest.raises(ValueError, match="data set svamp has no items"):
        collect_scores(None, None, "m", {"svamp": []}, 24)
    with pytest.raises(ValueError, match="no data sets to score"):
        collect_scores(None, None, "m", {}, 24)


def test_the_captions_of_notebook_03_name_the_run_and_the_table(synthetic):
    from kvlib.experiments.kv_coe import caption

    scores = {"GSM8K": score_records(synthetic, probe=False)}
    full = caption("m", "small", scores, 24, hardware="CPU (2 threads), fp32")
    assert full.startswith("Model m, profile small on CPU (2 threads), fp32; greedy slow answers up to 24 new tokens")
    assert caption("m", "small", scores, 24, "CPU (2 threads), fp32", table="differences") == (
        "Model m, profile small on CPU (2 threads), fp32; AUROC differences x100 with paired bootstrap 95% intervals.")
    cost = caption("m", "small", scores, 24, table="cost")
    assert cost == "Model m, profile small; extra cost per answer of each trajectory."
    with pytest.raises(ValueError, match="unknown table 'x'"):
        caption("m", "small", scores, 24, table="x")
