"""The MTEB classification protocol: undersampling, scores on a real subset, agreement with mteb itself."""

import numpy as np
import pytest

from kvlib import tiny_model
from kvlib.embedding.embedders import KVEmbedder, PrefillRunner, PrefillConfig, RandomEmbedder
from kvlib.embedding.mteb_classification import (ProbeConfig, classification_scores, layer_sweep, probe_textset,
                                                 run_probe_table, undersample, wide_table)
from kvlib.embedding.textsets import TextSet, cap, load_financial_phrasebank


def _toy_set(n=40):
    words = ["alpha", "beta", "gamma"]
    texts = tuple(f"{words[i % 3]} item {i}" for i in range(n))
    labels = tuple(i % 3 for i in range(n))
    return TextSet("toy", texts[: n // 2], labels[: n // 2], texts[n // 2 :], labels[n // 2 :], tuple(words),
                   "nothing", "in-test", samples_per_label=3)


class KeywordEmbedder:
    """A perfect embedder for the toy set: one-hot of the first word."""

    name = "oracle"

    def embed(self, texts):
        words = ["alpha", "beta", "gamma"]
        return np.asarray([[float(t.split()[0] == w) for w in words] for t in texts], np.float32)


def test_undersample_follows_mteb_rules():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    draws = undersample(labels, 3, 4, seed=42)
    assert len(draws) == 4
    for d in draws:
        counts = np.bincount([labels[i] for i in d], minlength=3)
        assert counts.tolist() == [3, 3, 2]  # label 2 has only two texts: both kept
    assert draws != [draws[0]] * 4  # each experiment draws another sample
    assert draws == undersample(labels, 3, 4, seed=42)
    assert draws != undersample(labels, 3, 4, seed=7)


def test_probe_separates_what_is_separable():
    ts = _toy_set()
    res = probe_textset(ts, [KeywordEmbedder(), RandomEmbedder(8)], ProbeConfig(n_experiments=4))
    oracle, rnd = res.set_index("embedder").loc[["oracle", "random"], "accuracy_mean"]
    assert oracle == 1.0
    assert rnd < 0.8
    assert res.n_train_embedded.iloc[0] <= len(ts.train_texts)
    assert all(len(s) == 4 for s in res.scores)


def test_protocol_on_real_financial_phrasebank_subset(data_dir):
    ts = cap(load_financial_phrasebank(data_dir), max_train=60, max_test=60, seed=0)
    assert len(ts.train_texts) == 60 and len(set(ts.train_labels)) == 3
    cfg = ProbeConfig(n_experiments=5)
    a = probe_textset(ts, [RandomEmbedder(32, seed=0)], cfg)
    b = probe_textset(ts, [RandomEmbedder(32, seed=0)], cfg)
    scores = np.asarray(a.scores.iloc[0])
    assert scores.shape == (5,) and ((0 <= scores) & (scores <= 1)).all()
    assert a.scores.iloc[0] == b.scores.iloc[0]
    assert a.samples_per_label.iloc[0] == 8 and a.n_test.iloc[0] == 60
    assert np.isclose(a.accuracy_std.iloc[0], scores.std())


def test_agrees_with_mteb_on_one_task(data_dir):
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict

    ts = cap(load_financial_phrasebank(data_dir), max_train=200, max_test=100, seed=0)
    emb = RandomEmbedder(16, seed=1)

    class Encoder:  # mteb's EncoderProtocol, fed our embeddings
        mteb_model_meta = None

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            return emb.embed([t for batch in inputs for t in batch["text"]])

        def similarity(self, a, b):
            raise NotImplementedError

        def similarity_pairwise(self, a, b):
            raise NotImplementedError

    task = mteb.get_task("FinancialPhrasebankClassification")

    def split(texts, labels):
        return Dataset.from_dict({"text": list(texts), "label": list(labels)})

    task.dataset = {"default": DatasetDict({"train": split(ts.train_texts, ts.train_labels),
                                            "test": split(ts.test_texts, ts.test_labels)})}
    task.data_loaded = True
    assert (task.n_experiments, task.samples_per_label, task.seed) == (10, 8, 42)
    theirs = task.evaluate(Encoder(), split="test", encode_kwargs={"batch_size": 32})["default"]
    ours = classification_scores(emb.embed(ts.train_texts), ts.train_labels, emb.embed(ts.test_texts),
                                 ts.test_labels, 8, ProbeConfig())
    np.testing.assert_allclose(ours, [s["accuracy"] for s in theirs["scores_per_experiment"]], atol=1e-12)
    assert np.isclose(ours.mean(), theirs["accuracy"])


def test_table_and_layer_sweep_on_tiny_model():
    model, tok = tiny_model("qwen2")
    p = PrefillRunner(model, tok, PrefillConfig(progress=False, batch_size=8))
    ts = _toy_set(30)
    cfg = ProbeConfig(n_experiments=2)
    long = run_probe_table([ts, ts.__class__(**{**ts.__dict__, "name": "toy2"})],
                           [KVEmbedder(p), RandomEmbedder(2 * p.head_dim)], cfg)
    assert len(long) == 4 and set(long.dim) == {2 * p.head_dim}
    wide = wide_table(long, columns=["KV cache", "random"])
    assert list(wide.index) == ["toy", "toy2"] and list(wide.columns) == ["stands for", "KV cache", "random"]
    assert all("±" in c for c in wide["KV cache"])
    sweep = layer_sweep(ts, p, layer_choices=("first", "all"), parts=("keys", "values"), config=cfg)
    assert list(sweep.layers) == ["first", "first", "all", "all"]
    assert len(sweep) == 4 and set(sweep.part) == {"keys", "values"}
    assert sweep.accuracy_mean.between(0, 1).all()


def test_config_validation():
    with pytest.raises(ValueError, match="n_experiments and max_iter must be >= 1"):
        ProbeConfig(n_experiments=0)
    with pytest.raises(ValueError, match="samples_per_label must be >= 1"):
        ProbeConfig(samples_per_label=0)


def test_table1_files_and_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from kvlib.experiments.kv_embedding_probe import plot_sweep, plot_table1, probe_run, table1
    from kvlib.profiles import get_profile

    run = probe_run(get_profile("small"), model="tiny-qwen2")
    assert run.model == "tiny-qwen2" and run.config.seed == 42 and run.config.n_experiments == 10
    ts = _toy_set(30)
    long = probe_textset(ts, [KeywordEmbedder(), RandomEmbedder(4)], ProbeConfig(n_experiments=3))
    md, csv, caption = table1(long, run)  # few-shot only: no whole-split columns
    assert list(md.index.get_level_values("representation")) == ["oracle", "random", "majority class"]
    assert md.loc[("toy", "oracle"), "few-shot accuracy"] == "1.000 ± 0.000"
    assert "whole-split accuracy [95% CI]" not in md.columns
    assert {"representation", "few_shot_accuracy", "few_shot_accuracy_std", "few_shot_f1", "model", "profile",
            "n_test", "samples_per_label"} <= set(csv.columns)
    assert "tiny-qwen2" in caption and "toy 15" in caption
    plot_table1(long).figure.savefig(tmp_path / "t.png")
    model, tok = tiny_model("qwen2")
    sweep = layer_sweep(
        ts, PrefillRunner(model, tok, PrefillConfig(progress=False)), config=ProbeConfig(n_experiments=2)
    )
    assert len(sweep) == 5 * 3
    plot_sweep(sweep).figure.savefig(tmp_path / "s.png")
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
