"""The one typed record every data set is loaded into, whatever its source format."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

AnswerKind = Literal["numeric", "latex", "choice"]


class Problem(BaseModel):
    """One question with its gold answer.

    ``answer`` is the gold final answer as a string (a number for numeric sets, LaTeX for MATH, the option
    letter for multiple-choice sets). ``choices`` holds the options' texts in letter order (A, B, ...) for
    multiple-choice sets. ``solution`` is a reference chain of thought where the set has one; it is what
    few-shot exemplars and distillation-free toy pretraining are built from.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    set_name: str
    question: str
    answer: str
    kind: AnswerKind
    choices: tuple[str, ...] | None = None
    solution: str | None = None
