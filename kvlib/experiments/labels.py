"""The names of the fast/slow switching methods: the ``method`` column of Tables 3 and 4 and of the Pareto points.

Each name is defined once, here, and every table, figure, cross-model table (notebook 06) and test refers to
:class:`Method` instead of repeating the string. The strings themselves are what the CSV files and the README
tables show, so changing one renames a row everywhere (and in the committed tables at the next run).
"""

from __future__ import annotations

__all__ = ["Method"]


class Method:
    """The method names (plain strings: they go into data frames and CSV files as they are)."""

    FAST = "fast"  # always the fast (no-thinking) answer
    SLOW = "slow"  # always the slow (thinking) answer
    KV_CLASSIFICATION = "KV-Classification"  # route each question by the difficulty read from its prompt's KV
    KV_GENERATIVE = "KV-Generative"  # switch mid-answer by the difficulty read from the live cache
    RANDOM = "random (same slow share)"  # random routing with KV-Classification's share of slow answers
    ORACLE = "oracle (fast if fast is right)"  # the fast answer whenever it is correct
    DEER = "DEER-style early exit"  # end the thinking when a trial answer is confident
    DEER_NO_TRIAL = "slow, answer forced at 90% (no DEER trial ran)"  # the DEER row of a run whose trials never fired
    TOKEN_BUDGET = "token budget"  # the budget runs as one swept method (Pareto points)
    BUDGET_PREFIX = "budget "  # Table 3 rows of the budget runs: "budget N", see budget()
    CURVE_PREFIX = "budget level "  # the equal-token curve's forced-answer budgets, see curve_level()
    BUDGET_CURVE = "forced-answer budget curve"  # the curve as one line in the Pareto figure

    # Table 3's row order; budget rows follow, by budget
    TABLE3_ORDER = (FAST, SLOW, KV_CLASSIFICATION, KV_GENERATIVE, RANDOM, ORACLE, DEER, DEER_NO_TRIAL)

    @staticmethod
    def deer(trial_tokens: float, think_ratio: float = 0.9) -> str:
        """The name of a DEER-style row for what ran: :attr:`DEER` when trial answers were decoded (``trial_tokens``
        > 0), else "slow, answer forced at <think_ratio> (no DEER trial ran)": no trial fired, so the row is the slow
        answer with its answer forced at the thinking cap, and calling it DEER would claim a method that never ran.
        """
        if trial_tokens > 0:
            return Method.DEER
        return f"slow, answer forced at {100 * think_ratio:.0f}% (no DEER trial ran)"

    @staticmethod
    def is_deer(method: str) -> bool:
        """Whether ``method`` is a DEER-style row, whether or not a trial ran (:meth:`deer`)."""
        return method == Method.DEER or (method.startswith("slow, answer forced at ")
                                         and method.endswith("(no DEER trial ran)"))

    @staticmethod
    def curve_level(k: int) -> str:
        """The Table 3 row of the ``k``-th (1 = smallest) budget of the equal-token curve: ``"budget level 1"``
        (each set has its own budgets, spread between its fast and slow mean tokens; the row's ``budget`` column
        holds it)."""
        return f"{Method.CURVE_PREFIX}{int(k)}"

    @staticmethod
    def curve_index(method: str) -> int | None:
        """The level of a :meth:`curve_level` row (``"budget level 2"`` -> 2); ``None`` for any other method."""
        rest = method[len(Method.CURVE_PREFIX):] if method.startswith(Method.CURVE_PREFIX) else ""
        return int(rest) if rest.isdigit() else None

    @staticmethod
    def budget(tokens: int) -> str:
        """The Table 3 row of a thinking budget of ``tokens`` tokens: ``"budget 64"``."""
        return f"{Method.BUDGET_PREFIX}{int(tokens)}"

    @staticmethod
    def budget_tokens(method: str) -> int | None:
        """The budget of a :meth:`budget` row (``"budget 64"`` -> 64); ``None`` for any other method."""
        rest = method[len(Method.BUDGET_PREFIX):] if method.startswith(Method.BUDGET_PREFIX) else ""
        return int(rest) if rest.isdigit() else None
