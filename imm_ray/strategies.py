"""The self-improvement strategies the paper compares, as data: what SFT trains on and whether it merges.

Every strategy runs through the same loop (imm_ray/loop.py); a strategy only decides
- which model generates the samples (the current model θ^t, or a fixed teacher for distillation),
- which kept pairs the SFT of iteration t sees (this iteration's, a mixture with the previous one's, or all so far),
- whether the fine-tuned model is merged back with the ORIGINAL base, and by which merge method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

DataPolicy = Literal["current", "mixture", "accumulation"]


@dataclass(frozen=True)
class StrategySpec:
    name: str
    label: str
    data_policy: DataPolicy = "current"
    merge_method: str | None = None  # None: θ^{t+1} = θ_SFT^t (no merge)
    teacher_generates: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("vanilla", "STaR (vanilla)"),
        StrategySpec("mixture", "Data mixture", data_policy="mixture"),
        StrategySpec("accumulation", "Data accumulation", data_policy="accumulation"),
        StrategySpec("imm", "IMM", merge_method="imm"),
        StrategySpec("iimm", "IIMM", merge_method="iimm"),
        StrategySpec("distillation", "Distillation + merge", merge_method="imm", teacher_generates=True),
    )
}

PAIR_COLUMNS = ["question_id", "prompt", "response", "iteration"]


def select_sft_pairs(
    policy: DataPolicy,
    current: pd.DataFrame,
    earlier: Sequence[pd.DataFrame],
    *,
    mixture_share: float,
    seed: int,
) -> pd.DataFrame:
    """The SFT pairs of this iteration under a data policy.

    ``current`` holds this iteration's kept pairs, ``earlier`` the kept pairs of iterations 0..t-1 in order.
    Mixture adds a seeded random ``mixture_share`` of the previous iteration's pairs; accumulation trains on the
    union of all iterations' pairs. Duplicate (question, response) pairs are kept once.
    """
    if policy == "current" or not earlier:
        frames = [current]
    elif policy == "mixture":
        previous = earlier[-1]
        count = round(mixture_share * len(previous))
        frames = [current, previous.sample(n=count, random_state=seed) if count else previous.iloc[:0]]
    elif policy == "accumulation":
        frames = [*earlier, current]
    else:
        raise ValueError(f"unknown data policy {policy!r}")
    merged = pd.concat(frames, ignore_index=True)
    return merged.drop_duplicates(subset=["question_id", "response"], keep="last").reset_index(drop=True)


def kept_pairs(samples: pd.DataFrame, iteration: int, prompts: Mapping[str, str]) -> pd.DataFrame:
    """The correct samples of one generation as SFT pairs, deduplicated.

    Each pair's prompt is ``prompts[question_id]``: the zero-shot prompt (through the chat template where the
    run uses one), the format evaluation uses, so the model learns to answer the bare question; few-shot
    exemplars only steer sampling.
    """
    kept = samples[samples["correct"]].copy()
    kept["response"] = kept["completion"].str.strip()
    kept = kept[kept["response"] != ""]
    kept["prompt"] = [prompts[question_id] for question_id in kept["question_id"]]
    kept["iteration"] = iteration
    kept = kept.drop_duplicates(subset=["question_id", "response"])
    return kept[PAIR_COLUMNS].reset_index(drop=True)
