"""Scores from answer records, their orientation, the KV probe's grouping and the Table 2 assembly."""

import math

import numpy as np
import pandas as pd
import pytest

from kvlib import record_array
from kvlib.selfeval.coe import coe_scores
from kvlib.experiments.kv_coe import coe_cost, table2, table2_markdown
from kvlib.selfeval.metrics import auroc
from kvlib.selfeval.scores import HEADLINE, grouped_folds, kv_probe_scores, output_scores, score_records
from kvlib.runs.store import encode_array

D = 6


def _rec(item_id, correct, max_prob, entropy, values, keys, hidden=None, prompt=None):
    arrays = {"traj_values": values.astype(np.float16), "traj_keys": keys.astype(np.float16)}
    if prompt is not None:  # (prompt values, prompt keys)
        arrays["traj_prompt_values"], arrays["traj_prompt_keys"] = (x.astype(np.float16) for x in prompt)
    if hidden is not None:
        arrays["hidden_traj"] = hidden.astype(np.float32)
        arrays["hidden_bytes"] = np.array([1000], dtype=np.int64)
    return {"item_id": item_id, "correct": correct, "n_tokens": len(values) + 1, "finish_reason": "stop",
            "max_prob": list(max_prob), "entropy": list(entropy), "seconds": 1.0,
            "extract_seconds": {"kv": 0.001, "hidden_coe": 0.01},
            "arrays": {k: encode_array(v) for k, v in arrays.items()}}


@pytest.fixture(scope="module")
def scored(synthetic):
    return score_records(synthetic)


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
        prompt = (_walk(rng, 6, 0.5), _walk(rng, 6, 0.5))
        recs.append(_rec(f"q{i}", ok, mp, ent, values, keys, hidden, prompt))
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


def test_score_records_columns_and_errors(synthetic, scored):
    df = scored
    assert len(df) == 60 and df["item_id"].tolist() == [r["item_id"] for r in synthetic]
    assert set(HEADLINE) <= set(df.columns)
    assert {"kv_seconds", "hidden_seconds", "kv_bytes", "hidden_bytes"} <= set(df.columns)
    assert df["kv_bytes"].iloc[0] == 2 * 4 * 7 * D  # keys + values, float32, [T_fed, D]
    with pytest.raises(KeyError, match="not graded"):
        score_records([{k: v for k, v in synthetic[0].items() if k != "correct"}])
    short = _rec("t", True, [0.9], [0.1], np.ones((1, D)), np.ones((1, D)))  # one fed token: CoE undefined
    row = score_records([short], probe=False).iloc[0]
    assert math.isnan(row["KV-CoE-R (V)"]) and row["MaxProb"] == pytest.approx(0.9)


def test_table2_layout_and_small_sets(scored):
    big = scored
    small = big[big["correct"] | (np.arange(60) < 10)]  # 30 correct, 5 wrong
    tab = table2({"A": big, "B": small}, min_class=10, n_boot=200)
    assert tab.index.tolist()[:6] == ["MaxProb", "PPL", "Entropy", "Length", "CoE-R", "CoE-R [paper]"]
    assert "KV-probe" in tab.index and "KV-CoE-C (KV) [paper]" in tab.index
    assert "KV-CoE-C (V, prompt+answer)" in tab.index
    # each paper-form row right after its reference-form row: both forms side by side
    rows = tab.index.tolist()
    assert all(rows[rows.index(m) - 1] == m.removesuffix(" [paper]") for m in rows if m.endswith(" [paper]"))
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


def test_auroc_differences(scored):
    from kvlib.experiments.kv_coe import auroc_differences

    df = scored
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
    from kvlib.switching import answers
    from kvlib.assets.data import SelectedSets, SkippedSet
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


def test_the_length_row_is_minus_the_token_count_and_a_length_only_signal_reaches_it():
    """Answers whose correctness depends on their length only: Length and the Output-probe (which has length among
    its features) see it; a score with the opposite orientation is below chance and flagged."""
    rng = np.random.default_rng(3)
    recs = []
    for i in range(80):
        ok = i % 2 == 0
        n = int(rng.integers(5, 15) if ok else rng.integers(12, 30))
        mp, ent = rng.uniform(0.5, 0.9, n), rng.uniform(0.2, 2.0, n)
        recs.append(_rec(f"q{i}", ok, mp, ent, _walk(rng, n - 1, 0.1), _walk(rng, n - 1, 0.1)))
    df = score_records(recs)
    assert (df["Length"] == -df["n_tokens"]).all()
    assert auroc(df["correct"], df["Length"]) > 85
    assert auroc(df["correct"], df["Output-probe"]) > 80
    assert abs(auroc(df["correct"], df["MaxProb"]) - 50) < 20  # nothing but length separates them
    tab = table2({"A": df.assign(Longer=df["n_tokens"])}, methods=["Length", "Longer", "MaxProb"], n_boot=300)
    assert bool(tab.loc["Longer", "A below chance"]) and not bool(tab.loc["Length", "A below chance"])
    assert not bool(tab.loc["MaxProb", "A below chance"])


def test_orientation_and_forms_tables_and_the_caption_notes(scored):
    from kvlib.experiments.kv_coe import BELOW, forms_table, orientation_table, table2_notes

    df = scored.copy()
    df["Upside down"] = -df["MaxProb"]
    tab = table2({"A": df}, methods=["MaxProb", "Upside down", "Length", "CoE-C", "CoE-C [paper]", "KV-CoE-C (K)",
                                     "KV-CoE-C (K) [paper]", "KV-CoE-C (V, prompt+answer)", "Output-probe"],
                 n_boot=300)
    ori = orientation_table(tab)
    assert ori.loc["Upside down", ("A", "below chance")] and not ori.loc["MaxProb", ("A", "below chance")]
    a, lo, hi = tab.loc["Upside down", ["A AUROC", "A AUROC lo", "A AUROC hi"]]
    assert ori.loc["Upside down", ("A", "flipped AUROC")] == f"{100 - a:.1f} [{100 - hi:.1f}, {100 - lo:.1f}]"
    forms = forms_table(tab)
    assert forms.index.tolist() == ["CoE-C", "KV-CoE-C (K)", "KV-CoE-C (V, prompt+answer)"]
    assert forms.columns.tolist() == [("A", "reference"), ("A", "paper")]
    assert forms.loc["CoE-C", ("A", "paper")].startswith(f"{tab.loc['CoE-C [paper]', 'A AUROC']:.1f} [")
    assert forms.loc["KV-CoE-C (V, prompt+answer)", ("A", "paper")] == "–"
    notes = table2_notes(tab)
    assert "keys are cached after RoPE" in notes and "log answer length" in notes
    assert f"Upside down on A ({a:.1f} [{lo:.1f}, {hi:.1f}])" in notes and "MaxProb on" not in notes
    assert "12.4 (MATH) and 4.9 (TheoremQA)" in notes and "87.6 and 95.1" in notes
    md = table2_markdown(tab, ["A"], caption="Model m.")
    assert md.startswith("Model m. Length: minus") and f"{hi:.1f}] {BELOW}" in md
    assert "none here" in table2_notes(tab[~tab["A below chance"].astype(bool)])
    assert "here MaxProb scores" in notes and "here MaxProb" not in table2_notes(tab.assign(**{"A AUROC": np.nan}))


def _halves_scores(seed=0, n=120):
    """Two sets of scored answers; candidate 'good' separates the classes, 'noise' does not."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in ("A", "B"):
        y = rng.random(n) < 0.5
        out[s] = pd.DataFrame({"item_id": [f"{s}{i}" for i in range(n)], "correct": y,
                               "good": y + rng.normal(0, 0.7, n), "noise": rng.normal(size=n),
                               "MaxProb": y + rng.normal(0, 1.5, n), "Length": rng.normal(size=n)})
    return out


def test_validation_split_reads_ids_only_and_keeps_a_question_together():
    from kvlib.experiments.kv_coe import validation_split

    ids = [f"q{i // 2}" for i in range(40)]  # two answers per question
    v = validation_split(ids, 0.5, seed=1)
    assert v.sum() == 20 and all(v[i] == v[i + 1] for i in range(0, 40, 2))
    assert (validation_split(ids[::-1], 0.5, seed=1) == v[::-1]).all()  # order of answers does not matter
    assert not (validation_split(ids, 0.5, seed=2) == v).all()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validation_split(ids, 1.0)


def test_the_best_variant_is_picked_on_validation_and_scored_on_test_only():
    from kvlib.experiments.kv_coe import best_variant, validation_split

    scores = _halves_scores()
    best = best_variant(scores, candidates=["noise", "good"], n_boot=200)
    assert best.name == "good" and best.validation.loc["good", "mean"] > best.validation.loc["noise", "mean"]
    # the pick and its validation table ignore the test answers: scramble them (labels and scores) and nothing moves
    rng = np.random.default_rng(9)
    scrambled = {}
    for s, df in scores.items():
        test = ~validation_split(df["item_id"])
        df = df.copy()
        df.loc[test, "correct"] = rng.random(test.sum()) < 0.5
        df.loc[test, "noise"] = np.where(df.loc[test, "correct"], 5.0, -5.0)  # 'noise' is perfect on test
        scrambled[s] = df
    other = best_variant(scrambled, candidates=["noise", "good"], n_boot=200)
    assert other.name == "good"
    pd.testing.assert_frame_equal(other.validation, best.validation)
    # ... and the reported numbers are the test half's alone
    row = other.test[(other.test["set"] == "A") & (other.test["score"] == "good")].iloc[0]
    t = scrambled["A"][~validation_split(scrambled["A"]["item_id"])]
    assert row["AUROC"] == pytest.approx(auroc(t["correct"], t["good"]))
    assert row["n_correct"] + row["n_wrong"] == len(t)
    assert set(other.test_differences["baseline"]) == {"MaxProb", "Length"}  # no hidden CoE here
    saved = other.table()
    assert len(saved) == len(other.test) and saved["difference"].isna().sum() == 2  # the pick's own rows, A and B
    d = other.test_differences.set_index(["set", "baseline"]).loc[("B", "Length"), "AUROC difference"]
    assert saved.set_index(["set", "score"]).loc[("B", "Length"), "difference"] == pytest.approx(d)
    quote = other.quote()
    assert quote.startswith("good, chosen among 2 KV-CoE variants on a validation 50%") and "A " in quote
    # too few answers per class in every validation half: no pick
    none = best_variant({s: df.iloc[:12] for s, df in scores.items()}, candidates=["good"], n_boot=50)
    assert none.name is None and none.test.empty and "No KV-CoE variant" in none.quote()


def test_the_verdict_sentences_quote_the_tables(scored):
    from kvlib.experiments.kv_coe import auroc_differences, best_variant, table2_verdicts

    df = scored
    scores = {"A": df, "B": df.iloc[:12]}
    tab = table2(scores, n_boot=200)
    diffs = auroc_differences(scores, n_boot=200)
    best = best_variant({"A": df}, n_boot=200, min_class=5)
    lines = table2_verdicts(tab, diffs, best)
    assert len(lines) == 3 and lines[1].startswith("B (") and "no AUROC" in lines[1]
    a = lines[0]
    assert a.startswith("A (30 correct / 30 wrong): KV-CoE-C (V) ")
    for m in ("MaxProb", "Length", "CoE-C"):
        lo, hi = tab.loc[m, "A AUROC lo"], tab.loc[m, "A AUROC hi"]
        assert f"{tab.loc[m, 'A AUROC']:.1f} [{lo:.1f}, {hi:.1f}]" in a
    r = diffs[(diffs["set"] == "A") & (diffs["score"] == "KV-CoE-C (V)") & (diffs["baseline"] == "MaxProb")].iloc[0]
    word = "higher" if r["lo"] > 0 else "lower" if r["hi"] < 0 else "no difference shown"
    assert f"{r['AUROC difference']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}], {word}" in a
    assert "paper's form" in a and "prompt+answer" in a and "Output+KV - Output-probe" in a
    assert lines[2].startswith(best.quote())
