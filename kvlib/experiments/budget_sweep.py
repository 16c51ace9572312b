"""Notebook 05's experiment: how much KV the difficulty classifier reads (Table 4, appendix B).

For each ``(N tokens, L layers)`` point of the plan's grid a classifier is trained on the same data and split as
in notebook 04 (:func:`~kvlib.experiments.switching.switching_setup`, then
:func:`~kvlib.experiments.switching.fit_classifiers`);
:func:`budget_grid` runs KV-Classification (routing between the stored answers) and KV-Generative (live) at the
paper's thresholds with each, and :func:`table4_markdown` lays the result out as the paper's appendix table.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.phases import phase
from ..switching.kv_switch import SwitchConfig, adaptive_generate
from ..switching.difficulty import DifficultyClassifier, record_features
from .labels import Method
from .report import set_label
from .switching import AnswerPair, SwitchingPlan, SwitchingRun, live_row, method_row, route, stored_answers

__all__ = ["budget_grid", "caption", "table4_markdown"]


@phase("budget grid")
def budget_grid(model, tokenizer, model_name: str, test_items: Mapping[str, Sequence],
                pairs: Mapping[str, AnswerPair],
                classifiers: Mapping[tuple[int, int], DifficultyClassifier], plan: SwitchingPlan, root=None,
                live: bool = True, progress: bool = True) -> pd.DataFrame:
    """Table 4: KV-Classification and KV-Generative (the a-priori thresholds) for each ``(N, L)`` classifier.

    KV-Generative runs live on ``plan.grid_live_sets`` (every set when ``None``)."""
    rows = []
    for (n_tokens, n_layers), clf in classifiers.items():
        for name, items in test_items.items():
            cfg = SwitchConfig.generative(plan.tau, plan.tau_fast, plan.tau_slow, plan.check_every,
                                          fast_tokens=plan.caps(name)[0])
            fast, slow = pairs[name]
            slow_mean = float(np.mean([s["n_tokens"] for s in slow]))
            d0 = clf.predict(record_features(slow, clf.spec))
            grid = {"layers": n_layers, "tokens": n_tokens, "val_rmse": clf.info["val_rmse"]}
            correct, tokens = route(fast, slow, d0 > plan.tau)
            rows.append({**method_row(Method.KV_CLASSIFICATION, name, correct, tokens, slow_mean), **grid})
            if live and (plan.grid_live_sets is None or name in plan.grid_live_sets):
                recs = adaptive_generate(model, tokenizer, items, clf, cfg, model_name=model_name, dataset=name,
                                         settings=plan.generation(name), root=root, batch_size=plan.batch_size,
                                         progress=progress, references=stored_answers(fast, slow) if plan.replay
                                         else None)
                rows.append({**live_row(Method.KV_GENERATIVE, name, items, recs, slow_mean), **grid})
    return pd.DataFrame(rows)


def caption(run: SwitchingRun, classifiers: Mapping[tuple[int, int], DifficultyClassifier]) -> str:
    """Table 4's caption: the run as in Table 3 (:meth:`SwitchingRun.caption`) without the classifier's features
    (the table compares them), then the layout and the sets where KV-Generative ran live."""
    first = next(iter(classifiers.values()))
    grid_live = run.plan.grid_live_sets
    live_sets = run.test_items if grid_live is None else grid_live
    what = ("Rows: set and controller; columns: last L layers x last N tokens; cells: accuracy / mean generated "
            f"tokens. {Method.KV_GENERATIVE} runs live on: {', '.join(set_label(s) for s in live_sets) or 'no set'}.")
    return run.caption(first, what, features=False, live=False)


def table4_markdown(grid: pd.DataFrame, caption_line: str) -> str:
    """Appendix B layout: rows (set, method), columns ``L x N``; cells ``accuracy / tokens``."""
    grid = grid.assign(col=[f"{n_layers}L x {n_tokens}" for n_layers, n_tokens in zip(grid["layers"], grid["tokens"])],
                       cell=[f"{a:.3f} / {t:.0f}" for a, t in zip(grid["accuracy"], grid["mean_tokens"])])
    cols = list(dict.fromkeys(grid["col"]))
    wide = grid.pivot_table(index=["set", "method"], columns="col", values="cell", aggfunc="first")[cols]
    wide.index = [f"{set_label(s)} · {m}" for s, m in wide.index]
    rmse = grid.groupby("col")["val_rmse"].first()[cols]
    note = "Validation RMSE of each classifier (difficulty points): " + ", ".join(
        f"{c}: {v:.1f}" for c, v in rmse.items())
    return f"{caption_line}\n\n{wide.to_markdown()}\n\n{note}\n"
