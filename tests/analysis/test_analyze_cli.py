"""imm-ray analyze importance / weight-change through typer's CliRunner: outputs, table, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import save_tiny_model
from typer.testing import CliRunner

from imm_ray.cli import app


def invoke(*args: str | Path):
    return CliRunner().invoke(app, ["analyze", *map(str, args)])


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def after_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "after", seed=1, max_shard_size="20KB")


def test_weight_change_writes_csv_png_and_prints_the_table(tiny_model_dir, after_dir, tmp_path):
    result = invoke("weight-change", "--before", tiny_model_dir, "--after", after_dir, "--out", tmp_path / "wc")
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "wc" / "weight_change.csv")
    assert list(df.columns) == ["layer", "weight_change"] and df["layer"].tolist() == [0, 1, 2]
    assert (tmp_path / "wc" / "weight_change.png").read_bytes()[:4] == b"\x89PNG"
    assert "Layer weight change" in result.stdout
    assert f"{df['weight_change'][2]:.6g}" in result.stdout


def test_weight_change_user_errors_exit_2(tiny_model_dir, tmp_path):
    assert_user_error(invoke("weight-change", "--before", tiny_model_dir, "--after", tmp_path / "gone"), "gone")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"never read")
    result = invoke("weight-change", "--before", tmp_path / "pickled", "--after", tiny_model_dir)
    assert_user_error(result, "pytorch_model.bin", "never unpickles")
    wider = save_tiny_model(tmp_path / "wider", seed=0, intermediate=64)
    assert_user_error(invoke("weight-change", "--before", tiny_model_dir, "--after", wider), "shape")


def test_importance_on_a_toy_set(tiny_model_dir, tmp_path):
    out = tmp_path / "imp"
    result = invoke("importance", "--model", tiny_model_dir, "--data", "toy_id", "--limit", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "importance.csv").read_text().splitlines()[0] == "layer,importance"
    df = pd.read_csv(out / "importance.csv")
    assert df["layer"].tolist() == [0, 1, 2] and (df["importance"] > 0).all()
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert "toy_id (train, 3 pairs)" in result.stdout


def test_importance_refuses_a_set_without_reference_solutions(tiny_model_dir, tmp_path):
    (tmp_path / "data" / "mawps").mkdir(parents=True)
    rows = [{"input": "Tom has 3 apples and buys 4. How many?", "target": 7}]
    (tmp_path / "data" / "mawps" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = invoke("importance", "--model", tiny_model_dir, "--data", "mawps", "--data-dir", tmp_path / "data",
                    "--out", tmp_path / "out")
    assert_user_error(result, "'mawps'", "no reference solution", "mawps/train/0")
    assert not (tmp_path / "out").exists()


def test_importance_user_errors_exit_2(tiny_model_dir, tmp_path):
    assert_user_error(invoke("importance", "--model", tiny_model_dir, "--data", "no_such_set"), "no_such_set")
    result = invoke("importance", "--model", tmp_path / "gone", "--data", "toy_id", "--limit", "1")
    assert_user_error(result, "gone")
