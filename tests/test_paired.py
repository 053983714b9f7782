"""The paired tests of :mod:`abft_lens.evaluation.paired`, against hand counts and textbook values."""

from __future__ import annotations

import math

import pytest

from abft_lens.errors import AbftLensError
from abft_lens.evaluation.paired import holm, paired, query_sign_test, sign_test


def test_paired_counts_gained_and_lost():
    result = paired([True, False, False, True], [True, True, False, False])
    assert (result.gained, result.lost, result.direction) == (1, 1, 0) and result.p_value == 1.0
    with pytest.raises(AbftLensError, match="same prompts"):
        paired([True], [True, False])


def test_sign_test_matches_the_binomial():
    assert sign_test(0, 0) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 2 ** 10)  # P(X <= 1) = (1 + 10) / 1024, two-sided
    assert sign_test(5, 5) == 1.0


def test_query_sign_test_sums_prompts_of_a_query_and_seeds():
    # 2 queries, prompts j and j + 2 share a query; vanilla (one list) against a method with 2 seeds
    vanilla = [[False, False, False, True]]
    method = [[True, False, False, True],   # seed 0: query 0 gains on prompt 0
              [False, False, False, False]]  # seed 1: query 1 loses on prompt 3
    result = query_sign_test(vanilla, method, n_queries=2)
    assert (result.better, result.worse, result.seeds) == (1, 1, 2)
    # the same gain repeated on both prompts of a query and both seeds is still one query
    repeated = [[True, False, True, True], [True, False, True, True]]
    result = query_sign_test(vanilla, repeated, n_queries=2)
    assert (result.better, result.worse) == (1, 0) and result.p_value == 1.0
    with pytest.raises(AbftLensError, match="cannot be matched"):
        query_sign_test([[True]] * 2, [[True]] * 3, n_queries=1)


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"x": 0.5}) == {"x": 0.5}
    assert all(0 <= p <= 1 for p in holm({str(i): 0.9 for i in range(5)}).values())
    assert math.isclose(holm({"a": 0.2, "b": 0.2})["a"], 0.4)
