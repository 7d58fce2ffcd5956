"""The paper's pattern: each criterion's verdict from a paired difference, and the report's section."""

from __future__ import annotations

import pandas as pd
import pytest

from imm_ray import pattern
from imm_ray.pattern import CRITERIA, Criterion, judge
from imm_ray.stats import Estimate

ABOVE = Criterion("x", "imm", "base", "id", "above", must_resolve=False)
BELOW = Criterion("y", "vanilla", "base", "ood", "below", must_resolve=False)
RESOLVED_ABOVE = Criterion("z", "imm", "vanilla", "ood", "above", must_resolve=True)


@pytest.mark.parametrize(("criterion", "difference", "low", "high", "verdict"), [
    (ABOVE, +3.0, +1.0, +5.0, "holds"),
    (ABOVE, +3.0, -1.0, +7.0, "holds on the point only"),
    (ABOVE, -3.0, -7.0, +1.0, "fails"),
    (ABOVE, -3.0, -5.0, -1.0, "fails"),
    (ABOVE, 0.0, -2.0, +2.0, "fails"),  # no difference is not "above"
    (BELOW, -8.8, -12.7, -4.8, "holds"),
    (BELOW, +1.0, -1.0, +3.0, "fails"),
    (RESOLVED_ABOVE, +5.7, +2.0, +9.3, "holds"),
    (RESOLVED_ABOVE, +2.5, -1.4, +6.4, "not met: not resolved"),
    (RESOLVED_ABOVE, -4.8, -10.0, +0.2, "fails"),
])
def test_judge(criterion, difference, low, high, verdict):
    assert judge(criterion, difference, Estimate(difference, low, high, "").resolved) == verdict


def test_the_criteria_are_the_ones_fixed_in_docs_toy_world():
    stated = [(c.a, c.b, c.where, c.side, c.must_resolve) for c in CRITERIA]
    assert stated == [("vanilla", "base", "id", "above", False), ("vanilla", "base", "ood", "below", False),
                      ("imm", "base", "id", "above", False), ("imm", "vanilla", "ood", "above", True)]


def _frame(rows):
    return pd.DataFrame([{"k": 1, "a": a, "b": b, "set": s, "difference": d, "low": lo, "high": hi,
                          "resolved": Estimate(d, lo, hi, "").resolved, "seeds": 3} for a, b, s, d, lo, hi in rows])


LABELS = {"imm": "IMM · Merge_2", "vanilla": "STaR · SFT_2", "base": "Base"}
SETS = {"id": "toy_id", "ood": "OOD mean"}


def test_check_reads_each_criterion_from_its_row_and_says_what_fails():
    frame = _frame([("STaR · SFT_2", "Base", "toy_id", -2.2, -9.5, 5.1),  # the seed 1-2 check of issue 9
                    ("STaR · SFT_2", "Base", "OOD mean", -8.3, -13.1, -3.6),
                    ("IMM · Merge_2", "Base", "toy_id", 1.8, -2.3, 5.9),
                    ("IMM · Merge_2", "STaR · SFT_2", "OOD mean", 6.0, 2.9, 9.1),
                    ("IMM · Merge_2", "STaR · SFT_2", "toy_id", 9.9, 8.0, 12.0)])  # not a criterion: ignored
    checks = pattern.check(frame, LABELS, SETS, k=1)
    assert [c.verdict for c in checks] == ["fails", "holds", "holds on the point only", "holds"]
    assert checks[0].difference == -2.2 and checks[0].seeds == 3
    text = pattern.markdown(checks, 1)
    assert "The pattern is NOT shown by this run (pooled over 3 seeds): (a) in-domain not met; (b) on the point " \
           "only." in text
    assert "| (c) | IMM's last merged model is above vanilla STaR's last model on the OOD mean, its paired 95% " \
           "interval excluding 0 | +6.0 [+2.9, +9.1] | 3 | holds |" in text


def test_a_missing_comparison_is_not_measured_not_failed():
    checks = pattern.check(_frame([("IMM · Merge_2", "Base", "toy_id", 1.8, -2.3, 5.9)]), LABELS, SETS, k=1)
    assert [c.verdict for c in checks] == ["not measured", "not measured", "holds on the point only",
                                           "not measured"]
    assert "Not every criterion could be measured" in pattern.summary(checks)


def test_one_seed_is_said_to_be_short_of_the_pooled_criteria():
    frame = _frame([("STaR · SFT_2", "Base", "toy_id", 3.0, 1.0, 5.0),
                    ("STaR · SFT_2", "Base", "OOD mean", -3.0, -5.0, -1.0),
                    ("IMM · Merge_2", "Base", "toy_id", 3.0, 1.0, 5.0),
                    ("IMM · Merge_2", "STaR · SFT_2", "OOD mean", 3.0, 1.0, 5.0)]).assign(seeds=1)
    assert pattern.summary(pattern.check(frame, LABELS, SETS, k=1)) == (
        "Every criterion holds with a resolved interval (one seed; the criteria are stated pooled over seeds).")
