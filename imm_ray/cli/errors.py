"""User errors end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from imm_ray.config import ConfigError

err_console = Console(stderr=True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "your input is wrong", each raised with a message naming the field or file."""
    from imm_ray.analysis import AnalysisError
    from imm_ray.data.registry import DataError
    from imm_ray.loop import NoCorrectSamplesError
    from imm_ray.merge.errors import MergeError
    from imm_ray.preflight import PreflightError
    from imm_ray.scoring import PredictionsError

    return (ConfigError, PreflightError, NoCorrectSamplesError, DataError, MergeError, AnalysisError,
            PredictionsError, FileExistsError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into a one-line message and exit code 2."""
    try:
        yield
    except _user_error_types() as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
