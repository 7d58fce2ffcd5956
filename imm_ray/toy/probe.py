"""Which decisions of a step line a toy model has learned: teacher-forced probabilities at named fields.

The build record's pass@1 says how often a toy is right; it does not say why it is wrong. This probe does:
with the gold document (zero-shot prompt and reference solution) as input, it reads the probability the model
gives to the gold token at the start of each named field of every step line, such as the sign, the amount or
the person. A field at 1.00 is a decision the model makes; a field at 1/choices (0.50 for the sign, 1/16 for a
name) is a coin flip. docs/toy_world.md (rounds 2–4) reads the toy worlds with it. That is how it showed that
the shipped base places every number and picks each sign at chance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from imm_ray.data.format import build_prompt
from imm_ray.data.records import Problem
from imm_ray.data.toy import STEP_LINE
from imm_ray.stats import percentile_estimate



@dataclass(frozen=True)
class FieldProbability:
    """The probability of the gold token at one field: the mean over ``questions`` of each question's mean over
    its ``count`` occurrences in all, with the 95% interval of :data:`imm_ray.stats.BOOTSTRAP_METHOD`."""

    field: str
    mean: float
    low: float
    high: float
    questions: int
    count: int


@torch.no_grad()
def field_probabilities(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem],
    pattern: re.Pattern[str] = STEP_LINE,
) -> list[FieldProbability]:
    """For each named group of ``pattern`` (in its group order), the teacher-forced probability of the gold token
    at the group's first character, over every match in the problems' reference solutions."""
    found: dict[str, dict[str, list[float]]] = {name: {} for name in pattern.groupindex}
    for problem in problems:
        if not problem.solution:
            raise ValueError(f"{problem.id} has no reference solution to probe")
        prompt = build_prompt(problem.question)
        encoded = tokenizer(prompt + problem.solution, return_offsets_mapping=True, return_tensors="pt")
        ids = encoded["input_ids"][0]
        spans = encoded["offset_mapping"][0].tolist()
        probabilities = model(encoded["input_ids"]).logits[0].float().softmax(-1)
        for match in pattern.finditer(problem.solution):
            for name in pattern.groupindex:
                position = _token_at(spans, len(prompt) + match.start(name))
                found[name].setdefault(problem.id, []).append(probabilities[position - 1, ids[position]].item())
    return [_summary(name, per_question) for name, per_question in found.items()]


def _summary(name: str, per_question: dict[str, list[float]]) -> FieldProbability:
    """Questions are the unit of resampling: a question's lines share its numbers and names."""
    count = sum(len(values) for values in per_question.values())
    if not per_question:
        return FieldProbability(name, float("nan"), float("nan"), float("nan"), 0, 0)
    scores = pd.Series({question: sum(values) / len(values) for question, values in per_question.items()})
    result = percentile_estimate({name: scores})
    return FieldProbability(name, result.value, result.low, result.high, len(scores), count)


def _token_at(spans: list[list[int]], char: int) -> int:
    """The index of the token whose character span holds ``char``."""
    return next(i for i, (start, end) in enumerate(spans) if start <= char < end)
