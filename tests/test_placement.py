"""Where models run: profiles carry device and dtype, CUDA asked for without CUDA is a clear error, and every
experiment path (answers with their KV extractors, hidden-state CoE, scores, KV embeddings, live switching,
early exit, budgets) runs on a half-precision model, on the CPU here and on CUDA where there is one
(tests marked ``gpu``)."""

import numpy as np
import pytest
import torch

from kvlib import tiny_model
from kvlib.switching.answers import answer_records
from kvlib.selfeval.coe import hidden_coe_pass
from kvlib.assets.data import MathItem
from kvlib.switching.early_exit import EarlyExitConfig
from kvlib.embedding.embedders import KVEmbedder, PrefillRunner, PrefillConfig
from kvlib.experiments.budget_sweep import budget_grid
from kvlib.experiments.labels import Method
from kvlib.experiments.switching import SwitchingPlan, best_spec, evaluate_methods, fit_classifiers, label_frame
from kvlib.core.models import load_model
from kvlib import profiles
from kvlib.profiles import PROFILES, Profile, cpu_has_bf16, get_profile, resolve_device, resolve_dtype
from kvlib.selfeval.scores import score_records

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_placement_on_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, tmp_path):
    _no_cuda(monkeypatch)
    for flags, dtype in (("fpu sse avx2 avx512f", torch.float32), ("fpu avx512f avx512_bf16", torch.bfloat16),
                         ("fpu amx_tile amx_bf16", torch.bfloat16)):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(profiles, "cpu_has_bf16", lambda f=tmp_path / "cpuinfo": cpu_has_bf16(f))
        assert get_profile("small").placement() == {"device": "cpu", "dtype": dtype}
    assert cpu_has_bf16(tmp_path / "missing") is False  # no /proc/cpuinfo (macOS, Windows): fp32


def test_auto_placement_is_cuda_bf16_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile("small").placement() == {"device": "cuda", "dtype": torch.bfloat16}
    assert resolve_dtype("float16", "cuda") == torch.float16


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(RuntimeError, match="sees no CUDA device.*'auto' or 'cpu'"):
        get_profile("gpu").placement()
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        load_model("smollm2-135m", device="cuda")  # refused before any file is read


def test_profile_validates_device_and_dtype():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Profile(name="x", model="m", fast_tokens=1, slow_tokens=2, batch_size=1, device="gpu")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        Profile(name="x", model="m", fast_tokens=1, slow_tokens=2, batch_size=1, dtype="half")


def test_output_dirs(tmp_path):
    small, gpu = PROFILES["small"], PROFILES["gpu"].with_model("qwen2.5-1.5b")
    assert small.output_dirs(tmp_path) == (tmp_path / "tables", tmp_path / "figures")
    assert gpu.output_dirs(tmp_path) == (tmp_path / "tables/gpu/qwen2.5-1.5b", tmp_path / "figures/gpu/qwen2.5-1.5b")
    assert gpu.with_model("/models/Qwen3-8B/").output_dirs(tmp_path)[0] == tmp_path / "tables/gpu/Qwen3-8B"
    assert gpu.output_dirs(tmp_path, smoke=True)[0] == tmp_path / "build/smoke/tables"
    assert (tmp_path / "figures/gpu/qwen2.5-1.5b").is_dir()
    assert gpu.results_root(tmp_path) == (tmp_path / "tables/gpu", tmp_path / "figures/gpu")
    assert small.results_root(tmp_path) == small.output_dirs(tmp_path)


def test_gpu_profile_sizes_fit_the_sets():
    from kvlib.assets.data import load_math

    gpu = PROFILES["gpu"]
    assert set(gpu.coe_sets.values()) == {"all"}  # every test item
    for name, n in gpu.switch_train_sets.items():
        assert n <= len(load_math(name, "train")), name
    plan = SwitchingPlan.from_profile(gpu)  # live methods: the first 500 items of each set (SVAMP has 493)
    assert plan.test_sets == {"gsm8k": 500, "svamp": 493, "math500": 500} and plan.live_sets == ("gsm8k", "svamp")
    assert SwitchingPlan.from_profile(gpu, max_items=None).test_sets["gsm8k"] == "all"
    with pytest.raises(ValueError, match="set sizes must be positive ints, or None / 'all'"):
        Profile(name="x", model="m", fast_tokens=1, slow_tokens=2, batch_size=1, coe_sets={"gsm8k": 0})


def _items(prefix, n, seed):
    rng = np.random.default_rng(seed)
    return [MathItem(f"{prefix}/{k}", f"Tom has {a} apples and gets {b} more. How many apples?", str(a + b), "svamp")
            for k, (a, b) in enumerate(rng.integers(1, 50, size=(n, 2)))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_experiment_path_runs_in_bf16(device, tmp_path):
    model, tok = tiny_model("qwen2", seed=4)
    model = model.to(device=device, dtype=torch.bfloat16)
    items = _items("svamp/test", 6, 1)
    slow = answer_records(model, tok, "m", "svamp", items, mode="slow", max_new_tokens=12, root=tmp_path,
                          batch_size=4, progress=False)
    assert all(r["n_tokens"] > 0 for r in slow)
    slow = [{**r, "correct": k % 2 == 0} for k, r in enumerate(slow)]  # both classes, whatever the random model says
    slow = hidden_coe_pass(model, tok, "m", "svamp", slow, batch_size=3, root=tmp_path)
    scores = score_records(slow, seed=0)
    assert len(scores) == len(items) and np.isfinite(scores["MaxProb"]).all()
    assert np.isfinite(scores["KV-CoE-C (V)"]).all() and np.isfinite(scores["CoE-C"]).all()

    emb = KVEmbedder(PrefillRunner(model, tok, PrefillConfig(batch_size=4, max_tokens=32))).embed(
        ["a b c", "d e f g h"]
    )
    assert emb.dtype == np.float32 and emb.shape[0] == 2 and np.isfinite(emb).all()

    plan = SwitchingPlan(train_sets={"svamp": 16}, test_sets={"svamp": 4}, fast_tokens=4, slow_tokens=12,
                         batch_size=8, grid=((32, 2),), budgets=(3,), check_every=4,
                         generative_sweep=((50.0, 30.0, 70.0),), random_seeds=5,
                         early_exit=EarlyExitConfig(min_gap=4, trial_tokens=2))
    pairs = {}
    for name, its in {"train": _items("svamp/train", 16, 0), "test": _items("svamp/test", 4, 2)}.items():
        fast, slw = (answer_records(model, tok, "m", f"svamp-{name}", its, mode=m, max_new_tokens=b, root=tmp_path,
                                    batch_size=8, progress=False) for m, b in (("fast", 4), ("slow", 12)))
        pairs[name] = ([{**r, "correct": k % 2 == 0} for k, r in enumerate(fast)],
                       [{**r, "correct": k % 3 != 0} for k, r in enumerate(slw)])
    frame, recs = label_frame({"svamp": pairs["train"]})
    clfs = fit_classifiers(frame, recs, plan, exclude_questions=[])
    clf = clfs[best_spec(clfs)]
    test = {"svamp": _items("svamp/test", 4, 2)}
    table, _ = evaluate_methods(model, tok, "m", test, {"svamp": pairs["test"]}, clf, plan, root=tmp_path,
                                progress=False)
    assert {Method.KV_GENERATIVE, Method.budget(3)} <= set(table["method"])
    assert table["method"].map(Method.is_deer).any()  # named for what ran (Method.deer)
    grid = budget_grid(model, tok, "m", test, {"svamp": pairs["test"]}, clfs, plan, root=tmp_path, progress=False)
    assert Method.KV_GENERATIVE in set(grid["method"])
    offline = evaluate_methods(model, tok, "m", test, {"svamp": pairs["test"]}, clf, plan.with_sizes(live_sets=()),
                               root=tmp_path, progress=False)[0]
    assert Method.KV_GENERATIVE not in set(offline["method"]) and Method.KV_CLASSIFICATION in set(offline["method"])
