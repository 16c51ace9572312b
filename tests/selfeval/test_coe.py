"""Chain-of-Embedding scores (both forms) and the trajectories they are computed on."""

import math
import time

import numpy as np
import pytest
import torch

from kvlib import GenerationSettings, Prompt, generate, kv_layers, kv_trajectory_extractor, open_store, output_cache
from kvlib import record_array, tiny_model
from kvlib.selfeval.coe import coe_scores, coe_steps, hidden_coe_extractor, step_angles


def test_right_angle_path_both_forms():
    """x0 = (1, 0), x1 = (1, 1), x2 = (0, 1): two unit steps, each turning by pi/4.

    dr = (1, 1); dtheta = (angle((1,1),(1,0)), angle((0,1),(1,1))) = (pi/4, pi/4).
    First-to-last: ||x2 - x0|| = ||(-1, 1)|| = sqrt(2); angle(x2, x0) = pi/2.
    Reference: M = (1/sqrt2, 1/sqrt2), A = (1/2, 1/2), so R = 1/sqrt2 - 1/2 and
    C = |mean(M e^{iA})| = (1/sqrt2) |e^{i/2}| = 1/sqrt2.
    Paper (alpha = beta = 1): R = mean(1 + pi/4) = 1 + pi/4, C = |1 + i pi/4| = sqrt(1 + pi^2/16);
    with alpha = 2, beta = 3: R = 2 + 3 pi/4 (C has no weights).
    """
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ref = coe_scores(x)
    assert ref["R"] == pytest.approx(1 / math.sqrt(2) - 0.5, abs=1e-12)
    assert ref["C"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    pap = coe_scores(x, form="paper")
    assert pap["R"] == pytest.approx(1 + math.pi / 4, abs=1e-12)
    assert pap["C"] == pytest.approx(math.sqrt(1 + math.pi**2 / 16), abs=1e-12)
    w = coe_scores(x, form="paper", alpha=2.0, beta=3.0)
    assert w["R"] == pytest.approx(2 + 3 * math.pi / 4, abs=1e-12)
    assert w["C"] == pytest.approx(pap["C"], abs=1e-12)


def test_straight_line_off_origin():
    """x0 = (1, 0), x1 = (1, 1), x2 = (1, 3): a line x = 1 walked upwards, steps of length 1 and 2.

    The polar angle of (1, y) is atan(y), so dtheta = (pi/4, atan 3 - pi/4), summing to the first-to-last
    angle atan 3; the steps sum to the first-to-last distance 3. Hence M = (1/3, 2/3) and A = (a, 1 - a) with
    a = (pi/4) / atan 3: both average 1/2, so the reference R = 0 exactly, and
    C = |(1/3) e^{ia} + (2/3) e^{i(1-a)}| / 2. Paper: R = (3 + atan 3) / 2, C = |1.5 + i atan(3)/2|.
    """
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    a = (math.pi / 4) / math.atan(3)
    ref = coe_scores(x)
    assert ref["R"] == pytest.approx(0.0, abs=1e-12)
    assert ref["C"] == pytest.approx(abs(np.exp(1j * a) / 3 + 2 * np.exp(1j * (1 - a)) / 3) / 2, abs=1e-12)
    pap = coe_scores(x, form="paper")
    assert pap["R"] == pytest.approx((3 + math.atan(3)) / 2, abs=1e-12)
    assert pap["C"] == pytest.approx(abs(1.5 + 0.5j * math.atan(3)), abs=1e-12)


def test_reference_form_is_scale_invariant_and_paper_form_is_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 7))
    for s in (1e-6, 1e6):
        for key in ("R", "C"):
            assert coe_scores(s * x)[key] == pytest.approx(coe_scores(x)[key], rel=1e-9)
    assert coe_scores(10 * x, form="paper")["R"] > coe_scores(x, form="paper")["R"]


def test_angles_match_clamped_arccos():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 9)), rng.normal(size=(50, 9))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(step_angles(a, b), np.arccos(np.clip(cos, -1, 1)), atol=1e-10)
    assert step_angles(a[:1], a[:1])[0] == 0.0  # identical points: exactly 0
    assert step_angles(a[:1], -a[:1])[0] == pytest.approx(math.pi)


def test_tensor_and_array_inputs_agree():
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    for form in ("reference", "paper"):
        assert coe_scores(x, form=form) == pytest.approx(coe_scores(x.numpy(), form=form), rel=1e-6)
    assert np.isfinite(list(coe_scores(x.half()).values())).all()


@pytest.mark.parametrize("form", ["reference", "paper"])
@pytest.mark.parametrize("x", [
    np.ones((2, 4)),                                       # N < 3
    np.ones((0, 4)),                                       # empty
    np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]),        # a zero vector: its angles are undefined
    np.zeros((5, 3)),                                      # all zero
    np.array([[1.0, 0.0], [np.inf, 1.0], [0.0, 1.0]]),     # non-finite
    np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 1.0]]),
])
def test_degenerate_trajectories_give_nan(x, form):
    s = coe_scores(x, form=form)
    assert math.isnan(s["R"]) and math.isnan(s["C"])


def test_zero_normaliser_is_nan_for_reference_only():
    loop = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # first == last
    ray = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])                # no total angle
    for x in (loop, ray):
        ref = coe_scores(x)
        assert math.isnan(ref["R"]) and math.isnan(ref["C"])
        pap = coe_scores(x, form="paper")
        assert np.isfinite([pap["R"], pap["C"]]).all()
    # along a ray every step angle is 0: paper R = mean distance = sqrt(5), C = sqrt(5) too
    assert coe_scores(ray, form="paper") == pytest.approx({"R": math.sqrt(5), "C": math.sqrt(5)})


def test_identical_consecutive_points_are_zero_steps():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    m, a = coe_steps(x)
    assert m[0] == 0.0 and a[0] == 0.0
    ref = coe_scores(x)  # M = (0, 1, 1)/sqrt2, A = (0, 1/2, 1/2)
    assert ref["R"] == pytest.approx(2 / 3 / math.sqrt(2) - 1 / 3, abs=1e-12)
    assert ref["C"] == pytest.approx(abs(2 / math.sqrt(2) * np.exp(0.5j)) / 3, abs=1e-12)


def test_no_inf_on_random_and_extreme_trajectories():
    rng = np.random.default_rng(2)
    for scale in (1e-150, 1.0, 1e150):
        for n in (3, 4, 50):
            for form in ("reference", "paper"):
                s = coe_scores(scale * rng.normal(size=(n, 5)), form=form)
                assert not np.isinf([s["R"], s["C"]]).any()


def test_argument_errors():
    with pytest.raises(ValueError, match="form"):
        coe_scores(np.ones((4, 2)), form="other")
    with pytest.raises(ValueError, match="alpha"):
        coe_scores(np.ones((4, 2)), alpha=2.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        coe_scores(np.ones(4))


# ---------- trajectories read from a tiny model ----------

QUESTIONS = ["1+1?", "What is seven times eight, exactly?", "Name a prime."]


def _records(arch, tmp_path, extractors, n_new=12):
    model, tok = tiny_model(arch, seed=3)
    prompts = [Prompt(f"q{i}", tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True))
               for i, q in enumerate(QUESTIONS)]
    settings = GenerationSettings(max_new_tokens=n_new, do_sample=True, seed=1)
    store = open_store(tmp_path, arch, "toy", settings, extractors)
    recs = generate(model, tok, prompts, store, settings, batch_size=3, extractors=extractors, progress=False)
    return model, tok, recs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kv_trajectory_equals_direct_cache_read(arch, tmp_path):
    """Extractor output (batched, left-padded, read from the decoding cache) == layer-average of the cached
    values/keys at the answer's positions after one plain forward of prompt + answer (no padding)."""
    model, tok, recs = _records(arch, tmp_path, {"kv": kv_trajectory_extractor()})
    assert len({len(tok(p.strip()).input_ids) for p in QUESTIONS}) > 1  # the batch really was padded
    for rec in recs:
        prompt = tok(rec["prompt"], add_special_tokens=False).input_ids
        fed = rec["token_ids"][:-1]  # the final token never goes through the model
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt + fed]), use_cache=True)
        layers = kv_layers(output_cache(out))
        pos = slice(len(prompt), len(prompt) + len(fed))
        for part, idx in (("keys", 0), ("values", 1)):
            direct = torch.stack([kv[idx][0, :, pos, :].permute(1, 0, 2).reshape(len(fed), -1) for kv in layers])
            got = record_array(rec, f"traj_{part}")
            assert got.shape == (len(fed), layers[0][0].shape[1] * layers[0][0].shape[-1])
            np.testing.assert_allclose(got.astype(np.float32), direct.mean(0).numpy(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hidden_coe_extractor_equals_direct_computation(arch, tmp_path):
    """hidden_traj == per layer (embeddings first) the mean over the answer's positions of the hidden states of
    a plain unpadded forward of prompt + the whole answer; hidden_bytes == (L+1) x length x hidden x 4."""
    model, tok, recs = _records(arch, tmp_path, {"hidden_coe": hidden_coe_extractor()})
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    for rec in recs:
        prompt = tok(rec["prompt"], add_special_tokens=False).input_ids
        ids = prompt + rec["token_ids"]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        direct = torch.stack([h[0, len(prompt):].mean(0) for h in hs]).numpy()
        got = record_array(rec, "hidden_traj")
        assert got.shape == (n_layers + 1, hidden)
        np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)
        assert record_array(rec, "hidden_bytes")[0] == (n_layers + 1) * len(ids) * hidden * 4
        assert np.isfinite(list(coe_scores(got).values())).all()


def test_hidden_coe_pass_equals_the_extractor_and_is_computed_once(tmp_path, monkeypatch):
    """The separate re-forward pass over stored answers gives the extractor's hidden_traj and records its cost per
    item; a second call reads its store (trajectories and cost) instead of re-forwarding."""
    from kvlib.selfeval import coe

    model, tok, recs = _records("qwen2", tmp_path / "a", {"hidden_coe": hidden_coe_extractor()})
    _, _, plain = _records("qwen2", tmp_path / "b", {})
    forward = coe.hidden_trajectories

    def slow_forward(*args, **kwargs):  # each batch's re-forward takes at least 0.05 s more
        out = forward(*args, **kwargs)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(coe, "hidden_trajectories", slow_forward)
    from kvlib.core import phases

    monkeypatch.delenv(phases.ENV, raising=False)
    phases.reset()
    got = coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=2, root=tmp_path / "h", progress=False)
    took, calls = phases.totals()["hidden-state CoE"]  # the phase times the whole pass, re-forwards included
    assert calls == 1 and took >= 0.05 * -(-len(plain) // 2), phases.totals()
    phases.reset()
    for a, b in zip(recs, got):
        np.testing.assert_allclose(record_array(b, "hidden_traj"), record_array(a, "hidden_traj"), rtol=1e-4, atol=1e-5)
        # the batch's measured time over its (at most 2) items: the re-forward is inside the timed span
        assert 0.025 <= b["extract_seconds"]["hidden_coe"] < 30
    monkeypatch.setattr(coe, "hidden_trajectories", lambda *a, **k: pytest.fail("recomputed a stored pass"))
    again = coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=2, root=tmp_path / "h", progress=False)
    assert [r["item_id"] for r in again] == [r["item_id"] for r in plain]
    assert [r["extract_seconds"] for r in again] == [r["extract_seconds"] for r in got]  # the stored cost, not 0


def test_hidden_coe_pass_shards_over_processes_and_rank_0_merges(tmp_path, monkeypatch):
    """Two launched ranks (run one after the other here) each re-forward their half into a shard file; the
    relaunched rank 0 merges: every trajectory equals a one-process pass, and no shard file is left."""
    from kvlib.selfeval import coe
    from kvlib.runs.sharding import SINGLE, Shard, ShardError

    model, tok, plain = _records("qwen2", tmp_path / "b", {})
    one = coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=2, root=tmp_path / "one", progress=False,
                              shard=SINGLE)
    monkeypatch.setenv("KVLIB_SHARD_TIMEOUT", "0.2")
    run = lambda shard: coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=2,  # noqa: E731
                                            root=tmp_path / "two", progress=False, shard=shard)
    with pytest.raises(ShardError, match="shard 1 of 2 lacks"):
        run(Shard(0, 2))
    with pytest.raises(ShardError, match="rank 0 has not merged"):
        run(Shard(1, 2))
    merged = run(Shard(0, 2))
    assert [r["item_id"] for r in merged] == [r["item_id"] for r in plain]
    for a, b in zip(one, merged):
        np.testing.assert_allclose(record_array(b, "hidden_traj"), record_array(a, "hidden_traj"), rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "two").rglob("*.shard-*"))


def test_token_batches_cap_rows_and_padded_tokens():
    from kvlib.selfeval.coe import token_batches

    sizes = [2, 3, 3, 5, 9, 20]
    groups = token_batches(list(range(6)), sizes, max_rows=3, max_tokens=12)
    assert [g for grp in groups for g in grp] == list(range(6))  # every item once, in order
    for grp in groups:
        assert len(grp) <= 3 and (len(grp) == 1 or len(grp) * max(sizes[i] for i in grp) <= 12)
    assert groups == [[0, 1, 2], [3], [4], [5]]  # 20 > 12 stands alone
    assert token_batches(list(range(6)), sizes, max_rows=4, max_tokens=None) == [[0, 1, 2, 3], [4, 5]]


def test_hidden_coe_pass_under_a_token_cap_equals_the_uncapped_pass(tmp_path, monkeypatch):
    """A token cap re-forwards the records in smaller, length-sorted groups (never more than the cap in one
    forward) with the same trajectories."""
    from kvlib.selfeval import coe

    model, tok, plain = _records("qwen2", tmp_path / "b", {})
    free = coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=8, root=tmp_path / "free",
                               progress=False, max_tokens=None)
    widths, forward = [], coe.hidden_trajectories

    def spy(model, prompts, outputs, **kw):
        widths.append(len(prompts) * max(len(p) + len(o) for p, o in zip(prompts, outputs)))
        return forward(model, prompts, outputs, **kw)

    monkeypatch.setattr(coe, "hidden_trajectories", spy)
    cap = max(len(tok(r["prompt"], add_special_tokens=False).input_ids) + len(r["token_ids"]) for r in plain) + 1
    got = coe.hidden_coe_pass(model, tok, "tiny", "toy", plain, batch_size=8, root=tmp_path / "cap",
                              progress=False, max_tokens=cap)
    assert len(widths) > 1 and max(widths) <= cap
    assert [r["item_id"] for r in got] == [r["item_id"] for r in plain]
    for a, b in zip(free, got):
        np.testing.assert_allclose(record_array(b, "hidden_traj"), record_array(a, "hidden_traj"), rtol=1e-4, atol=1e-5)
