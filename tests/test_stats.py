"""Intervals of imm_ray/stats.py against exact references, and their coverage by simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from imm_ray.stats import (
    estimate, paired_difference, paired_scores, percentile_estimate, question_scores, t_quantile, wilson_interval,
)


def _series(values) -> pd.Series:
    values = np.asarray(values, dtype=float)
    return pd.Series(values, index=[f"q{i}" for i in range(len(values))])


def _simulated_scores(rng: np.random.Generator, p: np.ndarray, samples: int, k: int) -> pd.Series:
    correct = rng.binomial(samples, p)
    return _series(question_scores([samples] * len(p), correct, k))


# ---- exact references -----------------------------------------------------------------------------------------
def test_question_scores_are_the_unbiased_pass_at_k():
    assert question_scores([4, 4, 4], [0, 2, 4], 2) == pytest.approx([0.0, 1 - 1 / 6, 1.0])


def test_a_set_of_equal_questions_has_a_zero_width_interval():
    result = percentile_estimate({"s": _series([0.25] * 40)})
    assert result.low == result.high == result.value == pytest.approx(0.25)
    assert not paired_difference([{"s": _series([0.25] * 40)}], [{"s": _series([0.25] * 40)}]).resolved


def test_large_set_bootstrap_matches_the_normal_approximation():
    n, p = 2000, 0.3
    scores = np.zeros(n)
    scores[: int(p * n)] = 1.0
    result = percentile_estimate({"s": _series(scores)})
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert result.value == pytest.approx(p)
    assert result.low == pytest.approx(p - half, abs=0.002) and result.high == pytest.approx(p + half, abs=0.002)


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half 1.96·sqrt(0.016 + 1.96²/400) / (1 + 1.96²/10)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)


def test_t_quantiles_match_the_table():
    for df, value in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423), (math.inf, 1.9600)):
        assert t_quantile(df, 0.975) == pytest.approx(value, abs=2e-4)


def test_ood_mean_resamples_each_set_and_averages():
    rng = np.random.default_rng(1)
    a, b = (rng.random(300) < 0.4).astype(float), (rng.random(500) < 0.7).astype(float)
    result = percentile_estimate({"a": _series(a), "b": _series(b)})
    assert result.value == pytest.approx((a.mean() + b.mean()) / 2)
    half = 1.96 * math.sqrt(a.var() / len(a) + b.var() / len(b)) / 2
    assert result.high - result.low == pytest.approx(2 * half, rel=0.08)


def test_counting_distinct_scores_resamples_like_drawing_indices():
    """Few distinct scores go through a multinomial over them; jittered copies (all distinct) through indices."""
    rng = np.random.default_rng(4)
    scores = rng.choice([0.0, 0.5, 1.0], size=400)
    jittered = scores + rng.uniform(-1e-9, 1e-9, size=400)
    counted, drawn = percentile_estimate({"s": _series(scores)}), percentile_estimate({"s": _series(jittered)})
    assert counted.low == pytest.approx(drawn.low, abs=0.006) and counted.high == pytest.approx(drawn.high, abs=0.006)


def test_bootstrap_is_deterministic():
    sets = {"s": _series(np.random.default_rng(2).random(50))}
    assert percentile_estimate(sets) == percentile_estimate(sets)


# ---- paired comparisons ----------------------------------------------------------------------------------------
def _right_on(count: int, n: int = 100, offset: int = 0) -> pd.Series:
    scores = np.zeros(n)
    scores[offset: offset + count] = 1.0
    return _series(scores)


def test_identical_models_differ_by_zero_not_resolved():
    model = {"s": _right_on(40)}
    result = paired_difference([model], [model])
    assert result.value == 0 and result.low == result.high == 0 and not result.resolved


def test_right_on_30_more_of_100_is_resolved_positive():
    result = paired_difference([{"s": _right_on(60)}], [{"s": _right_on(30)}])
    assert result.value == pytest.approx(0.3) and result.low > 0.15 and result.resolved
    reverse = paired_difference([{"s": _right_on(30)}], [{"s": _right_on(60)}])
    assert reverse.high < 0 and reverse.resolved


def test_a_small_difference_is_not_resolved():
    a = _right_on(42)  # right on q0..q41
    b = _right_on(40, offset=1)  # right on q1..q40: A has 2 more, B none that A lacks... plus one swap below
    b["q50"] = 1.0
    result = paired_difference([{"s": a}], [{"s": b}])
    assert result.value == pytest.approx(0.01) and result.low < 0 < result.high and not result.resolved


def test_pairing_needs_the_same_questions():
    with pytest.raises(ValueError, match="only one model"):
        paired_scores({"s": _series([1, 0])}, {"s": pd.Series([1.0, 0.0], index=["q0", "x"])})


# ---- seeds -----------------------------------------------------------------------------------------------------
def test_pooled_estimate_is_the_seed_mean_and_wider_than_one_seed():
    seeds = [{"s": _right_on(40)}, {"s": _right_on(50)}, {"s": _right_on(45)}]
    pooled = estimate(seeds)
    assert pooled.value == pytest.approx(0.45) and pooled.seeds == 3
    single = estimate([{"s": _right_on(45)}])
    assert pooled.high - pooled.low > single.high - single.low
    identical = estimate([{"s": _right_on(45)}] * 3)  # no seed spread: the question-level interval alone
    assert identical.high - identical.low == pytest.approx(single.high - single.low, rel=0.1)


def test_seeds_with_their_own_questions_are_pooled_too():
    rng = np.random.default_rng(3)
    seeds = [{"s": pd.Series((rng.random(80) < 0.5).astype(float), index=[f"{s}-{i}" for i in range(80)])}
             for s in range(3)]
    pooled = estimate(seeds)
    assert pooled.low < pooled.value < pooled.high


# ---- coverage by simulation ------------------------------------------------------------------------------------
def test_single_seed_interval_covers_the_truth_about_95_percent():
    rng = np.random.default_rng(10)
    lo, hi, samples, k = 0.2, 0.9, 4, 2
    truth = 1 - ((1 - lo) ** 3 - (1 - hi) ** 3) / (3 * (hi - lo))  # E[1 - (1-p)^2], p ~ U(lo, hi)
    covered = 0
    for _ in range(200):
        scores = _simulated_scores(rng, rng.uniform(lo, hi, 100), samples, k)
        result = estimate([{"s": scores}], resamples=1000)
        covered += result.low <= truth <= result.high
    assert 0.90 <= covered / 200 <= 0.99


def _seed_runs(rng: np.random.Generator, seeds: int) -> list[dict[str, pd.Series]]:
    """Shared questions (difficulty b ~ U(0.3, 0.7)), a training-seed effect a ~ N(0, 0.05) on every question,
    4 samples per question: the truth, E[b + a], is 0.5."""
    difficulty = rng.uniform(0.3, 0.7, 100)
    return [{"s": _simulated_scores(rng, np.clip(difficulty + rng.normal(0, 0.05), 0, 1), 4, 1)}
            for _ in range(seeds)]


def test_pooled_interval_over_three_seeds_covers_the_truth_about_95_percent():
    rng = np.random.default_rng(11)
    covered = naive = 0
    for _ in range(200):
        runs = _seed_runs(rng, 3)
        result = estimate(runs, resamples=500)
        covered += result.low <= 0.5 <= result.high
        naive += _seed_bootstrap_covers(runs, 0.5)
    assert 0.90 <= covered / 200 <= 0.99
    assert naive / 200 < 0.85  # why the t interval: a bootstrap over 3 seeds is far too narrow


def _seed_bootstrap_covers(runs: list[dict[str, pd.Series]], truth: float) -> bool:
    """The rejected alternative: percentile interval of the seed mean over all 27 resamples of 3 seeds."""
    means = [float(r["s"].mean()) for r in runs]
    replicates = [np.mean(pick) for pick in itertools.product(means, repeat=len(means))]
    low, high = np.quantile(replicates, [0.025, 0.975])
    return bool(low <= truth <= high)
