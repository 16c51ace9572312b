"""Profiles: which model, data sets and sizes each experiment uses.

* ``small`` (default, ~45 minutes on 2 CPU cores from empty stores): the embedded
  Qwen2.5-Coder-0.5B-Instruct. It keeps the paper's sets as rows but is mostly wrong on them (GSM8K
  ~15 %, MATH-500 ~5 % with reasoning), so it adds the easier word-problem sets (SVAMP, ASDiv, MAWPS)
  where it is right often enough for AUROC and for a difficulty classifier to mean something.
* ``full``: the paper's setting, for a GPU and a model hub (``MODEL=Qwen/Qwen3-8B``).
* ``smoke``: a few items on the smallest model, for the test suite.

Every table records the profile, model, sets and sizes that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["Profile", "get_profile", "PROFILES"]


@dataclass(frozen=True)
class Profile:
    """Sizes and settings of one reproduction run.

    Attributes:
        name: profile name.
        model: default model (a kvlib embedded name, a local directory or a hub id).
        fast_tokens / slow_tokens: generation budgets of fast and slow answers.
        batch_size: generation batch size.
        coe_sets: data set -> number of test items for the self-evaluation table (03).
        switch_test_sets: data set -> number of test items for the switching tables (04, 05).
        switch_train_sets: data set -> number of training items (fast + slow answers each) for the
            difficulty classifier.
        probe_train / probe_test: caps on texts per set for the embedding probe (02).
        probe_models: models compared in the probe's model-size column.
        taus: thresholds swept for the Pareto figure.
        live_items: cap on evaluation items per set for the live switching methods (``None``: no cap).
        generative_sweep: ``(tau, tau_fast, tau_slow)`` points of the live KV-Generative sweep.
        budgets: fixed token budgets of the budget baseline (live).
        grid_live_sets: sets on which Table 4 runs KV-Generative live for every (N, L) classifier
            (``None``: all evaluation sets); KV-Classification rows cost nothing and cover every set.
    """

    name: str
    model: str
    fast_tokens: int
    slow_tokens: int
    batch_size: int
    coe_sets: dict[str, int] = field(default_factory=dict)
    switch_test_sets: dict[str, int] = field(default_factory=dict)
    switch_train_sets: dict[str, int] = field(default_factory=dict)
    probe_train: int = 1000
    probe_test: int = 500
    probe_models: tuple[str, ...] = ()
    taus: tuple[float, ...] = (40.0, 50.0, 60.0)
    live_items: int | None = None
    generative_sweep: tuple[tuple[float, float, float], ...] = ((50.0, 20.0, 70.0), (50.0, 30.0, 70.0),
                                                                (50.0, 45.0, 70.0))
    budgets: tuple[int, ...] = (64, 128)
    grid_live_sets: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.fast_tokens < 1 or self.slow_tokens < self.fast_tokens:
            raise ValueError("need 1 <= fast_tokens <= slow_tokens")
        for sets in (self.coe_sets, self.switch_test_sets, self.switch_train_sets):
            if any(n < 1 for n in sets.values()):
                raise ValueError("set sizes must be positive")

    def with_model(self, model: str | None) -> "Profile":
        """This profile with another model (``None`` or empty keeps the default)."""
        return replace(self, model=model) if model else self


PROFILES: dict[str, Profile] = {
    "small": Profile(
        name="small",
        model="qwen2.5-0.5b",
        fast_tokens=64,
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
        budgets=(128,),
        # MATH-500 answers are all wrong at this size (slow and fast): its live grid runs would cost ~5 minutes
        # and could only show 0.000
        grid_live_sets=("svamp", "gsm8k"),
    ),
    "full": Profile(
        name="full",
        model="Qwen/Qwen3-8B",
        fast_tokens=2048,
        slow_tokens=8192,
        batch_size=16,
        coe_sets={"math": 1000, "theoremqa": 800},
        switch_test_sets={"gsm8k": 1319, "math500": 500},
        switch_train_sets={"gsm8k": 7473, "math": 7500},
        probe_train=100_000,
        probe_test=2048,
        probe_models=(),
        taus=(20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0),
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
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]
