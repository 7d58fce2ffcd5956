"""pass@k and maj@k, and their set-level means.

pass@k is the unbiased estimator of Chen et al. (2021) that the paper uses: for a question with M samples of
which c are correct, pass@k = 1 - C(M-c, k) / C(M, k), the chance that k samples drawn without replacement
from the M contain a correct one. It is computed as a product,
    C(M-c, k) / C(M, k) = prod_{i=M-c+1}^{M} (1 - k / i),
so no binomial coefficient is ever formed (C(1000, 500) has ~300 digits) and every factor lies in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k of one question with ``num_samples`` samples, ``num_correct`` of them correct."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, {num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples={num_samples}], got {k}")
    if num_samples - num_correct < k:  # every draw of k samples holds a correct one
        return 1.0
    all_wrong = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


@dataclass(frozen=True)
class QuestionCounts:
    """One question's samples: how many there were and how many were correct."""

    num_samples: int
    num_correct: int


def count_by_question(samples: Iterable[tuple[Hashable, bool]]) -> dict[Hashable, QuestionCounts]:
    """Per-question counts from per-sample ``(question id, correct)`` rows, in first-seen order."""
    totals: dict[Hashable, list[int]] = {}
    for question, correct in samples:
        counts = totals.setdefault(question, [0, 0])
        counts[0] += 1
        counts[1] += bool(correct)
    return {question: QuestionCounts(n, c) for question, (n, c) in totals.items()}


def mean_pass_at_k(questions: Iterable[QuestionCounts] | Mapping[Hashable, QuestionCounts], k: int) -> float:
    """The set-level pass@k: the mean over questions of their pass@k (each question counts once).

    Every question must have at least ``k`` samples; an empty set raises rather than report a made-up 0.
    """
    rows = list(questions.values()) if isinstance(questions, Mapping) else list(questions)
    if not rows:
        raise ValueError("mean_pass_at_k needs at least one question")
    return sum(pass_at_k(row.num_samples, row.num_correct, k) for row in rows) / len(rows)


def maj_at_k(extracted: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> float:
    """Majority vote over the first ``k`` samples of one question: 1.0 if the most common answer is correct.

    ``extracted[i]`` is sample i's extracted answer (None: it stated none, and casts no vote) and
    ``correct[i]`` its grade, so the grader's notion of equivalence decides correctness and no gold answer is
    needed here. Votes group identical answer strings (the graders' canonical forms: "0.5" for 1/2 in numeric
    sets; MATH answers group as written, so "\\frac12" and "0.5" vote apart). Ties go to the answer seen first.
    No answer at all gives 0.0.
    """
    if len(extracted) != len(correct):
        raise ValueError(f"{len(extracted)} answers but {len(correct)} grades")
    limit = len(extracted) if k is None else k
    if not 1 <= limit <= len(extracted):
        raise ValueError(f"k must be in [1, {len(extracted)}], got {k}")
    votes = Counter(answer for answer in extracted[:limit] if answer is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(answer for answer in extracted[:limit] if answer is not None and votes[answer] == best)
    return 1.0 if correct[extracted.index(winner)] else 0.0
