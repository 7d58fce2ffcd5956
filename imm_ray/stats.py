"""95% intervals for pass@k: one set, the mean over sets (OOD mean), a paired difference, and pooled seeds.

A set's pass@k is an estimate: the mean over n questions of each question's unbiased pass@k from M samples
(imm_ray/metrics.py). Everything here works on those per-question scores, as pandas Series indexed by question
id, one Series per set, so one engine serves every statistic the report shows: a model's set (one Series), the
OOD mean (several sets, averaged), and a paired difference of two models (the per-question difference A − B on
the same questions).

Methods, and why:

- One run (one seed): a **percentile bootstrap over questions** with a fixed seed (numpy ``default_rng``,
  ``RESAMPLES`` resamples, vectorised). Questions are the unit the estimate generalises over; resampling them
  keeps each question's M samples together, so it is right for any M and any k (a question's pass@k is a
  non-linear function of its c correct out of M). The Wilson score interval (:func:`wilson_interval`) is
  near-exact only for pass@1 with one sample per question (a binomial count) and is kept for that case and as
  a reference. Several sets (the OOD mean) are resampled jointly: each set's questions are resampled on their
  own (the sets hold different questions) and the resampled set means are averaged. A paired difference
  resamples questions once for both models, so the question difficulty shared by both cancels.
- Several seeds (replicate runs): the estimate is the mean over seeds. Its variance has two parts: the
  question-level variance ``V_q`` (bootstrap variance of the seed-averaged per-question scores when every seed
  has the same questions; the sum of the per-seed bootstrap variances / S² when they differ) and the seed-to-seed
  variance ``s²/S`` of the per-seed estimates. The interval is ``mean ± t_ν · sqrt(V_q + s²/S)`` with ν the
  Welch–Satterthwaite degrees of freedom (``V_q`` counted with infinite df, ``s²`` with S − 1). Why not a
  bootstrap over seeds: with 3 seeds it treats the 3 observed seeds as the whole population, shrinks the seed
  variance by (S − 1)/S, and its 27 possible resamples cannot reach the t quantile 4.30 that 2 df need, so it
  covers far less than 95% (tests/test_stats.py measures both). ``s²`` also holds the per-question sampling
  noise that ``V_q`` counts, so the interval errs on the wide side; it is clipped to the range the statistic can
  take (``bounds``).

A difference is **resolved** when its interval excludes 0; otherwise it is "not resolved", never a gain or a loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from imm_ray.metrics import pass_at_k

LEVEL = 0.95
RESAMPLES = 4000
SEED = 20261201
CHUNK_ENTRIES = 4_000_000  # resamples × questions per block: bounds the bootstrap's memory (~32 MB of indices)
BOOTSTRAP_METHOD = f"percentile bootstrap over questions ({RESAMPLES} resamples, fixed seed {SEED})"
POOLED_METHOD = ("mean over seeds ± t·sqrt(question-level bootstrap variance + seed-to-seed variance / S), "
                 "Welch–Satterthwaite df")
PASS_BOUNDS = (0.0, 1.0)
DIFF_BOUNDS = (-1.0, 1.0)

SetScores = Mapping[str, pd.Series]  # set name → per-question scores indexed by question id


@dataclass(frozen=True)
class Estimate:
    """A point value with its 95% interval; fractions (pass@k in [0, 1], differences in [−1, 1])."""

    value: float
    low: float
    high: float
    method: str
    seeds: int = 1

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of a difference is resolved by the data."""
        return self.low > 0 or self.high < 0

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (×100 for percent)."""
        return Estimate(self.value * factor, self.low * factor, self.high * factor, self.method, self.seeds)


def question_scores(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """Each question's unbiased pass@k (imm_ray.metrics.pass_at_k) from its sample and correct counts."""
    return np.array([pass_at_k(int(m), int(c), k) for m, c in zip(num_samples, num_correct)], dtype=float)


def question_counts(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (set_name, question_id): how many samples and how many correct, from graded sample rows."""
    grouped = samples.groupby(["set_name", "question_id"], sort=False)["correct"]
    return pd.DataFrame({"samples": grouped.size(), "correct": grouped.sum().astype(int)})


def set_scores(counts: pd.DataFrame, k: int) -> dict[str, pd.Series]:
    """Each set's per-question pass@k, indexed by question id, from :func:`question_counts`."""
    return {
        str(name): pd.Series(question_scores(group["samples"], group["correct"], k),
                             index=group.index.get_level_values("question_id"))
        for name, group in counts.groupby(level="set_name", sort=False)
    }


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: for pass@1 with one sample per question."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    z = _normal_quantile(0.5 + level / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return centre - half, centre + half


def bootstrap_means(sets: Sequence[np.ndarray], *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples`` bootstrap replicates of the mean over sets of each set's mean score.

    Each set's questions are resampled with replacement on their own (sets hold different questions), from one
    numpy Generator seeded with ``seed``, so the same input always gives the same replicates.
    """
    if not sets or any(len(scores) == 0 for scores in sets):
        raise ValueError("every set needs at least one question")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for scores in sets:
        total += _resampled_means(np.asarray(scores, dtype=float), resamples, rng)
    return total / len(sets)


def _resampled_means(scores: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of one score vector.

    A resample's mean depends only on how often each distinct score is drawn, and pass@k scores take few distinct
    values (at most M + 1 per question, (M + 1)² for a paired difference), so where the distinct values are few
    the counts are drawn at once from a multinomial (the same distribution as resampling indices, B × values
    work instead of B × n). Otherwise indices are drawn in blocks so memory stays near ``CHUNK_ENTRIES``.
    """
    n = len(scores)
    values, counts = np.unique(scores, return_counts=True)
    if 4 * len(values) <= n:
        return rng.multinomial(n, counts / n, size=resamples) @ values / n
    block = max(1, CHUNK_ENTRIES // n)
    means = [scores[rng.integers(0, n, size=(min(block, resamples - start), n), dtype=np.int32)].mean(axis=1)
             for start in range(0, resamples, block)]
    return np.concatenate(means)


def percentile_estimate(sets: SetScores, *, bounds: tuple[float, float] = PASS_BOUNDS,
                        resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """One seed: the mean over sets of the set means, with the percentile bootstrap interval over questions."""
    arrays = [np.asarray(s, dtype=float) for s in sets.values()]
    value = float(np.mean([a.mean() for a in arrays]))
    replicates = bootstrap_means(arrays, resamples=resamples, seed=seed)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, *_clip(float(low), float(high), bounds), BOOTSTRAP_METHOD)


def estimate(seeds: Sequence[SetScores], *, bounds: tuple[float, float] = PASS_BOUNDS,
             resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """The statistic (mean over sets of set means) pooled over seeds, with its interval (module docstring).

    ``seeds[s]`` maps each set to seed s's per-question scores; every seed must have the same sets. One seed gives
    the percentile bootstrap; several give the seed-aware t interval.
    """
    if not seeds:
        raise ValueError("estimate needs at least one seed")
    names = list(seeds[0])
    if any(list(s) != names for s in seeds):
        raise ValueError(f"every seed must hold the same sets {names}")
    if len(seeds) == 1:
        return percentile_estimate(seeds[0], bounds=bounds, resamples=resamples, seed=seed, level=level)
    per_seed = np.array([np.mean([np.mean(s[name]) for name in names]) for s in seeds])
    question_var = _question_variance(seeds, names, resamples, seed)
    seed_var = float(per_seed.var(ddof=1)) / len(seeds)
    total = question_var + seed_var
    df = math.inf if seed_var == 0 else (len(seeds) - 1) * (total / seed_var) ** 2
    half = t_quantile(df, 0.5 + level / 2) * math.sqrt(total)
    value = float(per_seed.mean())
    return Estimate(value, *_clip(value - half, value + half, bounds), POOLED_METHOD, len(seeds))


def _question_variance(seeds: Sequence[SetScores], names: Sequence[str], resamples: int, seed: int) -> float:
    """Question-level variance of the seed mean: shared questions are averaged over seeds first (their
    difficulty is one draw for all seeds); seeds with their own questions add independent variances."""
    same = all(set(s[name].index) == set(seeds[0][name].index) for s in seeds for name in names)
    if same:
        averaged = [pd.concat([s[name] for s in seeds], axis=1).mean(axis=1).to_numpy() for name in names]
        return float(bootstrap_means(averaged, resamples=resamples, seed=seed).var())
    variances = [bootstrap_means([np.asarray(s[n], dtype=float) for n in names], resamples=resamples,
                                 seed=seed).var() for s in seeds]
    return float(np.sum(variances)) / len(seeds) ** 2


def paired_scores(a: SetScores, b: SetScores) -> dict[str, pd.Series]:
    """Per-question differences A − B on each set; both models must have been evaluated on the same questions."""
    if list(a) != list(b):
        raise ValueError(f"paired comparison over different sets: {list(a)} vs {list(b)}")
    differences = {}
    for name in a:
        if set(a[name].index) != set(b[name].index):
            missing = len(set(a[name].index) ^ set(b[name].index))
            raise ValueError(f"paired comparison on {name!r}: {missing} question ids are in only one model's samples")
        differences[name] = a[name] - b[name].reindex(a[name].index)
    return differences


def paired_difference(a: Sequence[SetScores], b: Sequence[SetScores], **options) -> Estimate:
    """A − B on the same questions, seed by seed (``a[s]`` and ``b[s]`` from the same seed), pooled over seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs one B per A seed, got {len(a)} and {len(b)}")
    return estimate([paired_scores(x, y) for x, y in zip(a, b)], bounds=DIFF_BOUNDS, **options)


def t_quantile(df: float, prob: float) -> float:
    """Student's t quantile for ``prob`` in (0.5, 1), by integrating the density (no scipy here): the
    trapezoid rule on a fine grid is exact to ~1e-6 for df >= 1; df = inf is the normal quantile. df is rounded
    to 4 significant digits so repeated calls hit a cache (the quantile moves by < 1e-4 within that rounding)."""
    return _t_quantile(float(f"{df:.4g}") if math.isfinite(df) else df, prob)


@lru_cache(maxsize=256)
def _t_quantile(df: float, prob: float) -> float:
    if not 0.5 < prob < 1:
        raise ValueError(f"prob must be in (0.5, 1), got {prob}")
    if math.isinf(df) or df > 1e7:
        return _normal_quantile(prob)
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    grid = np.linspace(0.0, 100.0, 200_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid * grid / df))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    if prob >= cdf[-1]:
        raise ValueError(f"t quantile {prob} for df={df} lies beyond the integration range")
    return float(np.interp(prob, cdf, grid))


def _normal_quantile(prob: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(prob)


def _clip(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    return max(low, bounds[0]), min(high, bounds[1])
