"""A small real run of ``imm-ray eval`` (Ray Data generation actors on the toy model) in a subprocess, stdout not a
terminal: the console has one plain line per event and none of Ray's own lines, which go to OUT/logs/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imm_ray.toy import TOY_MODEL_DIR

RAY_LINES = ("streaming_executor", "core_worker", "Running Dataset", "MapWorker", "logging_progress", "(pid=",
             "Started a local Ray instance", "WARNING", "INFO")


@pytest.mark.integration
def test_eval_console_is_clean_and_ray_output_goes_to_the_logs(tmp_path):
    out = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    done = subprocess.run(
        [sys.executable, "-m", "imm_ray", "eval", "--model", str(TOY_MODEL_DIR), "--sets", "toy_id", "--limit", "4",
         "--samples", "2", "--k", "1", "--max-new-tokens", "24", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout and "\r" not in done.stdout  # not a terminal: no colours, no redraws
    assert lines[0].startswith("[0:00] imm-ray eval toy on toy_id") and f"{out / 'logs'}/" in lines[0]
    assert any("> evaluate toy ..." in line for line in lines)
    assert any("+ evaluate toy: computed in" in line for line in lines)
    assert not [line for line in lines if any(marker in line for marker in RAY_LINES)], done.stdout
    assert done.stderr.strip() == "", done.stderr
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "streaming_executor" in driver_log  # Ray Data's lines are kept, in the log
    session = out / "logs" / "ray_session"
    assert session.is_symlink() and any(session.glob("worker-*.out"))  # the workers' own output
    assert (out / "metrics.csv").is_file()
