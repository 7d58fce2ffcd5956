"""`imm-ray merge`: a thin command over merge_models; user errors are one line and exit code 2."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from merge_zoo import Zoo, file_bytes
from typer.testing import CliRunner

from imm_ray.cli import app
from imm_ray.merge.record import MergeRecord

runner = CliRunner()


def _args(zoo: Zoo, out: Path, *extra: str) -> list[str]:
    return ["merge", "--base", str(zoo.base), "--finetuned", str(zoo.ft), "--out", str(out), "--alpha", "0.5",
            "--drop-rate", "0.2", "--seed", "1", *extra]


def test_merge_command_writes_the_model_and_its_record(zoo: Zoo, tmp_path: Path, ray_cluster) -> None:
    out = tmp_path / "merged"
    result = runner.invoke(app, _args(zoo, out, "--workers", "2", "--iteration", "1", "--exclude", "norm"))
    assert result.exit_code == 0, result.output
    assert f"into {out}" in result.output
    record = MergeRecord.read(out)
    assert (record.seed, record.iteration, record.exclude, record.workers) == (1, 1, "norm", 2)
    assert "model.norm.weight" in record.excluded_tensors
    assert "model.safetensors.index.json" in file_bytes(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--drop-rate", "1.5"], "drop_rate: Input should be less than 1"),
        (["--alpha", "-0.1"], "alpha: Input should be greater than or equal to 0"),
        (["--method", "ties"], "finetuned: method 'ties' takes at least 2"),
        (["--method", "magic"], "method: unknown method 'magic'"),
        (["--method", "iimm"], "importance: method 'iimm' needs a layer-importance CSV"),
        (["--exclude", "(unclosed"], "exclude: not a valid regular expression"),
        (["--dtype", "int8"], "dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
    ],
)
def test_bad_options_are_one_line_naming_the_field(zoo: Zoo, tmp_path: Path, extra: list[str], message: str) -> None:
    result = runner.invoke(app, _args(zoo, tmp_path / "out", *extra))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_and_pickles_are_refused(zoo: Zoo, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    result = runner.invoke(app, _args(zoo, existing))
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": [1.0]}))
    result = runner.invoke(app, ["merge", "--base", str(zoo.base), "--finetuned", str(pickled), "--out",
                                 str(tmp_path / "out"), "--alpha", "0.5", "--drop-rate", "0.2", "--seed", "1"])
    assert result.exit_code == 2 and "pickle checkpoints are refused" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "pickled"]


# Runs the command as a process of its own, recording the start method its local pool asks multiprocessing for.
_RECORD_START_METHOD = """
import multiprocessing, sys
from imm_ray.cli import app
real = multiprocessing.get_context
def get_context(method=None):
    print(f"start method: {method}", flush=True)
    return real(method)
multiprocessing.get_context = get_context
sys.argv = ["imm-ray", *sys.argv[1:]]
app()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the command forks its workers on Linux only")
def test_the_command_forks_its_local_workers(zoo: Zoo, tmp_path: Path) -> None:
    """The command plans from headers and must not load torch before its pool starts: a process holding torch spawns
    its workers instead, and each spawned worker imports the CLI and torch again (twice the CPU of the merge)."""
    args = _args(zoo, tmp_path / "out", "--workers", "2", "--backend", "local")  # local whatever RAY_ADDRESS says
    result = subprocess.run([sys.executable, "-c", _RECORD_START_METHOD, *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "start method: fork" in result.stdout.splitlines()
    assert MergeRecord.read(tmp_path / "out").workers == 2
