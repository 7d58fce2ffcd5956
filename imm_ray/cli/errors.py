"""User errors end in one clear line and exit code 2, never a traceback; a failed stage in one line too.

A stage that fails (inside a Ray worker or on the driver) reaches the console as the loop's
:class:`~imm_ray.loop.StageError`: the stage, the cause and the file under ``<run>/logs/`` holding the full
traceback. Its exit code is 2 when the cause is one of the user errors below (bad input the user can fix), else 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from imm_ray.config import ConfigError

err_console = Console(stderr=True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "your input is wrong", each raised with a message naming the field or file.

    Imported only once an error has arrived: their modules load torch (analysis) and the loop, which a command
    such as ``imm-ray merge`` does not otherwise need (with torch loaded it must spawn its workers, not fork them)."""
    from imm_ray.analysis import AnalysisError
    from imm_ray.data.registry import DataError
    from imm_ray.loop import NoCorrectSamplesError
    from imm_ray.merge.errors import MergeError
    from imm_ray.preflight import PreflightError
    from imm_ray.scoring import PredictionsError

    return (ConfigError, PreflightError, NoCorrectSamplesError, DataError, MergeError, AnalysisError,
            PredictionsError, FileExistsError)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause, and failed stages, into a one-line message and an exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as error:
        from imm_ray.loop import StageError

        users = _user_error_types()
        if isinstance(error, StageError):
            fail(str(error), 2 if isinstance(error.cause, users) else 1)
        if isinstance(error, users):
            fail(str(error))
        raise
