"""Collapse diagnostics on constructed sample frames."""

from __future__ import annotations

import pandas as pd
import pytest

from imm_ray.diagnostics import generation_diagnostics, normalise_rationale, set_diagnostics, solved_share

COLUMNS = ["question_id", "set_name", "question", "prompt", "sample_index", "temperature", "completion",
           "extracted", "correct"]


def _frame(rows) -> pd.DataFrame:
    """rows: (set, question id, completion, extracted, correct)."""
    records = []
    for index, (set_name, qid, completion, extracted, correct) in enumerate(rows):
        records.append({"question_id": qid, "set_name": set_name, "question": "Q", "prompt": "P",
                        "sample_index": index % 2, "temperature": 0.6, "completion": completion,
                        "extracted": extracted, "correct": correct})
    return pd.DataFrame(records, columns=COLUMNS)


SAMPLES = _frame([
    # q1: two different answers, two rationales that differ only in case and spacing → 1 distinct rationale
    ("a", "q1", "So the answer is 4", "4", True),
    ("a", "q1", "so  the answer IS 4 ", "5", False),
    # q2: one stated answer and one sample with no answer; two distinct rationales
    ("a", "q2", "three words here", "7", False),
    ("a", "q2", "no answer", None, False),
    # set b: clones
    ("b", "q3", "x y", "1", True),
    ("b", "q3", "x y", "1", True),
])


def test_set_diagnostics_counts_answers_rationales_and_lengths():
    table = set_diagnostics(SAMPLES, (1, 2)).set_index("set")
    a, b = table.loc["a"], table.loc["b"]
    assert (a["questions"], a["samples"]) == (2, 2)
    assert a["distinct_answers"] == pytest.approx((2 + 1) / 2)  # the missing answer is not an answer
    assert a["no_answer_share"] == pytest.approx(1 / 4)
    assert a["distinct_rationales"] == pytest.approx((1 + 2) / 2)
    assert a["mean_words"] == pytest.approx((5 + 5 + 3 + 2) / 4)
    # pass@2 - pass@1: q1 1 - 0.5 = 0.5 gap, q2 0 → 0.25
    assert a["pass@2-pass@1"] == pytest.approx(0.25)
    assert b["distinct_answers"] == b["distinct_rationales"] == 1.0 and b["pass@2-pass@1"] == 0.0


def test_the_gap_is_left_out_without_a_k_above_one():
    assert "pass@2-pass@1" not in set_diagnostics(SAMPLES, (1,)).columns


def test_nan_and_empty_answers_are_no_answer():
    frame = SAMPLES.copy()
    frame["extracted"] = frame["extracted"].astype(object)
    frame.loc[0, "extracted"] = float("nan")
    frame.loc[1, "extracted"] = "  "
    a = set_diagnostics(frame, (1,)).set_index("set").loc["a"]
    assert a["no_answer_share"] == pytest.approx(3 / 4) and a["distinct_answers"] == pytest.approx(0.5)


def test_normalised_rationales():
    assert normalise_rationale("  A\n b\t C ") == "a b c" and normalise_rationale(None) == ""


def test_solved_share_of_training_questions():
    generation = _frame([("train", "t1", "", "1", False), ("train", "t1", "", "2", True),
                         ("train", "t2", "", "1", False), ("train", "t2", "", "1", False),
                         ("train", "t3", "", "3", True), ("train", "t3", "", "3", True)])
    assert solved_share(generation) == pytest.approx(2 / 3)
    summary = generation_diagnostics(generation)
    assert summary["train_questions"] == 3 and summary["correct_share"] == pytest.approx(0.5)
