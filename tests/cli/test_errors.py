"""The one CLI error path: user errors and failed stages end in one line on stderr, exit code 2 or 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from imm_ray.cli.errors import user_errors
from imm_ray.data.registry import DataError
from imm_ray.loop import StageError


def _exit_code(error: BaseException) -> int:
    with pytest.raises(typer.Exit) as caught:
        with user_errors():
            raise error
    return caught.value.exit_code


def test_a_stage_failed_by_user_input_exits_2_and_a_crash_exits_1(capsys):
    file = Path("runs/x/logs/sft-0123.traceback.txt")
    user = StageError(f"stage seed_0/imm/iter_0/sft (SFT) failed: DataError: bad file (full traceback: {file})",
                      DataError("bad file"), file)
    assert _exit_code(user) == 2
    crash = StageError(f"stage seed_0/imm/iter_0/sft (SFT) failed: RuntimeError: CUDA out of memory "
                       f"(full traceback: {file})", RuntimeError("CUDA out of memory"), file)
    assert _exit_code(crash) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: stage seed_0/imm/iter_0/sft (SFT) failed") for line in lines)
    assert all(str(file) in line for line in lines) and "Traceback" not in "".join(lines)


def test_other_errors_pass_through():
    with pytest.raises(KeyError):
        with user_errors():
            raise KeyError("a bug, with its traceback")


def test_the_error_path_loads_nothing_until_an_error_arrives():
    """Commands run inside user_errors(); the error types' modules (torch, the loop) load only for an error."""
    script = ("import sys\nfrom imm_ray.cli.errors import user_errors\nwith user_errors():\n    pass\n"
              "print(sorted(m for m in ('torch', 'imm_ray.loop', 'imm_ray.analysis') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
