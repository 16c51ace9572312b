"""Table 1 in two protocols: the whole-split probe chooses C without test data, the bag-of-words control, macro-F1
and the bootstrap, the paired difference, the fixed stratified halves, the pooling recipes of one prefill, and the
tables, the verdict and the model-size table built from them."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from kvlib import tiny_model
from kvlib.embedding.embedders import (
    BagOfWords,
    HiddenStateEmbedder,
    KVEmbedder,
    KVPooling,
    LayerPooler,
    PrefillRunner,
    PrefillConfig,
    RandomEmbedder,
    RecipeEmbedder,
    embed_all,
)
from kvlib.embedding.mteb_classification import (ProbeConfig, WholeSplitConfig, few_shot_predictions, probe_textset,
                                                 run_probe_table, whole_split_probe)
from kvlib.embedding.classification_stats import bootstrap_scores, macro_f1, majority_scores, paired_difference
from kvlib.embedding.textsets import TextSet, whole_split

WORDS = ("alpha", "beta", "gamma")
TEXTS = ["hello world", "a much longer text that goes on and on for a while", "x", "medium sized text", "ok then"]


def _toy_set(n=60, one_split=False, name="toy"):
    texts = tuple(f"{WORDS[i % 3]} item {i} {'z' * (i % 4)}" for i in range(n))
    labels = tuple(i % 3 for i in range(n))
    if one_split:
        return TextSet(name, texts, labels, texts, labels, WORDS, "nothing", "in-test", 3, one_split=True)
    return TextSet(name, texts[: n // 2], labels[: n // 2], texts[n // 2 :], labels[n // 2 :], WORDS, "nothing",
                   "in-test", samples_per_label=3)


def _noisy_features(seed=0, n=120, d=20):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d)) + 0.8 * y[:, None] * (np.arange(d) < 3)
    return x.astype(np.float32), y


def test_whole_split_chooses_c_without_test_data():
    x, y = _noisy_features()
    tr_x, tr_y, te_x, te_y = x[:80], y[:80], x[80:], y[80:]
    cfg = WholeSplitConfig(cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), n_boot=50)
    a = whole_split_probe(tr_x, tr_y, te_x, te_y, cfg)
    flipped = whole_split_probe(tr_x, tr_y, te_x, 1 - te_y, cfg)  # every test label altered
    shuffled = whole_split_probe(tr_x, tr_y, te_x, np.random.default_rng(1).permutation(te_y), cfg)
    for other in (flipped, shuffled):
        assert other.C == a.C
        np.testing.assert_array_equal(other.pred, a.pred)
        np.testing.assert_array_equal(other.model[-1].coef_, a.model[-1].coef_)
    assert flipped.scores["accuracy"] == pytest.approx(1 - a.scores["accuracy"])
    # the training split does decide C: a training split with no signal picks the strongest regularisation
    noise = whole_split_probe(tr_x, np.random.default_rng(2).permutation(tr_y), te_x, te_y, cfg)
    assert a.C in cfg.cs and noise.C <= a.C
    assert a.scores["accuracy lo"] <= a.scores["accuracy"] <= a.scores["accuracy hi"]
    # dense features are standardised inside the pipeline
    assert type(a.model[0]).__name__ == "StandardScaler"


def test_whole_split_refuses_a_label_with_one_training_text():
    x, y = _noisy_features(n=10)
    y = np.asarray([0] * 9 + [1])
    with pytest.raises(ValueError, match="at least 2 training texts"):
        whole_split_probe(x, y, x, y)


def test_bag_of_words_row_fits_its_vocabulary_on_training_texts_only():
    ts = _toy_set()
    bow = BagOfWords()
    feats = bow.embed(ts.train_texts)
    assert feats.dtype == object and feats.shape == (len(ts.train_texts),)
    res = whole_split_probe(feats, ts.train_labels, bow.embed(ts.test_texts), ts.test_labels,
                            WholeSplitConfig(n_boot=50), text_features=bow)
    assert res.scores["accuracy"] == 1.0  # the first word is the label
    vocab = res.model[0].vocabulary_
    assert "item 59" not in vocab and "59" not in vocab  # only in a test text
    assert "item 10" in vocab and res.model[0].ngram_range == (1, 2)
    preds = few_shot_predictions(feats, ts.train_labels, bow.embed(ts.test_texts), 3, ProbeConfig(n_experiments=3),
                                 text_features=bow)
    assert preds.shape == (3, len(ts.test_texts))
    with pytest.raises(ValueError, match="BagOfWords"):
        whole_split_probe(feats, ts.train_labels, feats, ts.train_labels)
    row = probe_textset(ts, [bow, RandomEmbedder(8)], ProbeConfig(n_experiments=3), WholeSplitConfig(n_boot=50))
    row = row.set_index("embedder")
    assert row.loc["bag-of-words", "accuracy_mean"] > row.loc["random", "accuracy_mean"]
    assert row.loc["bag-of-words", "whole_accuracy"] == 1.0 and row.loc["bag-of-words", "dim"] == 0


def test_macro_f1_and_bootstrap_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 4, 200)  # label 3 predicted, never true
    assert macro_f1(y, p) == pytest.approx(f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0))
    s = bootstrap_scores(y, p, n_boot=300, seed=1)
    assert s["accuracy"] == pytest.approx((y == p).mean())
    assert s["accuracy lo"] < s["accuracy"] < s["accuracy hi"] and s["macro-F1 lo"] < s["macro-F1 hi"]
    assert s == bootstrap_scores(y, p, n_boot=300, seed=1)
    maj = majority_scores(np.asarray([0, 0, 0, 1]), n_boot=50)
    assert maj["accuracy"] == 0.75 and maj["macro-F1"] == pytest.approx(0.5 * 2 * 0.75 / 1.75)


def test_paired_difference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.where(rng.random(300) < 0.9, y, 1 - y)
    bad = np.where(rng.random(300) < 0.6, y, 1 - y)
    same = paired_difference(y, good, good, n_boot=200)
    assert same == {k: 0.0 for k in same}  # the same predictions: zero, and a zero-width interval
    d = paired_difference(y, good, bad, n_boot=500)
    assert d["accuracy"] == pytest.approx((good == y).mean() - (bad == y).mean())
    assert 0 < d["accuracy lo"] < d["accuracy"] < d["accuracy hi"]
    assert d["macro-F1 lo"] > 0
    rev = paired_difference(y, bad, good, n_boot=500)
    assert rev["accuracy"] == pytest.approx(-d["accuracy"]) and rev["accuracy hi"] < 0
    # pairing: the interval of the difference is narrower than that of either score alone
    width = d["accuracy hi"] - d["accuracy lo"]
    alone = bootstrap_scores(y, bad, n_boot=500)
    assert width < 2 * (alone["accuracy hi"] - alone["accuracy lo"])


def test_half_half_split_is_stratified_fixed_and_disjoint():
    texts = tuple(f"sentence {i}" for i in range(90)) + ("sentence 3",)  # one repeated text
    labels = tuple([0] * 50 + [1] * 30 + [2] * 10) + (0,)
    ts = TextSet("one", texts, labels, texts, labels, WORDS, "x", "y", one_split=True)
    a, b = whole_split(ts), whole_split(ts)
    assert a == b
    assert not set(a.train_texts) & set(a.test_texts)
    assert set(a.train_texts) | set(a.test_texts) == set(texts) and len(a.train_texts) + len(a.test_texts) == 90
    assert np.bincount(a.train_labels).tolist() == [25, 15, 5] == np.bincount(a.test_labels).tolist()
    two = TextSet("two", texts[:40], labels[:40], texts[40:], labels[40:], WORDS, "x", "y")
    assert whole_split(two) is two


def test_half_half_split_of_financial_phrasebank(data_dir):
    from kvlib.embedding.textsets import load_financial_phrasebank

    ts = load_financial_phrasebank(data_dir)
    assert ts.one_split
    h = whole_split(ts)
    assert (len(h.train_texts), len(h.test_texts)) == (1129, 1130)  # 2264 sentences, 5 repeated
    assert not set(h.train_texts) & set(h.test_texts)
    share = np.bincount(h.train_labels) / len(h.train_labels) - np.bincount(h.test_labels) / len(h.test_labels)
    assert np.abs(share).max() < 0.002
    assert h == whole_split(load_financial_phrasebank(data_dir))


def test_data_dir_sets_in_table1(data_dir):
    from kvlib.embedding.textsets import load_textsets

    sets = load_textsets(data_dir, max_train=40, max_test=30, names=("AmazonCounterfactual", "FinancialPhrasebank"))
    assert [s.name for s in sets] == ["AmazonCounterfactual", "FinancialPhrasebank"]
    ac, fpb = sets
    assert not ac.one_split and fpb.one_split and ac.samples_per_label == 32
    long = run_probe_table(sets, [BagOfWords(), RandomEmbedder(8)], ProbeConfig(n_experiments=2),
                           whole=WholeSplitConfig(n_boot=50, cs=(0.1, 10.0)))
    r = long.set_index(["set", "embedder"])
    assert r.loc[("AmazonCounterfactual", "bag-of-words"), "whole_n_train"] == 40
    assert r.loc[("FinancialPhrasebank", "bag-of-words"), "whole_n_test"] == 15  # its 30 test texts halved
    assert long.whole_accuracy.between(0, 1).all() and long.f1_mean.between(0, 1).all()


def test_recipes_equal_direct_pooling_and_share_one_prefill():
    model, tok = tiny_model("qwen2")
    p = PrefillRunner(model, tok, PrefillConfig(progress=False, batch_size=2))
    kv_layers, hidden_layers = LayerPooler(p, "kv"), LayerPooler(p, "hidden")
    recipes = [RecipeEmbedder(kv_layers, name="last4"), RecipeEmbedder(kv_layers, layers="all", name="all"),
               RecipeEmbedder(kv_layers, heads="apart", name="apart"),
               RecipeEmbedder(kv_layers, layers="first", part="keys", name="first/keys"),
               RecipeEmbedder(hidden_layers, name="hidden")]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    got = embed_all(recipes, TEXTS)
    assert len(calls) == 3  # ceil(5 / 2) batches for every recipe
    want = embed_all([KVEmbedder(p, name="last4"), KVEmbedder(p, KVPooling(layers="all"), name="all"),
                      KVEmbedder(p, KVPooling(layers="first", part="keys"), name="first/keys"),
                      HiddenStateEmbedder(p, name="hidden")], TEXTS)
    for name, arr in want.items():
        np.testing.assert_allclose(got[name], arr, atol=1e-5, err_msg=name)
    kv_heads = model.config.num_key_value_heads
    assert got["apart"].shape == (len(TEXTS), kv_heads * 2 * p.head_dim) == (len(TEXTS), recipes[2].dim)
    # heads kept apart: the mean of its head blocks is the averaged recipe's direction
    unnorm = RecipeEmbedder(kv_layers, heads="apart", normalize=False).derive(kv_layers.embed(TEXTS))
    mean = unnorm.reshape(len(TEXTS), kv_heads, -1).mean(1)
    np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), got["last4"], atol=1e-5)
    with pytest.raises(ValueError, match="hidden states have no"):
        RecipeEmbedder(hidden_layers, heads="apart")


def _table_run(tmp_path=None):
    from kvlib.experiments.kv_embedding_probe import probe_run, standard_embedders
    from kvlib.profiles import get_profile

    run = probe_run(get_profile("small"), model="tiny-qwen2")
    run = dataclasses.replace(run, prefill=dataclasses.replace(run.prefill, progress=False),
                              whole=WholeSplitConfig(n_boot=100, cs=(0.01, 1.0, 100.0)),
                              config=ProbeConfig(n_experiments=3))
    model, tok = tiny_model("qwen2")
    embs = standard_embedders(model, tok, run, dedicated=False)
    # a set whose labels no text carries: every representation at the majority level
    rng = np.random.default_rng(0)
    texts = tuple(f"text number {i}" for i in range(80))
    labels = tuple(int(v) for v in (rng.random(80) < 0.15))
    flat = TextSet("flat", texts[:40], labels[:40], texts[40:], labels[40:], ("a", "b"), "nothing", "noise", 3)
    long = run_probe_table([_toy_set(), flat], embs, run.config, whole=run.whole)
    return run, long


def test_table1_differences_and_verdict_from_the_tables(tmp_path):
    from kvlib.experiments.kv_embedding_probe import (MAJORITY, table1, table1_differences, table1_markdown,
                                                      table1_verdict)
    from kvlib.experiments.model_size import flat_table, table1_by_model

    run, long = _table_run()
    md, csv, caption = table1(long, run)
    reps = ["KV cache", "KV cache (every layer)", "KV cache (heads apart)", "hidden states",
            "hidden states (every layer)", "random", "bag-of-words", MAJORITY]
    assert list(csv[csv.set == "toy"].representation) == reps
    toy = csv[csv.set == "toy"].set_index("representation")
    assert toy.loc["bag-of-words", "whole_accuracy"] == 1.0 and not toy.loc["bag-of-words", "whole_at_majority"]
    assert toy.loc[MAJORITY, "few_shot_accuracy"] == pytest.approx(1 / 3)
    assert not toy.set_at_majority_whole.any()
    flat = csv[csv.set == "flat"]
    assert flat.set_at_majority_whole.all() and flat.set_at_majority_few_shot.all()
    assert "flat (all at majority: few-shot, whole split)" in md.index.get_level_values("set")
    assert {"few-shot accuracy", "few-shot macro-F1", "whole-split accuracy [95% CI]",
            "whole-split macro-F1 [95% CI]", "at majority level"} <= set(md.columns)
    assert "half/half" in caption and "cross-validation on the training split only" in caption
    assert table1_markdown(md, caption).startswith(caption)

    dmd, dcsv, dcap = table1_differences(long, run)
    assert {("KV cache", "hidden states"), ("KV cache", "bag-of-words")} <= set(zip(dcsv.a, dcsv.b))
    assert (dcsv.accuracy_lo <= dcsv.accuracy).all() and (dcsv.accuracy <= dcsv.accuracy_hi).all()
    assert "paired bootstrap" in dcap and len(dmd) == len(dcsv)

    # the verdict reads the saved CSVs
    csv.to_csv(tmp_path / "t.csv", index=False)
    dcsv.to_csv(tmp_path / "d.csv", index=False)
    verdict = table1_verdict(pd.read_csv(tmp_path / "t.csv"), pd.read_csv(tmp_path / "d.csv"))
    assert "Few-shot (MTEB) protocol" in verdict and "Whole-split protocol" in verdict
    assert "at its level on flat" in verdict and "cannot rank" in verdict
    kv_bow = dcsv[(dcsv.set == "toy") & (dcsv.b == "bag-of-words")].iloc[0]
    assert f"{kv_bow.accuracy:+.3f}" in verdict
    below = int(((dcsv.a == "KV cache") & (dcsv.b == "bag-of-words") & (dcsv.accuracy_hi < 0)).sum())
    assert f"bag-of-words on {below} of 2 sets" in verdict
    assert f"{toy.loc['bag-of-words', 'whole_accuracy']:.3f}" in verdict

    # the model-size table reads the new layout
    (tmp_path / "m-0.5b").mkdir()
    csv.to_csv(tmp_path / "m-0.5b" / "table1_kv_probe.csv", index=False)
    t1 = table1_by_model({"m-0.5b": tmp_path / "m-0.5b"})
    assert t1.loc[("toy", "m-0.5b"), ("bag-of-words", "whole split")] == 1.0
    assert t1.loc[("toy", "m-0.5b"), ("KV cache", "few-shot")] == toy.loc["KV cache", "few_shot_accuracy"]
    assert "KV cache · whole split" in flat_table(t1, names=["set", "model"]).columns

    # notebook 06's reading per model: the verdict's summary, from the same files
    from kvlib.experiments.model_size import table1_readings

    dcsv.to_csv(tmp_path / "m-0.5b" / "table1_differences.csv", index=False)
    readings = table1_readings({"m-0.5b": tmp_path / "m-0.5b", "absent": tmp_path / "none"})
    assert readings.model.tolist() == ["m-0.5b"]
    row = readings.iloc[0]
    assert "at its level on flat" in row["few-shot (MTEB) protocol"]
    assert f"bag-of-words on {below} of 2 sets" in row["whole-split protocol"]
    assert row["whole-split protocol"].split(" In sum")[0] in verdict  # copied, not rewritten
