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
    TOKEN_BUDGET = "token budget"  # the budget runs as one swept method (Pareto points)
    BUDGET_PREFIX = "budget "  # Table 3 rows of the budget runs: "budget N", see budget()

    # Table 3's row order; budget rows follow, by budget
    TABLE3_ORDER = (FAST, SLOW, KV_CLASSIFICATION, KV_GENERATIVE, RANDOM, ORACLE, DEER)

    @staticmethod
    def budget(tokens: int) -> str:
        """The Table 3 row of a thinking budget of ``tokens`` tokens: ``"budget 64"``."""
        return f"{Method.BUDGET_PREFIX}{int(tokens)}"

    @staticmethod
    def budget_tokens(method: str) -> int | None:
        """The budget of a :meth:`budget` row (``"budget 64"`` -> 64); ``None`` for any other method."""
        rest = method[len(Method.BUDGET_PREFIX):] if method.startswith(Method.BUDGET_PREFIX) else ""
        return int(rest) if rest.isdigit() else None
