"""Evaluation = generation (the same Ray Data actor pool as the loop) + grading + pass@k over data sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from actors.engines import EngineSpec
from actors.generation import PoolSpec, SamplingPlan, generate_samples
from imm_ray.data.records import Problem
from imm_ray.metrics import pass_at_k


def evaluate_samples(samples: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """Per-set pass@k (the unbiased estimator, averaged over questions) from graded samples."""
    per_question = samples.groupby(["set_name", "question_id"], sort=False)["correct"].agg(["size", "sum"])
    rows = []
    for set_name, group in per_question.groupby(level="set_name", sort=False):
        row: dict[str, object] = {"set": set_name, "questions": len(group), "samples": int(group["size"].min())}
        for k in ks:
            scores = [pass_at_k(int(m), int(c), k) for m, c in zip(group["size"], group["sum"])]
            row[f"pass@{k}"] = sum(scores) / len(scores)
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_model(
    sets: Mapping[str, Sequence[Problem]],
    prompts: Mapping[str, Sequence[str]],
    engine: EngineSpec,
    plan: SamplingPlan,
    pool: PoolSpec,
    ks: Sequence[int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample ``plan.samples_per_question`` answers for every question of every set in one pipeline run;
    return (graded samples, per-set metrics)."""
    problems = [p for name in sets for p in sets[name]]
    all_prompts = [text for name in sets for text in prompts[name]]
    samples = generate_samples(problems, all_prompts, engine, plan, pool)
    return samples, evaluate_samples(samples, ks)
