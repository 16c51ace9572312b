"""The verdicts table: each claim's verdict follows its rule from the paired intervals of the tables it reads,
and a claim whose table is missing says so instead of guessing."""

import pandas as pd
import pytest

from kvlib.experiments.verdicts import (FAILS, HOLDS, MIXED, NOT_MEASURED, NOT_SHOWN, tally, verdicts,
                                        verdicts_markdown, verdicts_table)


def _t1(folder, kv_minus_hidden, kv_minus_bow):
    rows = []
    for b, cells in (("hidden states", kv_minus_hidden), ("bag-of-words", kv_minus_bow)):
        for i, (lo, hi) in enumerate(cells):
            rows.append({"set": f"S{i}", "a": "KV cache", "b": b, "n_test": 100, "accuracy": (lo + hi) / 2,
                         "accuracy_lo": lo, "accuracy_hi": hi})
    pd.DataFrame(rows).to_csv(folder / "table1_differences.csv", index=False)


def _t2(folder, baseline, cells):
    rows = [{"set": f"S{i}", "score": "KV-CoE-C (V)", "baseline": baseline, "AUROC difference": (lo + hi) / 2,
             "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(cells)]
    path = folder / "table2_differences.csv"
    old = pd.read_csv(path) if path.exists() else pd.DataFrame()
    pd.concat([old, pd.DataFrame(rows)]).to_csv(path, index=False)


def _t3(folder, cells):
    pd.DataFrame([{"set": f"S{i}", "method": "KV-Generative", "n": 100, "mean_tokens": 100.0,
                   "difference": (lo + hi) / 2, "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(cells)]
                 ).to_csv(folder / "table3_vs_budget.csv", index=False)


def _by_claim(rows):
    return {r.claim.split()[0] + " " + r.claim.split()[1]: r for r in rows}


def test_tally_counts_intervals_above_below_and_across_zero():
    assert tally(pd.Series([0.1, -0.5, -0.2, float("nan")]), pd.Series([0.3, -0.1, 0.2, 1.0])) == (1, 1, 1)


@pytest.mark.parametrize("hidden, bow, expected", [
    ([(-0.01, 0.02), (0.0, 0.05)], [(0.01, 0.03), (-0.02, 0.02)], HOLDS),    # never below either
    ([(-0.2, -0.1), (-0.3, -0.2)], [(-0.2, -0.1), (-0.3, -0.1)], FAILS),   # below both on every set
    ([(-0.2, -0.1), (0.0, 0.1)], [(0.0, 0.1), (0.1, 0.2)], MIXED),
])
def test_embedding_claim_follows_the_whole_split_differences(tmp_path, hidden, bow, expected):
    _t1(tmp_path, hidden, bow)
    rows = verdicts({"m": tmp_path}, root=tmp_path, repo=tmp_path)
    assert rows[0].verdict == expected
    assert "m: KV − hidden states" in rows[0].evidence


def test_coe_claims_read_their_own_baselines(tmp_path):
    _t2(tmp_path, "MaxProb", [(-20, -10), (-15, -5), (-5, 3)])      # below output baselines on most sets
    _t2(tmp_path, "CoE-C", [(-2, 4), (1, 8), (-3, 5)])              # never below hidden CoE
    rows = verdicts({"m": tmp_path}, root=tmp_path, repo=tmp_path)
    assert rows[1].verdict == FAILS and "-15.0 [-20.0, -10.0]" in rows[1].evidence
    assert rows[2].verdict == HOLDS


@pytest.mark.parametrize("cells, expected", [
    ([(1, 5), (2, 6)], HOLDS), ([(-5, -1), (-6, -2)], FAILS), ([(-1, 1), (-2, 2)], NOT_SHOWN),
    ([(1, 5), (-2, 2), (-3, 3)], MIXED)])
def test_switching_is_judged_against_the_equal_token_curve(tmp_path, cells, expected):
    _t3(tmp_path, cells)
    rows = verdicts({"m": tmp_path}, root=tmp_path, repo=tmp_path)
    assert rows[3].verdict.startswith(expected)
    assert "cannot be tested here" in rows[3].verdict          # the thinking-model setting is named
    assert "threshold sweep vs random routing" not in rows[3].evidence  # no Pareto points written here


def test_the_switching_evidence_counts_the_sweep_against_random_routing(tmp_path):
    _t3(tmp_path, [(-1, 1)])
    pd.DataFrame([{"method": m, "set": "gsm8k", "param": "", "accuracy": a, "mean_tokens": t} for m, a, t in
                  (("fast", 0.1, 10.0), ("slow", 0.5, 110.0), ("KV-Classification", 0.35, 60.0),
                   ("KV-Classification", 0.2, 85.0))]).to_csv(tmp_path / "table3_pareto_points.csv", index=False)
    rows = verdicts({"m": tmp_path}, root=tmp_path, repo=tmp_path)
    assert rows[3].verdict.startswith(NOT_SHOWN)  # the sweep is evidence beside the rule, not part of it
    assert "threshold sweep vs random routing" in rows[3].evidence and "gsm8k 1 above, 1 below of 2" in rows[3].evidence


def test_missing_tables_are_not_measured_and_the_table_renders(tmp_path):
    rows = verdicts({"a": tmp_path / "a", "b": tmp_path / "b"}, root=tmp_path, repo=tmp_path)
    assert [r.verdict for r in rows[:3]] == [NOT_MEASURED] * 3
    assert rows[0].source == "no table yet"                    # a table that does not exist is not linked
    md = verdicts_markdown(verdicts_table(rows), "caption")
    assert "[no table yet]" not in md and "table1_differences.csv" not in md
    assert md.startswith("caption\n\n|") and md.count("\n|") == len(rows) + 2


def test_a_model_without_tables_does_not_hide_another_models_verdict(tmp_path):
    (tmp_path / "a").mkdir()
    _t1(tmp_path / "a", [(-0.2, -0.1)], [(-0.3, -0.2)])
    rows = verdicts({"a": tmp_path / "a", "b": tmp_path / "b"}, root=tmp_path, repo=tmp_path)
    assert rows[0].verdict == FAILS and "b: no whole-split Table 1 yet" in rows[0].evidence


def test_links_point_where_the_tables_are_committed_not_into_the_run_folder(tmp_path):
    """A run reads its tables from its stage (``build/publish/...``); the verdicts' ``from`` links must name the
    committed files, which exist in the repository."""
    from kvlib.experiments.verdicts import committed_path

    stage = tmp_path / "build" / "publish" / "gpu" / "m" / "tables" / "gpu"
    (stage / "m").mkdir(parents=True)
    (stage / "m" / "table1_differences.csv").write_text("set,difference\n")
    rows = verdicts({"m": stage / "m"}, root=tmp_path / "tables", repo=tmp_path)
    assert rows[0].source == "tables/gpu/m/table1_differences.csv"
    assert committed_path(tmp_path / "tables" / "overhead.csv", tmp_path) == "tables/overhead.csv"
    assert committed_path(tmp_path / "other" / "x.csv", tmp_path) == "other/x.csv"
