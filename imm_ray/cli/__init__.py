"""The ``imm-ray`` command line: one module per command, all registered on :data:`app`."""

from imm_ray.cli import analyze, evaluate, grade, merge, plan, run, status, sweep, toy  # noqa: F401  (registers commands)
from imm_ray.cli.app import app

__all__ = ["app"]
