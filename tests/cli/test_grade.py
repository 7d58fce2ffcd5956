"""imm-ray grade: grades a predictions file, ends with a JSON line; bad input is one clear line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imm_ray.cli import app

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
DATA_DIR = FIXTURES / "data_dir"
runner = CliRunner()


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _summary(output: str) -> dict[str, object]:
    return json.loads(output.strip().splitlines()[-1])


def test_grades_and_ends_with_a_json_summary(tmp_path):
    predictions = _write(
        tmp_path / "p.jsonl",
        [
            {"index": 0, "completion": "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is 18\n\nQuestion: more"},
            {"index": 1, "completion": "The answer is 4"},
            {"index": 0, "completion": "#### $18"},
        ],
    )
    result = runner.invoke(app, ["grade", "gsm8k", str(predictions), "--data-dir", str(DATA_DIR)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().count("\n") == 0  # not verbose: the summary only
    assert _summary(result.output) == {"set": "gsm8k", "n": 3, "correct": 2, "accuracy": 2 / 3}


def test_verbose_lists_each_completion(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [{"index": 1, "completion": "The answer is 4"}])
    result = runner.invoke(app, ["grade", "gsm8k", str(predictions), "--data-dir", str(DATA_DIR), "--verbose"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("wrong line 1 gsm8k/test/1: extracted='4' gold='3'")
    assert _summary(result.output)["correct"] == 0


def test_explicit_data_file_and_choice_set(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [{"index": 0, "completion": "The answer is (a)"}])
    result = runner.invoke(app, ["grade", "mathqa", str(predictions), "--data", str(FIXTURES / "mathqa.jsonl")])
    assert result.exit_code == 0, result.output
    assert _summary(result.output) == {"set": "mathqa", "n": 1, "correct": 1, "accuracy": 1.0}


def test_empty_predictions_have_no_accuracy(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [])
    result = runner.invoke(app, ["grade", "gsm8k", str(predictions), "--data-dir", str(DATA_DIR)])
    assert result.exit_code == 0
    assert _summary(result.output) == {"set": "gsm8k", "n": 0, "correct": 0, "accuracy": None}


def _fails_with(tmp_path: Path, args: list[str], *expected: str) -> None:
    result = runner.invoke(app, ["grade", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    for text in expected:
        assert text in result.output


def test_unknown_set_lists_known_ones(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [{"index": 0, "completion": "x"}])
    _fails_with(tmp_path, ["gsm9k", str(predictions)], "unknown data set 'gsm9k'", "gsm8k, math, mawps")


def test_bad_prediction_rows_name_their_line(tmp_path):
    good = {"index": 0, "completion": "The answer is 18"}
    data = ["--data-dir", str(DATA_DIR)]
    out_of_range = _write(tmp_path / "a.jsonl", [good, {"index": 5, "completion": "x"}])
    _fails_with(tmp_path, ["gsm8k", str(out_of_range), *data], f"{out_of_range}:2: index 5 is out of range")
    no_completion = _write(tmp_path / "b.jsonl", [good, good, {"index": 1}])
    _fails_with(tmp_path, ["gsm8k", str(no_completion), *data], f"{no_completion}:3: has no 'completion'")
    not_json = _write(tmp_path / "c.jsonl", ["{oops"])
    _fails_with(tmp_path, ["gsm8k", str(not_json), *data], f"{not_json}:1: not valid JSON")
    _fails_with(tmp_path, ["gsm8k", str(tmp_path / "missing.jsonl"), *data], "cannot read predictions file")


def test_bad_data_file_names_field_and_line(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [{"index": 0, "completion": "The answer is 18"}])
    bad = FIXTURES / "gsm8k_missing_field.jsonl"
    _fails_with(tmp_path, ["gsm8k", str(predictions), "--data", str(bad)], f"{bad}:2 has no field 'answer'")


def test_toy_sets_grade_their_generated_records(tmp_path):
    toy = pytest.importorskip("imm_ray.data.toy", reason="imm_ray/data/toy.py (another issue) is not there yet")
    name = toy.TOY_SETS[0]
    problems = toy.load_toy(name, "test", 2, 5)
    rows = [{"index": i, "completion": f"The answer is {p.answer}"} for i, p in enumerate(problems)]
    predictions = _write(tmp_path / "p.jsonl", rows)
    result = runner.invoke(app, ["grade", name, str(predictions), "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert _summary(result.output) == {"set": name, "n": 2, "correct": 2, "accuracy": 1.0}


# ---- data that is not local, offline: the user's own file first, then one quick failure -------------------------
def _hub_calls(monkeypatch) -> list[dict]:
    import huggingface_hub

    calls: list[dict] = []

    def download(**kwargs):
        calls.append(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv("IMM_RAY_DATA_DIR", raising=False)
    return calls


def test_bad_predictions_fail_before_any_data_is_fetched(tmp_path, monkeypatch):
    calls = _hub_calls(monkeypatch)
    not_json = _write(tmp_path / "p.jsonl", ["{oops"])
    _fails_with(tmp_path, ["gsm8k", str(not_json)], f"{not_json}:1: not valid JSON")
    assert calls == []


def test_hub_data_offline_fails_at_once_from_the_cache_only(tmp_path, monkeypatch):
    import time

    calls = _hub_calls(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions = _write(tmp_path / "p.jsonl", [{"index": 0, "completion": "The answer is 18"}])
    started = time.monotonic()
    _fails_with(tmp_path, ["gsm8k", str(predictions)], "HF_HUB_OFFLINE is set", "not in the local hub cache",
                "data_dir=")
    assert time.monotonic() - started < 5
    assert [call["local_files_only"] for call in calls] == [True]


def test_an_unreachable_hub_is_tried_once_not_five_times(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    calls = _hub_calls(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    connections: list[tuple] = []

    def refuse(address, timeout=None):
        connections.append(address)
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    predictions = _write(tmp_path / "p.jsonl", [{"index": 0, "completion": "The answer is 18"}])
    _fails_with(tmp_path, ["gsm8k", str(predictions)], "cannot be reached: Connection refused")
    assert len(connections) == 1 and [call["local_files_only"] for call in calls] == [True]
