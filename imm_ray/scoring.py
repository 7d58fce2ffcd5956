"""Grading a file of existing completions against a data set (what ``imm-ray grade`` runs).

A predictions file is JSONL, one completion per line: ``{"index": i, "completion": "..."}`` where ``i`` is the
0-based position of the record in the data file (the ``<index>`` of its id ``<set>/<split>/<index>``). Several
lines may grade the same record (several samples); each line counts once in ``n``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imm_ray.data.records import Problem
from imm_ray.data.registry import load_set, require_known
from imm_ray.grading import grade


class PredictionsError(ValueError):
    """A predictions file that cannot be graded; the message names the file and line."""


@dataclass(frozen=True)
class Prediction:
    """One predictions line: where it is (1-based line) and what it grades."""

    line: int
    index: int
    completion: str


@dataclass(frozen=True)
class GradedPrediction:
    line: int
    index: int
    problem_id: str
    gold: str
    extracted: str | None
    correct: bool


@dataclass(frozen=True)
class GradeReport:
    """Per-line results and their totals for one set."""

    set_name: str
    rows: tuple[GradedPrediction, ...]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def correct(self) -> int:
        return sum(row.correct for row in self.rows)

    @property
    def accuracy(self) -> float | None:
        """Correct / n; None for an empty file rather than a made-up 0."""
        return self.correct / self.n if self.rows else None

    def summary(self) -> dict[str, Any]:
        return {"set": self.set_name, "n": self.n, "correct": self.correct, "accuracy": self.accuracy}


def read_predictions(path: Path, num_records: int | None = None) -> list[Prediction]:
    """Parse and check a predictions file before anything is graded; errors name file and line. With
    ``num_records``, each index is checked to point at a record too."""
    predictions = list(_predictions(path))
    if num_records is not None:
        check_indices(path, predictions, num_records)
    return predictions


def check_indices(path: Path, predictions: Sequence[Prediction], num_records: int) -> None:
    """Every prediction points at one of the ``num_records`` records; the first that does not names its line."""
    for prediction in predictions:
        if not 0 <= prediction.index < num_records:
            raise PredictionsError(f"{path}:{prediction.line}: index {prediction.index} is out of range "
                                   f"(the data has {num_records} records)")


def _predictions(path: Path) -> Iterator[Prediction]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise PredictionsError(f"cannot read predictions file {path}: {error.strerror or error}") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield _prediction(path, number, text)


def _prediction(path: Path, line: int, text: str) -> Prediction:
    where = f"{path}:{line}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise PredictionsError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: expected a JSON object with 'index' and 'completion'")
    index = row.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise PredictionsError(f"{where}: 'index' must be an integer record position, got {index!r}")
    if index < 0:
        raise PredictionsError(f"{where}: index {index} is out of range (record positions start at 0)")
    completion = row.get("completion")
    if not isinstance(completion, str):
        missing = "has no 'completion'" if completion is None else "'completion' must be a string"
        raise PredictionsError(f"{where}: {missing}")
    return Prediction(line, index, completion)


def grade_predictions(
    set_name: str,
    problems: Sequence[Problem],
    predictions: Sequence[Prediction],
    *,
    last_number_fallback: bool = False,
) -> GradeReport:
    """Grade each prediction against the problem it points at."""
    rows = []
    for prediction in predictions:
        problem = problems[prediction.index]
        result = grade(problem, prediction.completion, last_number_fallback=last_number_fallback)
        rows.append(
            GradedPrediction(
                prediction.line, prediction.index, problem.id, problem.answer, result.extracted, result.correct
            )
        )
    return GradeReport(set_name, tuple(rows))


def grade_file(
    set_name: str,
    predictions_path: Path,
    *,
    data: str | Path | None = None,
    data_dir: str | Path | None = None,
    split: str = "test",
    seed: int = 0,
    last_number_fallback: bool = False,
) -> GradeReport:
    """Check the set's name and the whole predictions file (the user's own inputs, before any data is loaded or
    downloaded), load the set, check every index against it, then grade (``seed``: toy sets only)."""
    require_known(set_name)
    predictions = read_predictions(Path(predictions_path))
    problems = load_set(set_name, split, path=data, data_dir=data_dir, seed=seed)
    check_indices(Path(predictions_path), predictions, len(problems))
    return grade_predictions(set_name, problems, predictions, last_number_fallback=last_number_fallback)
