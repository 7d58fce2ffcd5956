"""pass@k against brute-force enumeration, its stability at M = 1000, maj@k and the set-level means."""

from __future__ import annotations

import itertools
import math

import pytest

from imm_ray.metrics import QuestionCounts, count_by_question, maj_at_k, mean_pass_at_k, pass_at_k


def _brute_force(num_samples: int, num_correct: int, k: int) -> float:
    """The share of all k-subsets of the samples that hold at least one correct sample."""
    samples = [True] * num_correct + [False] * (num_samples - num_correct)
    subsets = list(itertools.combinations(range(num_samples), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("num_samples", range(1, 9))
def test_pass_at_k_matches_enumeration(num_samples):
    for num_correct in range(num_samples + 1):
        for k in range(1, num_samples + 1):
            assert pass_at_k(num_samples, num_correct, k) == pytest.approx(_brute_force(num_samples, num_correct, k))


def test_pass_at_1_is_the_share_correct():
    assert pass_at_k(6, 2, 1) == pytest.approx(2 / 6)


def test_stable_for_a_thousand_samples():
    # The closed form with exact big integers is the reference; the product form must agree without them.
    for num_correct, k in ((1, 1), (1, 500), (3, 100), (500, 500), (999, 1), (0, 1000), (7, 1000)):
        exact = 1 - math.comb(1000 - num_correct, k) / math.comb(1000, k)
        assert pass_at_k(1000, num_correct, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert 0.0 <= pass_at_k(1000, 1, 3) <= 1.0


def test_pass_at_k_rejects_impossible_inputs():
    for args in ((0, 0, 1), (3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_mean_pass_at_k_over_questions():
    rows = count_by_question([("q1", True), ("q1", False), ("q2", False), ("q2", False), ("q1", False)])
    assert rows == {"q1": QuestionCounts(3, 1), "q2": QuestionCounts(2, 0)}
    assert mean_pass_at_k(rows, 1) == pytest.approx((1 / 3 + 0) / 2)
    assert mean_pass_at_k(rows.values(), 2) == pytest.approx((pass_at_k(3, 1, 2) + 0) / 2)
    with pytest.raises(ValueError, match="at least one"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="k must be"):
        mean_pass_at_k(rows, 3)  # q2 has only two samples


def test_maj_at_k():
    answers = ["5", "7", "7", None, "5", "5"]
    grades = [True, False, False, False, True, True]
    assert maj_at_k(answers, grades, k=3) == 0.0  # "7" wins 2-1
    assert maj_at_k(answers, grades) == 1.0  # "5" wins 3-2 over all six
    assert maj_at_k(["7", "5"], [False, True]) == 0.0  # a tie goes to the answer seen first
    assert maj_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["5"], [True, False])
    with pytest.raises(ValueError):
        maj_at_k(["5"], [True], k=2)
