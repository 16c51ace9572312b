"""Profiles: which model, data sets and sizes each experiment uses.

* ``small`` (default; 23 minutes cold on 2 CPU cores that compute bf16 natively, see the README): the embedded
  Qwen2.5-Coder-0.5B-Instruct. It keeps the paper's sets as rows but is mostly wrong on them (GSM8K
  ~15 %, MATH-500 ~5 % with reasoning), so it adds the easier word-problem sets (SVAMP, ASDiv, MAWPS)
  where it is right often enough for AUROC and for a difficulty classifier to mean something.
* ``gpu``: the embedded models on one GPU with every set at (or near) its full test split: thousands of
  answers per model, sized for intervals narrow enough to answer the paper's questions. Results go to
  ``tables/gpu/<model>/`` and ``figures/gpu/<model>/`` (run it once per model for the model-size axis).
* ``full``: the paper's setting, for a GPU and a model hub (``MODEL=Qwen/Qwen3-8B``).
* ``dryrun``: a few items per notebook at Qwen3-8B's shape with random weights (``random:qwen3-8b``), to check
  memory, speed and every code path on a GPU before a real run.
* ``smoke``: a few items on the smallest model, for the test suite.

Every profile carries where it runs (``device``, ``dtype``): ``"auto"`` takes the GPU in bf16 when CUDA is
present and the CPU otherwise, in bf16 where the CPU computes it natively (:func:`cpu_has_bf16`), else in fp32;
asking for CUDA where there is none is an error that says so.
Every table records the profile, model, sets and sizes that produced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["Profile", "get_profile", "PROFILES", "COMMITTED", "is_checkout", "resolve_device", "resolve_dtype",
           "hardware_label", "cpu_has_bf16", "check_set_tokens"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_set_tokens(set_tokens, where: str = "") -> None:
    """Raise ``ValueError`` unless ``set_tokens`` maps every set to a positive int token budget (``where`` starts
    the message, e.g. ``"profile 'gpu': "``)."""
    bad = {k: n for k, n in set_tokens.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"{where}set_tokens must map sets to positive token budgets: {bad}")


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is visible, else ``"cpu"``.

    ``"cuda[:i]"`` without CUDA is an error.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for, but this torch ({torch.__version__}) sees no CUDA device. "
            "Use device 'auto' or 'cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU."
        )
    return device


def hardware_label(device: str = "cpu", dtype=None) -> str:
    """What a result was computed on, for captions: ``"NVIDIA H200, bf16"`` or ``"CPU (2 threads), fp32"``."""
    import torch

    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32") if dtype else ""
    if str(device).startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else str(device)
    else:
        where = f"CPU ({torch.get_num_threads()} threads)"
    return f"{where}, {name}" if name else where


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag; Linux only).

    There bf16 decoding is much faster than fp32 (the 0.5B model, batch 16, 2 cores of an AMD EPYC with
    AVX512-BF16: 31 vs 10-12 tokens/s, measured in one run); elsewhere bf16 is emulated and slow.
    """
    try:
        flags = set(Path(cpuinfo).read_text(errors="ignore").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for a dtype name: ``"auto"`` is bf16 on CUDA and on a CPU with native bf16
    (:func:`cpu_has_bf16`), fp32 on any other CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") or cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


@dataclass(frozen=True)
class Profile:
    """Sizes and settings of one reproduction run.

    Attributes:
        name: profile name.
        model: default model (a kvlib embedded name, a local directory or a hub id).
        fast_tokens / slow_tokens: generation budgets of fast and slow answers. For the switching tables (04, 05)
            ``fast_tokens`` is the generous cap of the training split's fast answers: the evaluation fast answers'
            cap is picked from them (:func:`kvlib.switching.difficulty.fast_cap`: their 98th percentile rounded up to
            32,
            at least the labels' 128 tokens, at most ``fast_tokens``), so that fewer than 5% reach it.
        set_tokens: data set -> its own switching budget (fast and slow answers, and the live methods' budget, of
            that set in notebooks 04 and 05), for a set whose answers need more than ``slow_tokens`` at this model
            size; its fast answers keep this budget (no fast cap is picked for it) and its training answers, if
            any, do not enter the pick of the other sets' fast cap.
        batch_size: generation batch size.
        coe_sets: data set -> number of test items for the self-evaluation table (03); ``"all"`` (or
            ``None``) takes the whole test split (the same for the other set sizes).
        switch_test_sets: data set -> number of test items for the switching tables (04, 05).
        switch_train_sets: data set -> number of training items (fast + slow answers each) for the
            difficulty classifier.
        probe_train / probe_test: caps on texts per set for the embedding probe (02).
        probe_models: models compared in the probe's model-size column.
        taus: thresholds swept for the Pareto figure.
        live_items: cap on evaluation items per set for the live switching methods (``None``: no cap).
        generative_sweep: ``(tau, tau_fast, tau_slow)`` points of the live KV-Generative sweep.
        budgets: fixed token budgets of the budget baseline (live), besides the forced-answer budget curve that
            Table 3 always runs (5 budgets per set from its fast to its slow mean tokens).
        grid_live_sets: sets on which Table 4 runs KV-Generative live for every (N, L) classifier
            (``None``: all evaluation sets); KV-Classification rows cost nothing and cover every set.
        live_sets: sets on which Table 3 runs the live methods (KV-Generative, DEER-style early exit, token
            budgets); ``None``: every evaluation set. Offline rows (fast, slow, KV-Classification, random,
            oracle) cover every set.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (bf16 on CUDA and on a CPU with native bf16, else fp32) or a torch dtype name.
        results_dir: where tables and figures go, relative to the repository root: ``""`` writes
            ``tables/`` and ``figures/``; ``"gpu"`` writes ``tables/gpu/<model>/`` and ``figures/gpu/<model>/``.
        scratch: a check, not a result: never :attr:`committed`, whatever the model; its tables, figures and
            notebook timings go under ``build/<name>/``.
    """

    name: str
    model: str
    fast_tokens: int
    slow_tokens: int
    batch_size: int
    set_tokens: dict[str, int] = field(default_factory=dict)
    coe_sets: dict[str, int | str | None] = field(default_factory=dict)
    switch_test_sets: dict[str, int | str | None] = field(default_factory=dict)
    switch_train_sets: dict[str, int | str | None] = field(default_factory=dict)
    probe_train: int = 1000
    probe_test: int = 500
    probe_models: tuple[str, ...] = ()
    taus: tuple[float, ...] = (40.0, 50.0, 60.0)
    live_items: int | None = None
    generative_sweep: tuple[tuple[float, float, float], ...] = ((50.0, 20.0, 70.0), (50.0, 30.0, 70.0),
                                                                (50.0, 45.0, 70.0))
    budgets: tuple[int, ...] = (64, 128)
    grid_live_sets: tuple[str, ...] | None = None
    live_sets: tuple[str, ...] | None = None
    device: str = "auto"
    dtype: str = "auto"
    results_dir: str = ""
    scratch: bool = False

    def __post_init__(self):
        if self.fast_tokens < 1 or self.slow_tokens < self.fast_tokens:
            raise ValueError("need 1 <= fast_tokens <= slow_tokens")
        check_set_tokens(self.set_tokens, f"profile {self.name!r}: ")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"profile {self.name!r}: batch_size must be a positive integer, not {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {DTYPES}")
        if not (self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ValueError(f"unknown device {self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for sets in (self.coe_sets, self.switch_test_sets, self.switch_train_sets):
            bad = {k: n for k, n in sets.items() if not (n in (None, "all") or (isinstance(n, int) and n >= 1))}
            if bad:
                raise ValueError(f"set sizes must be positive ints, or None / 'all' for the whole set: {bad}")

    def with_model(self, model: str | None) -> "Profile":
        """This profile with another model (``None`` or empty keeps the default)."""
        return replace(self, model=model) if model else self

    def placement(self) -> dict:
        """``{"device": ..., "dtype": ...}`` resolved for this machine: the keyword arguments of
        :func:`kvlib.core.models.load_model` (raises when the profile asks for CUDA and there is none)."""
        device = resolve_device(self.device)
        return {"device": device, "dtype": resolve_dtype(self.dtype, device)}

    def hardware(self) -> str:
        """:func:`hardware_label` of this profile's placement on this machine."""
        return hardware_label(**self.placement())

    @property
    def committed(self) -> bool:
        """Whether this profile with this model produced the committed results (:data:`COMMITTED`): only such a
        run may write into a source checkout's ``tables/`` and ``figures/``; any other is a scratch run."""
        return not self.scratch and self.model in COMMITTED.get(self.name, ())

    def run_dir(self, root: str | Path = "..") -> Path:
        """The folder of a scratch run of this profile and model under ``root``: ``build/<profile>/`` for a
        profile with ``results_dir`` (its folders already split by model), else ``build/<profile>/<model>/``."""
        base = Path(root) / "build" / self.name
        return base if self.results_dir else base / _model_slug(self.model)

    def results_root(self, root: str | Path = "..", smoke: bool = False) -> tuple[Path, Path]:
        """``(tables, figures)`` folders that hold every model's results of this profile (created): the
        parents of :meth:`output_dirs` for a profile with ``results_dir``, else the same folders."""
        tables, figures = self.output_dirs(root, smoke)
        if self.results_dir and not smoke:
            return tables.parent, figures.parent
        return tables, figures

    def output_dirs(self, root: str | Path = "..", smoke: bool = False) -> tuple[Path, Path]:
        """``(tables, figures)`` folders of this profile under ``root`` (created).

        ``root`` is a source checkout (a folder with ``pyproject.toml`` and ``notebooks/``, as a notebook's
        ``ROOT = ".."``) or a run folder (the runner's ``OUT_DIR``). In a source checkout only a
        :attr:`committed` profile and model writes ``tables/`` and ``figures/``; any other writes under
        :meth:`run_dir` (``build/...``), and ``smoke`` runs under ``build/smoke/``, so a scratch run never touches
        committed results. In a run folder everything goes to its ``tables/`` and ``figures/``."""
        root = Path(root)
        if smoke:
            base = root / "build" / "smoke"
        elif is_checkout(root) and not self.committed:
            base = self.run_dir(root)
        else:
            base = root
        tables, figures = base / "tables", base / "figures"
        if self.results_dir and not smoke:
            sub = Path(self.results_dir) / _model_slug(self.model)
            tables, figures = tables / sub, figures / sub
        tables.mkdir(parents=True, exist_ok=True)
        figures.mkdir(parents=True, exist_ok=True)
        return tables, figures


def _model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name).strip("._") or "model"


def is_checkout(root: str | Path) -> bool:
    """Whether ``root`` is a source checkout of kvlib (``pyproject.toml`` and ``notebooks/``), whose ``tables/``,
    ``figures/``, ``notebooks/`` and README hold the committed results."""
    root = Path(root)
    return (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir()


# The (profile, model) pairs whose results are committed (tables/, figures/, the notebooks' outputs, the README):
# only these are published (``make reproduce``, ``kvlib reproduce --publish``); every other run is a scratch run.
COMMITTED: dict[str, tuple[str, ...]] = {
    "small": ("qwen2.5-0.5b",),
    "gpu": ("qwen2.5-0.5b", "qwen2.5-1.5b"),
}


PROFILES: dict[str, Profile] = {
    "small": Profile(
        name="small",
        model="qwen2.5-0.5b",
        # the training fast answers' generous cap; Table 3 picks the fast cap from them (>= 128, the labels' split)
        fast_tokens=256,
        slow_tokens=384,
        batch_size=16,
        coe_sets={"svamp": 48, "gsm8k": 32, "math500": 16, "theoremqa": 16},
        switch_test_sets={"svamp": 48, "gsm8k": 32, "math500": 16},
        switch_train_sets={"svamp": 24, "asdiv": 24, "mawps": 24},
        probe_train=160,
        probe_test=100,
        # add "qwen2.5-1.5b" for the model-size column: ~15 more minutes of prefill on 2 cores
        probe_models=("qwen2.5-0.5b",),
        live_items=12,
        generative_sweep=((50.0, 30.0, 70.0), (50.0, 45.0, 70.0)),
        budgets=(),  # the budget curve's 5 levels per set replace the fixed budget
        # MATH-500 answers are all wrong at this size (slow and fast): its live grid runs would cost ~5 minutes
        # and could only show 0.000
        grid_live_sets=("svamp", "gsm8k"),
    ),
    "gpu": Profile(
        name="gpu",
        model="qwen2.5-0.5b",
        # the training fast answers' generous cap (at 64 the 1.5B model's fast answers were cut: 58.6 of 64 tokens
        # on GSM8K); Table 3 picks the fast cap from them (>= 128, the labels' split; <= this)
        fast_tokens=384,
        slow_tokens=384,
        # at 256 rows a decode step of these models left one H200 12-60 % busy (host-bound): more rows per
        # batch, fewer steps
        batch_size=512,
        # MATH-500 answers need more room at these sizes: with 384 tokens, 55% of the 0.5B model's slow answers and
        # 49% of its fast ones (cap 256) were cut (H100 run, 2026-12-07; it ignores the fast instruction there)
        set_tokens={"math500": 1024},
        # every test item of the sets whose answers can be right at these sizes, and the paper's TheoremQA
        # whenever DATA_DIR holds it (left out, and the caption says so, without it); full MATH is not run
        coe_sets={"gsm8k": "all", "svamp": "all", "math500": "all", "theoremqa": "all"},
        switch_test_sets={"gsm8k": "all", "svamp": "all", "math500": "all"},
        switch_train_sets={"gsm8k": 800, "svamp": 250, "asdiv": 400, "mawps": 400},
        probe_train=5000,
        probe_test=10_000,
        probe_models=(),
        taus=(20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0),
        live_items=500,
        generative_sweep=((50.0, 30.0, 70.0),),
        budgets=(),  # the budget curve's 5 levels per set replace the fixed budget
        live_sets=("gsm8k", "svamp"),
        grid_live_sets=(),
        device="cuda",
        results_dir="gpu",
    ),
    "full": Profile(
        name="full",
        model="Qwen/Qwen3-8B",
        fast_tokens=2048,
        slow_tokens=8192,
        batch_size=16,
        coe_sets={"math": 1000, "theoremqa": "all"},
        switch_test_sets={"gsm8k": 1319, "math500": 500},
        switch_train_sets={"gsm8k": "all", "math": "all"},
        probe_train=100_000,
        probe_test=2048,
        probe_models=(),
        taus=(20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0),
    ),
    # every notebook at the paper's model size, on random weights: memory, speed and code paths before a real
    # run (``--model random:tiny`` runs the same on a CPU in minutes)
    "dryrun": Profile(
        name="dryrun",
        model="random:qwen3-8b",
        fast_tokens=32,
        slow_tokens=96,
        batch_size=16,
        coe_sets={"gsm8k": 16, "math500": 16},
        switch_test_sets={"gsm8k": 16, "svamp": 16},
        switch_train_sets={"gsm8k": 24, "svamp": 24},
        probe_train=48,
        probe_test=48,
        taus=(50.0,),
        live_items=8,
        generative_sweep=((50.0, 30.0, 70.0),),
        budgets=(),  # the budget curve's 5 levels per set run instead (random weights: every answer hits its cap)
        results_dir="dryrun",
        scratch=True,
    ),
    "smoke": Profile(
        name="smoke",
        model="smollm2-135m",
        fast_tokens=8,
        slow_tokens=24,
        batch_size=4,
        coe_sets={"gsm8k": 6, "theoremqa": 4},
        switch_test_sets={"svamp": 6},
        switch_train_sets={"svamp": 8, "mawps": 8},
        probe_train=40,
        probe_test=40,
        probe_models=("smollm2-135m",),
        taus=(50.0,),
        live_items=4,
        generative_sweep=((50.0, 30.0, 70.0),),
        budgets=(16,),
    ),
}


def get_profile(name: str, smoke: bool = False) -> Profile:
    """The named profile (``smoke=True`` returns the smoke profile whatever the name)."""
    if smoke:
        return PROFILES["smoke"]
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(sorted(PROFILES))} "
                         "(kvlib/profiles.py describes each)")
    return PROFILES[name]
