"""A quick accuracy check of a (toy) model folder: sample with transformers ``generate``, grade exactly.

This is the build's own yardstick (periodic evals during pretraining, the accuracies in the build record),
not the project's evaluation stage: batched, left-padded sampling from a model in memory, graded by the
project's grader (``imm_ray.grading.grade``: the first "The answer is N" line of the response block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from imm_ray.data.prompts import build_prompt
from imm_ray.data.records import Problem
from imm_ray.grading import grade


@dataclass(frozen=True)
class SamplingSpec:
    """How completions are drawn: ``temperature == 0`` means greedy (then ``samples`` must be 1)."""

    samples: int = 4
    temperature: float = 0.6
    max_new_tokens: int = 96
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.samples != 1:
            raise ValueError("greedy decoding (temperature 0) gives one sample per question")


@dataclass(frozen=True)
class Accuracy:
    """One set's result: pass@1 is the mean share of correct samples, coverage the share of questions
    with at least one correct sample (pass@k for k = samples)."""

    set_name: str
    questions: int
    samples: int
    temperature: float
    pass_at_1: float
    coverage: float


def load_model(folder: Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A model folder's float32 model (eval mode) and its tokenizer, padding on the left for generation."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    return model.eval(), tokenizer


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, questions: Sequence[str], spec: SamplingSpec
) -> list[list[str]]:
    """``spec.samples`` completions per question (zero-shot prompt), in question order."""
    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    per_batch = max(1, spec.batch_size // spec.samples)
    completions: list[list[str]] = []
    for start in range(0, len(questions), per_batch):
        prompts = [build_prompt(q) for q in questions[start : start + per_batch]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        sampling = {"do_sample": True, "temperature": spec.temperature, "top_k": 0, "top_p": 1.0}
        output = model.generate(
            **inputs,
            **(sampling if spec.temperature > 0 else {"do_sample": False}),
            num_return_sequences=spec.samples,
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        completions.extend(texts[i : i + spec.samples] for i in range(0, len(texts), spec.samples))
    return completions


def check_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem], spec: SamplingSpec
) -> Accuracy:
    """Sample every problem ``spec.samples`` times and grade; problems must come from one set."""
    if not problems:
        raise ValueError("no problems to check")
    set_names = {p.set_name for p in problems}
    if len(set_names) != 1:
        raise ValueError(f"problems from several sets: {sorted(set_names)}")
    completions = sample_completions(model, tokenizer, [p.question for p in problems], spec)
    correct = [[grade(p, c).correct for c in group] for p, group in zip(problems, completions, strict=True)]
    return Accuracy(
        set_name=set_names.pop(),
        questions=len(problems),
        samples=spec.samples,
        temperature=spec.temperature,
        pass_at_1=sum(sum(row) for row in correct) / (len(correct) * spec.samples),
        coverage=sum(any(row) for row in correct) / len(correct),
    )
