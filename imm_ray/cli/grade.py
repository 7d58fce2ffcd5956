"""imm-ray grade SET PREDICTIONS.jsonl: grade existing completions; the last output line is a JSON summary.

User errors (an unknown set, a bad predictions or data file, hub data while offline) end with one line on stderr
and exit code 2 (imm_ray/cli/errors.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors


@app.command()
def grade(
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Data set name (see the registry).")],
    predictions: Annotated[
        Path, typer.Argument(metavar="PREDICTIONS.jsonl", help='Lines of {"index": i, "completion": "..."}.')
    ],
    data: Annotated[
        str | None, typer.Option("--data", help="Data file (.jsonl/.json/.parquet or hf://owner/repo/file).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder holding <set>/<split>.jsonl.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the set.")] = "test",
    verbose: Annotated[bool, typer.Option("--verbose", help="Print one line per graded completion.")] = False,
    last_number_fallback: Annotated[
        bool, typer.Option("--last-number-fallback", help="Without an answer line, take the last number.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Toy sets only: the seed they were generated with.")] = 0,
) -> None:
    """Grade completions of SET's records; prints {"set", "n", "correct", "accuracy"} as the last line."""
    from imm_ray.scoring import grade_file

    with user_errors():  # the predictions file is checked first; hub data offline fails at once, not after retries
        report = grade_file(
            set_name, predictions, data=data, data_dir=data_dir, split=split, seed=seed,
            last_number_fallback=last_number_fallback,
        )
    if verbose:
        for row in report.rows:
            mark = "ok   " if row.correct else "wrong"
            typer.echo(f"{mark} line {row.line} {row.problem_id}: extracted={row.extracted!r} gold={row.gold!r}")
    typer.echo(json.dumps(report.summary()))
