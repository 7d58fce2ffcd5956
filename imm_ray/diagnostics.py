"""Collapse diagnostics from samples already drawn (samples.parquet), no new generation.

Self-improvement can narrow what a model says: the same final answer every time, the same rationale word for word,
pass@k approaching pass@1 because the M samples no longer differ. These numbers show it per set:

- ``distinct_answers``: mean over questions of the number of distinct extracted final answers. Only stated
  answers count (a question whose samples state none counts 0); samples with no extracted answer are counted
  apart, as ``no_answer_share`` (share of all samples).
- ``distinct_rationales``: mean over questions of the number of distinct completions after normalising them
  (case-folded, whitespace runs collapsed to one space, stripped): a reworded rationale counts as distinct.
- ``pass@K-pass@1``: the gap between the largest k and pass@1 (fractions); 0 when the samples are clones.
- ``mean_words``: mean response length in whitespace-separated tokens (words), not model tokens, so it is the
  same whatever the tokenizer.
- ``solved_share`` (generation samples of an iteration): share of training questions with at least one correct
  sample, i.e. the questions the SFT of that iteration can learn from at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from imm_ray.metrics import count_by_question, mean_pass_at_k

_SPACES = re.compile(r"\s+")


def normalise_rationale(text: str | None) -> str:
    """A completion with case and whitespace differences removed, so only rewording counts as distinct."""
    return _SPACES.sub(" ", str(text or "")).strip().casefold()


def _stated(extracted: pd.Series) -> pd.Series:
    """Extracted answers with None, NaN and empty strings as missing (parquet gives None or NaN)."""
    return extracted.where(extracted.notna() & (extracted.astype(str).str.strip() != ""))


def set_diagnostics(samples: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """One row per set of an evaluation's samples: questions, samples per question and the numbers above.

    The gap uses the largest k in ``ks`` that every question has samples for; with none above 1 it is omitted.
    """
    frame = samples.assign(
        answer=_stated(samples["extracted"]),
        rationale=samples["completion"].map(normalise_rationale),
        words=samples["completion"].fillna("").astype(str).str.split().str.len(),
    )
    rows = []
    for set_name, group in frame.groupby("set_name", sort=False):
        per_question = group.groupby("question_id", sort=False)
        fewest = int(per_question.size().min())
        row: dict[str, object] = {
            "set": set_name, "questions": per_question.ngroups, "samples": fewest,
            "distinct_answers": float(per_question["answer"].nunique().mean()),
            "no_answer_share": float(group["answer"].isna().mean()),
            "distinct_rationales": float(per_question["rationale"].nunique().mean()),
            "mean_words": float(group["words"].mean()),
        }
        top = max((k for k in ks if k <= fewest), default=1)
        if top > 1:
            counts = count_by_question(zip(group["question_id"], group["correct"]))
            row[f"pass@{top}-pass@1"] = mean_pass_at_k(counts, top) - mean_pass_at_k(counts, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def solved_share(generation: pd.DataFrame) -> float:
    """Share of training questions with at least one correct sample in an iteration's generation samples."""
    if generation.empty:
        raise ValueError("no generation samples")
    return float(generation.groupby("question_id", sort=False)["correct"].any().mean())


def generation_diagnostics(generation: pd.DataFrame) -> dict[str, float]:
    """What the training samples θ^t drew say: questions, samples per question, solved share, correct share."""
    per_question = generation.groupby("question_id", sort=False)
    return {"train_questions": float(per_question.ngroups), "train_samples": float(per_question.size().min()),
            "solved_share": solved_share(generation), "correct_share": float(generation["correct"].mean())}
