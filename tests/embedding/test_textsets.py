"""Text classification loaders: real MTEB files from a data directory, stand-ins from installed packages."""

import logging

import numpy as np
import pytest

from kvlib.embedding import textsets
from kvlib.embedding.textsets import (
    TextSet, cap, describe, load_amazon_counterfactual, load_bbc_news, load_financial_phrasebank,
    load_rotten_tomatoes, load_textsets,
)


def test_missing_data_dir_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_textsets(tmp_path)
    msg = str(err.value)
    assert "financial_phrasebank_allagree.txt" in msg and "en_train.tsv" in msg and "DATA_DIR" in msg
    (tmp_path / "financial_phrasebank_allagree.txt").write_text("Profit rose .@positive\n")
    with pytest.raises(FileNotFoundError, match="amazon_counterfactual/en_test.tsv"):
        load_textsets(tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_amazon_counterfactual(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_textsets(None, names=("FinancialPhrasebank",))
    with pytest.raises(ValueError, match="unknown sets"):
        load_textsets(None, names=("DBpedia",))


def test_financial_phrasebank_uses_one_split_like_mteb(data_dir):
    ts = load_financial_phrasebank(data_dir)
    assert ts.label_names == ("negative", "neutral", "positive")
    assert np.bincount(ts.train_labels).tolist() == [303, 1391, 570]
    assert ts.train_texts == ts.test_texts and ts.samples_per_label == 8
    assert not any(t.endswith("@") for t in ts.train_texts)


def test_amazon_counterfactual_splits(data_dir):
    ts = load_amazon_counterfactual(data_dir)
    assert (len(ts.train_texts), len(ts.test_texts)) == (4018, 670)
    assert ts.label_names == ("counterfactual", "not counterfactual") and ts.samples_per_label == 32


@pytest.mark.parametrize("loader, n_labels", [(load_bbc_news, 5), (load_rotten_tomatoes, 2)])
def test_standins_are_disjoint_stratified_and_fixed(loader, n_labels):
    ts = loader()
    assert len(ts.label_names) == n_labels
    assert not set(ts.train_texts) & set(ts.test_texts)
    ratio = np.bincount(ts.train_labels) / np.bincount(ts.test_labels)
    assert np.allclose(ratio, 1, atol=0.02)
    assert loader().test_texts[:5] == ts.test_texts[:5]


def test_rotten_tomatoes_drops_plot_summaries():
    assert load_rotten_tomatoes().label_names == ("fresh", "rotten")


def test_vader_amazon_snippets_binarised():
    try:
        ts = textsets.load_vader_snippets()
    except FileNotFoundError as err:  # no cached sdist and no package index
        pytest.skip(str(err))
    assert ts.label_names == ("negative", "positive")
    assert 3000 < len(ts.train_texts) + len(ts.test_texts) < 3707  # rating-0 snippets dropped


def test_vader_checksum_is_enforced(tmp_path):
    (tmp_path / textsets.VADER_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sha256"):
        textsets.fetch_vader(tmp_path)


def test_cap_is_stratified_and_seeded():
    texts = tuple(f"t{i}" for i in range(200))
    labels = tuple([0] * 150 + [1] * 50)
    ts = TextSet("x", texts, labels, texts, labels, ("a", "b"), "-", "-")
    small = cap(ts, 40, 20, seed=1)
    assert len(small.train_texts) == 40 and len(small.test_texts) == 20
    assert np.bincount(small.train_labels).tolist() == [30, 10]
    assert cap(ts, 40, 20, seed=1) == small and cap(ts, 40, 20, seed=2) != small
    assert cap(ts, None, None) == ts
    d = describe([small])
    assert d.loc[0, "majority acc"] == 0.75 and d.loc[0, "test"] == 20
    with pytest.raises(ValueError, match="labels"):
        TextSet("bad", ("a",), (3,), (), (), ("x",), "-", "-")


def test_empty_set_and_empty_cap_are_errors_naming_the_set():
    with pytest.raises(ValueError, match="text set Empty has an empty test split"):
        TextSet("Empty", ("a", "b"), (0, 1), (), (), ("x", "y"), "-", "files")
    with pytest.raises(ValueError, match="text set Nothing has an empty training pool and an empty test split"):
        TextSet("Nothing", (), (), (), (), ("x",), "-", "files")
    ts = TextSet("Tiny", ("a", "b"), (0, 1), ("c", "d"), (0, 1), ("x", "y"), "-", "-")
    with pytest.raises(ValueError, match="text set Tiny: max_test=0 keeps no texts"):
        cap(ts, None, 0)
    assert cap(ts, 10, 10) == ts  # a cap, not a size: a smaller set is kept whole


def test_sets_left_out_without_data_dir_are_listed(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kvlib")
    fake = TextSet("Fake", ("a", "b"), (0, 1), ("c", "d"), (0, 1), ("x", "y"), "-", "-")
    for name in ("load_bbc_news", "load_rotten_tomatoes", "load_vader_snippets"):
        monkeypatch.setattr(textsets, name, lambda *a, **k: fake)
    sets = load_textsets(None)
    assert len(sets) == 3 and [n for n, _ in sets.skipped] == ["AmazonCounterfactual", "FinancialPhrasebank"]
    assert "needs DATA_DIR holding financial_phrasebank_allagree.txt" in dict(sets.skipped)["FinancialPhrasebank"]
    notices = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert notices == [
        ("kvlib.embedding.textsets", logging.INFO, f"skipping {n}: {reason}") for n, reason in sets.skipped
    ]
    assert notices[0][2].startswith("skipping AmazonCounterfactual: needs DATA_DIR")
    assert load_textsets(None, names=("BBCNews",)).skipped == []  # asked for by name: nothing left out
