"""Paired comparisons of two evaluations on the same test prompts, with tests that respect the design.

StaICC's test set asks every query twice (prompt ``j`` holds query ``j % n_queries`` with its own sampled
demonstrations), and a study trains every method at several seeds on the same prompts. Neither the two prompts
of a query nor the seeds of a method are independent samples, so the unit of a test is the **query**:

- :func:`paired` — one run against one other run: prompts gained (wrong -> right) and lost, and the exact
  McNemar p (a per-seed test; it treats prompts as independent, as the paper's own single-run comparisons do).
- :func:`query_sign_test` — several seeds: per query, the change in correct answers summed over its prompts
  and over the seeds, ``d_q = Σ_prompts Σ_seeds (right_B - right_A)``; the exact two-sided sign test over the
  queries whose ``d_q`` is not 0. A one-seed gain counts once, however often it is repeated.
- :func:`holm` — Holm's step-down adjustment over a family of p-values (the datasets of a table).

    from abft_lens.evaluation.paired import holm, paired

    paired([True, False, False], [True, True, False]).gained   # 1
    holm({"sst2": 0.01, "fp": 0.04})                           # {'sst2': 0.02, 'fp': 0.04}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from abft_lens.errors import AbftLensError
from abft_lens.evaluation.metrics import mcnemar_exact

__all__ = ["Paired", "paired", "SignTest", "query_sign_test", "sign_test", "holm", "correct"]


def correct(rows: Sequence[Mapping]) -> list[bool]:
    """Right or wrong per prompt, from an evaluation's ``per_prompt`` rows (``gold`` and ``prediction``)."""
    return [row["prediction"] == row["gold"] for row in rows]


@dataclass(frozen=True)
class Paired:
    """``gained``: prompts the second run answers right and the first wrong; ``lost``: the reverse."""

    gained: int
    lost: int

    @property
    def p_value(self) -> float:
        """Two-sided exact McNemar p (1.0 when no prompt changed)."""
        return mcnemar_exact(self.gained, self.lost)

    @property
    def direction(self) -> int:
        return (self.gained > self.lost) - (self.gained < self.lost)


def paired(before: Sequence[bool], after: Sequence[bool]) -> Paired:
    """Prompts gained and lost from ``before`` to ``after`` (right/wrong per prompt, the same prompts)."""
    if len(before) != len(after):
        raise AbftLensError(f"a paired comparison needs the same prompts; got {len(before)} and {len(after)}.",
                            "compare evaluations of the same test prompts (same dataset, k and n_test).")
    return Paired(sum(a and not b for b, a in zip(before, after)), sum(b and not a for b, a in zip(before, after)))


@dataclass(frozen=True)
class SignTest:
    """``better`` / ``worse``: queries whose summed change is positive / negative; ``p_value``: exact two-sided
    sign test over them; ``seeds``: how many seeds were summed."""

    better: int
    worse: int
    p_value: float
    seeds: int

    @property
    def direction(self) -> int:
        return (self.better > self.worse) - (self.better < self.worse)


def sign_test(better: int, worse: int) -> float:
    """Exact two-sided sign test: ``better`` successes of ``better + worse`` under Binomial(n, 1/2) (the same
    binomial as McNemar's exact test, which is a sign test on the discordant pairs)."""
    return mcnemar_exact(better, worse)


def query_sign_test(first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]],
                    n_queries: int) -> SignTest:
    """Is ``second`` right on more queries than ``first``? Each argument holds one right/wrong list per seed
    (a method without seeds, e.g. vanilla, passes one list: it is counted once per seed of the other side);
    prompt ``j`` belongs to query ``j % n_queries``. Seeds are matched by position when both sides have
    several (pass the shared seeds only)."""
    first, second = [list(r) for r in first], [list(r) for r in second]
    if not first or not second:
        raise AbftLensError("a sign test needs at least one evaluation on each side.", "pass one list per seed.")
    seeds = max(len(first), len(second))
    if len(first) not in (1, seeds) or len(second) not in (1, seeds):
        raise AbftLensError(f"{len(first)} and {len(second)} seeds cannot be matched.",
                            "pass the seeds both sides share, in the same order.")
    lengths = {len(r) for r in first + second}
    if len(lengths) != 1 or n_queries < 1:
        raise AbftLensError(f"the evaluations cover different prompts ({sorted(lengths)} prompts).",
                            "compare evaluations of the same test prompts.")
    change = [0] * min(n_queries, lengths.pop())
    for seed in range(seeds):
        a, b = first[min(seed, len(first) - 1)], second[min(seed, len(second) - 1)]
        for j, (right_a, right_b) in enumerate(zip(a, b)):
            change[j % n_queries] += int(right_b) - int(right_a)
    better, worse = sum(d > 0 for d in change), sum(d < 0 for d in change)
    return SignTest(better, worse, sign_test(better, worse), seeds)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (same keys): the i-th smallest of m is multiplied by m - i + 1, made monotone and
    capped at 1. A claim holds at level alpha when its adjusted p < alpha (family-wise error <= alpha)."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted, running = {}, 0.0
    for rank, (key, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[key] = running
    return {key: adjusted[key] for key in p_values}
