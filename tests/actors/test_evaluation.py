"""Per-set metrics of graded samples (no Ray, no model): pass@k with its interval, and eval's markdown."""

from __future__ import annotations

import pandas as pd
import pytest

from actors.evaluation import INTERVAL_METHOD, evaluate_samples


def _samples() -> pd.DataFrame:
    """Set a: 10 questions × 4 samples, question i right on min(i, 4) samples; set b: 5 questions all right."""
    rows = [("a", f"a{i}", j, j < i) for i in range(10) for j in range(4)]
    rows += [("b", f"b{i}", j, True) for i in range(5) for j in range(4)]
    return pd.DataFrame(rows, columns=["set_name", "question_id", "sample_index", "correct"])


def test_metrics_carry_counts_and_intervals_per_k():
    metrics = evaluate_samples(_samples(), (1, 2))
    assert list(metrics.columns) == ["set", "questions", "samples", "pass@1", "pass@1_low", "pass@1_high",
                                     "pass@2", "pass@2_low", "pass@2_high"]
    a, b = metrics.iloc[0], metrics.iloc[1]
    assert (a["set"], a["questions"], a["samples"]) == ("a", 10, 4)
    assert a["pass@1"] == pytest.approx((0 + 1 + 2 + 3 + 4 * 6) / 40)
    assert a["pass@1_low"] < a["pass@1"] < a["pass@1_high"] and a["pass@2"] > a["pass@1"]
    assert b["pass@1"] == b["pass@1_low"] == b["pass@1_high"] == 1.0


def test_eval_markdown_states_counts_and_the_method():
    from imm_ray.cli.evaluate import _markdown

    text = _markdown(evaluate_samples(_samples(), (1,)))
    assert "| a | 10 × 4 |" in text and "| b | 5 × 4 | 100.0 [100.0, 100.0] |" in text
    assert INTERVAL_METHOD in text
