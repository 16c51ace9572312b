"""Difficulty labels, split hygiene, prompt KV feature pooling and the MLP classifier."""

import numpy as np
import pytest
import torch

from kvlib import tiny_model
from kvlib.core.cache import kv_layers, output_cache
from kvlib.core.decoding import DecodeConfig, decode
from kvlib.switching.difficulty import (DifficultyClassifier, FeatureSpec, TrainConfig, difficulty_label,
                                        features_from_sums, live_features, prompt_kv_extractor, question_key,
                                        split_by_question, train_classifier)

GRID = (4, 16, 500)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=5)


def _enc(tok, texts):
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


TEXTS = ["What is 2 + 3?", "A farmer has 12 cows and buys 7 more. How many cows?" * 2, "x"]


def test_labels_match_the_paper():
    assert difficulty_label(True, 10, True) == 0
    assert difficulty_label(True, 10, False) == 0
    assert difficulty_label(True, 127, True) == 0
    assert difficulty_label(True, 128, True) == 25
    assert difficulty_label(True, 500, False) == 25
    assert difficulty_label(False, 5, True) == 75
    assert difficulty_label(False, 5, False) == 100
    assert difficulty_label(True, 40, True, short=32) == 25


def test_split_by_question_keeps_questions_whole_and_excludes_test():
    qs = [f"Question number {i}?" for i in range(50)]
    rows = qs + [q.upper() + "  " for q in qs[:20]] + ["question  number 3 ?"]  # repeats in other spellings
    test = ["QUESTION NUMBER 7?", "Question number 8?"]
    splits = split_by_question(rows, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1, exclude=test)
    keys = {name: {question_key(rows[i]) for i in idx} for name, idx in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    banned = {question_key(q) for q in test}
    assert not banned & (keys["train"] | keys["val"] | keys["test"])
    used = np.concatenate(list(splits.values()))
    assert len(used) == len(set(used)) == len(rows) - 4  # questions 7 and 8 and their upper-case repeats dropped
    assert [len(keys[k]) for k in ("train", "val", "test")] == [29, 9, 10]  # 48 distinct questions left
    again = split_by_question(rows, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1, exclude=test)
    assert all((again[k] == splits[k]).all() for k in splits)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions must be >= 0 and sum to 1"):
        split_by_question(["a"], {"train": 0.5, "val": 0.2})


def _direct_sums(model, tok, text, n, layers):
    """Reference: prefill one unpadded prompt, sum keys||values over its last n tokens per layer."""
    enc = _enc(tok, [text])
    out = model(**enc, use_cache=True)
    rows = []
    for i in layers:
        k, v = kv_layers(output_cache(out))[i]
        rows.append(torch.cat([k[0, :, -n:].sum(1).flatten(), v[0, :, -n:].sum(1).flatten()]))
    return torch.stack(rows).detach().numpy()


def test_extractor_equals_direct_prefill_and_ignores_padding(tiny):
    model, tok = tiny
    enc = _enc(tok, TEXTS)
    assert (enc.attention_mask == 0).any()  # the batch is really padded
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=6))
    arrays = prompt_kv_extractor(GRID, keep_layers=2)(model, res, enc.input_ids, enc.attention_mask)
    for text, a in zip(TEXTS, arrays):
        assert a["prompt_kv_sums"].shape == (3, 2, 2 * 2 * 8)
        assert a["prompt_kv_layers"].tolist() == [1, 2]
        for g, n in enumerate(GRID):
            ref = _direct_sums(model, tok, text, n, [1, 2])  # n=500 > prompt: every real token, no padding
            np.testing.assert_allclose(a["prompt_kv_sums"][g], ref, rtol=1e-4, atol=1e-4)
    short = arrays[2]["prompt_kv_sums"]  # one-token prompt: every N gives the same sum
    np.testing.assert_allclose(short[0], short[2], rtol=1e-6)


def test_features_from_sums_slices_and_means():
    sums = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    f = features_from_sums(sums, (32, 64, 128), FeatureSpec(64, 2))
    np.testing.assert_allclose(f, sums[1, 2:].mean(0))
    with pytest.raises(ValueError, match="N=16"):
        features_from_sums(sums, (32, 64, 128), FeatureSpec(16, 2))
    with pytest.raises(ValueError, match="keep"):
        features_from_sums(sums, (32, 64, 128), FeatureSpec(32, 8))


def test_live_features_read_the_last_fed_tokens(tiny):
    model, tok = tiny
    enc = _enc(tok, TEXTS)
    spec = FeatureSpec(8, 2)
    seen = {}

    def controller(state):
        seen.setdefault(state.step, (live_features(state, [0, 1, 2], spec), [list(t) for t in state.tokens]))
        return {}

    decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=12, stop_token_ids=(-1,)),
           controller=controller)
    res = decode(model, enc.input_ids, enc.attention_mask, DecodeConfig(max_new_tokens=1))
    sums = prompt_kv_extractor((8,), keep_layers=2)(model, res, enc.input_ids, enc.attention_mask)
    at0 = seen[0][0].numpy()
    for r in range(3):  # step 0: nothing generated is fed yet -> the prompt features
        ref = features_from_sums(sums[r]["prompt_kv_sums"], (8,), spec)
        np.testing.assert_allclose(at0[r], ref, rtol=1e-5, atol=1e-5)
    feats, tokens = seen[10]
    for r, text in enumerate(TEXTS):  # step 10: the last 8 fed tokens = prompt + generated minus the pending one
        ids = enc.input_ids[r][enc.attention_mask[r].bool()].tolist() + tokens[r][:-1]
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        ref = np.mean([np.concatenate([k[0, :, -8:].sum(1).flatten().detach().numpy(),
                                       v[0, :, -8:].sum(1).flatten().detach().numpy()])
                       for k, v in kv_layers(output_cache(out))[1:]], axis=0)
        np.testing.assert_allclose(feats[r].numpy(), ref, rtol=1e-4, atol=1e-4)


def _synthetic(n, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 5 + 3
    y = np.clip(50 + 20 * x[:, 0] / 5 - 15 * x[:, 1] / 5, 0, 100).astype(np.float32)
    return x, y


def test_classifier_learns_and_round_trips(tmp_path):
    x, y = _synthetic(400)
    xv, yv = _synthetic(100, seed=1)
    clf = train_classifier(x, y, xv, yv, FeatureSpec(64, 4), TrainConfig(max_epochs=150, patience=20), {"note": "t"})
    pred = clf.predict(xv)
    assert pred.shape == (100,) and pred.min() >= 0 and pred.max() <= 100
    rmse = np.sqrt(np.mean((pred - yv) ** 2))
    assert rmse < 0.5 * yv.std()  # far better than predicting the mean
    assert abs(clf.info["val_rmse"] - rmse) < 1e-3
    path = clf.save(tmp_path / "clf.safetensors")
    back = DifficultyClassifier.load(path)
    assert back.spec == FeatureSpec(64, 4) and back.info["note"] == "t"
    np.testing.assert_allclose(back.predict(xv), pred, rtol=1e-6)
    assert back.fingerprint() == clf.fingerprint()
    with pytest.raises(ValueError, match="dims"):
        back.predict(xv[:, :5])
    path.write_bytes(b"rewritten")  # a loaded classifier owns its tensors: rewriting the file cannot fault it
    np.testing.assert_allclose(back.predict(xv), pred, rtol=1e-6)


def test_training_is_seeded():
    x, y = _synthetic(100)
    cfg = TrainConfig(max_epochs=5)
    a = train_classifier(x[:80], y[:80], x[80:], y[80:], FeatureSpec(), cfg)
    b = train_classifier(x[:80], y[:80], x[80:], y[80:], FeatureSpec(), cfg)
    assert a.fingerprint() == b.fingerprint()


def test_fast_cap_is_a_rounded_up_quantile_of_at_least_the_labels_split():
    from kvlib.switching.difficulty import SHORT_ANSWER, fast_cap

    rng = np.random.default_rng(0)
    lengths = rng.gamma(2.0, 60.0, 2000).round() + 1
    cap = fast_cap(lengths, quantile=0.98)
    assert cap % 32 == 0 and cap >= SHORT_ANSWER
    assert np.mean(lengths >= cap) <= 0.02 < np.mean(lengths >= cap - 32)  # the smallest multiple of 32 that fits
    test = rng.gamma(2.0, 60.0, 2000).round() + 1  # fresh answers of the same kind: fewer than 5% reach it
    assert np.mean(test >= cap) < 0.05
    assert fast_cap([3, 5, 9] * 50) == SHORT_ANSWER  # short answers still get the 128 tokens the labels assume
    assert fast_cap(lengths, ceiling=200) == 200  # never above the cap the answers were generated with
    with pytest.raises(ValueError, match="no training fast answers"):
        fast_cap([])
    with pytest.raises(ValueError, match="quantile"):
        fast_cap(lengths, quantile=0)


def test_cap_records_are_the_answers_a_smaller_cap_gives():
    from kvlib.switching.difficulty import cap_records

    recs = [{"item_id": "a", "question": "q", "correct": True, "n_tokens": 10, "finish_reason": "stop"},
            {"item_id": "b", "question": "q", "correct": True, "n_tokens": 130, "finish_reason": "stop"},
            {"item_id": "c", "question": "q", "correct": True, "n_tokens": 128, "finish_reason": "stop"},
            {"item_id": "d", "question": "q", "correct": False, "n_tokens": 300, "finish_reason": "length"}]
    out = cap_records(recs, 128)
    assert [r["n_tokens"] for r in out] == [10, 128, 128, 128]
    assert [r["correct"] for r in out] == [True, False, True, False]  # cut = unfinished = wrong
    assert [r["finish_reason"] for r in out] == ["stop", "length", "stop", "length"]
    assert [difficulty_label(r["correct"], r["n_tokens"], True) for r in out] == [0, 75, 25, 75]  # 25 can occur


def test_baselines_of_the_classifier():
    from kvlib.switching.difficulty import baseline_rmse

    rng = np.random.default_rng(1)
    length = rng.integers(30, 400, 600)
    y = np.where(length > 200, 75.0, 0.0) + rng.normal(0, 3, 600)  # difficulty that the prompt's length tells
    base = baseline_rmse(y[:400], y[400:], length[:400], length[400:])
    assert base["constant"] == pytest.approx(np.sqrt(np.mean((y[400:] - y[:400].mean()) ** 2)))
    assert base["prompt_length"] < 0.6 * base["constant"]
    noise = rng.permutation(y)  # labels unrelated to length: the length regressor is no better than the mean
    shuffled = baseline_rmse(noise[:400], noise[400:], length[:400], length[400:])
    assert shuffled["prompt_length"] > 0.9 * shuffled["constant"]
    same = baseline_rmse(y[:400], y[400:], np.full(400, 50), length[400:])  # one length only: the constant
    assert same["prompt_length"] == same["constant"]
