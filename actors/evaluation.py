"""Evaluation = generation (the same Ray Data actor pool as the loop) + grading + pass@k over data sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from actors.engines import EngineSpec
from actors.generation import PoolSpec, SamplingPlan, generate_samples
from imm_ray.data.records import Problem
from imm_ray.progress import ProgressFn
from imm_ray.stats import BOOTSTRAP_METHOD, percentile_estimate, question_counts, set_scores

INTERVAL_METHOD = BOOTSTRAP_METHOD  # what pass@k_low / pass@k_high are: 95% interval over the set's questions


def evaluate_samples(samples: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """Per-set pass@k (the unbiased estimator, averaged over questions) with its 95% interval from graded samples.

    Columns: set, questions, samples (per question, the fewest any question has), then for each k pass@k,
    pass@k_low, pass@k_high (fractions; the interval is imm_ray.stats' percentile bootstrap over questions).
    """
    counts = question_counts(samples)
    rows: dict[str, dict[str, object]] = {}
    for set_name, group in counts.groupby(level="set_name", sort=False):
        rows[str(set_name)] = {"set": set_name, "questions": len(group), "samples": int(group["samples"].min())}
    for k in ks:
        for set_name, scores in set_scores(counts, k).items():
            result = percentile_estimate({set_name: scores})
            rows[set_name].update({f"pass@{k}": result.value, f"pass@{k}_low": result.low,
                                   f"pass@{k}_high": result.high})
    return pd.DataFrame(list(rows.values()))


def evaluate_model(
    sets: Mapping[str, Sequence[Problem]],
    prompts: Mapping[str, Sequence[str]],
    engine: EngineSpec,
    plan: SamplingPlan,
    pool: PoolSpec,
    ks: Sequence[int],
    progress: ProgressFn | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample ``plan.samples_per_question`` answers for every question of every set in one pipeline run;
    return (graded samples, per-set metrics). ``progress``: as for generate_samples."""
    problems = [p for name in sets for p in sets[name]]
    all_prompts = [text for name in sets for text in prompts[name]]
    samples = generate_samples(problems, all_prompts, engine, plan, pool, progress)
    return samples, evaluate_samples(samples, ks)
