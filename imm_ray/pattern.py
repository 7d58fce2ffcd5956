"""The paper's pattern as data: the criteria a run is checked against, and their verdict from paired comparisons.

"Superficial self-improved reasoners" predicts, at the last iteration: vanilla STaR gains in-domain and loses
out-of-domain against the base (a), IMM's merged model keeps an in-domain gain (b), and IMM is above vanilla
out-of-domain (c). The criteria were fixed before the toy world was tuned (docs/toy_world.md) and are checked here
exactly as stated, on the report's paired differences (imm_ray/stats.py); nothing is loosened after the fact.

A criterion names two models ("imm" and "vanilla" mean the strategy's last handed-on model), a set (the ID set or
the OOD mean), the side A − B must fall on, and whether its interval must exclude 0. The verdict keeps the two
apart: a point estimate on the right side whose interval contains 0 "holds on the point only".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pandas as pd

Side = Literal["above", "below"]
Where = Literal["id", "ood"]


@dataclass(frozen=True)
class Criterion:
    name: str
    a: str  # "imm", "vanilla" (the strategy's last handed-on model) or "base"
    b: str
    where: Where
    side: Side
    must_resolve: bool  # the criterion itself asks for a 95% interval that excludes 0

    def statement(self, names: Mapping[str, str]) -> str:
        where = "in-domain" if self.where == "id" else "on the OOD mean"
        rule = ", its paired 95% interval excluding 0" if self.must_resolve else ""
        return f"{names[self.a]} is {self.side} {names[self.b]} {where}{rule}"


NAMES = {"imm": "IMM's last merged model", "vanilla": "vanilla STaR's last model", "base": "the base"}

CRITERIA: tuple[Criterion, ...] = (
    Criterion("(a) in-domain", "vanilla", "base", "id", "above", must_resolve=False),
    Criterion("(a) out-of-domain", "vanilla", "base", "ood", "below", must_resolve=False),
    Criterion("(b)", "imm", "base", "id", "above", must_resolve=False),
    Criterion("(c)", "imm", "vanilla", "ood", "above", must_resolve=True),
)

Verdict = Literal["holds", "holds on the point only", "not met: not resolved", "fails", "not measured"]


@dataclass(frozen=True)
class Check:
    criterion: Criterion
    verdict: Verdict
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    seeds: int | None = None


def judge(criterion: Criterion, difference: float, resolved: bool) -> Verdict:
    """The verdict of one criterion from A − B and whether its 95% interval excludes 0 (the comparison's
    ``resolved``, imm_ray.stats.Estimate.resolved)."""
    right_side = difference > 0 if criterion.side == "above" else difference < 0
    if not right_side:
        return "fails"
    if resolved:
        return "holds"
    return "not met: not resolved" if criterion.must_resolve else "holds on the point only"


def check(frame: pd.DataFrame, labels: Mapping[str, str], sets: Mapping[Where, str], k: int) -> list[Check]:
    """Every criterion on a comparison frame (imm_ray.report.comparison_frame's columns). ``labels`` maps "imm",
    "vanilla" and "base" to the report's model labels; ``sets`` maps "id" and "ood" to the frame's set names."""
    checks = []
    for criterion in CRITERIA:
        row = _row(frame, labels.get(criterion.a), labels.get(criterion.b), sets.get(criterion.where), k)
        if row is None:
            checks.append(Check(criterion, "not measured"))
            continue
        checks.append(Check(criterion, judge(criterion, row["difference"], bool(row["resolved"])),
                            float(row["difference"]), float(row["low"]), float(row["high"]), int(row["seeds"])))
    return checks


def _row(frame: pd.DataFrame, a: str | None, b: str | None, set_name: str | None, k: int) -> pd.Series | None:
    if a is None or b is None or set_name is None or frame.empty:
        return None
    match = frame[(frame["k"] == k) & (frame["a"] == a) & (frame["b"] == b) & (frame["set"] == set_name)]
    return None if match.empty else match.iloc[0]


def markdown(checks: list[Check], k: int) -> str:
    """The report's section: each criterion, its measurement and its verdict, and what the run says overall."""
    lines = ["## The paper's pattern\n",
             f"The criteria fixed before the toy world was tuned (docs/toy_world.md), on pass@{k} at the last "
             "iteration, A − B in points on the same questions with its 95% interval. \"Holds on the point only\": "
             "the point is on the stated side but the interval contains 0.\n",
             "| criterion | stated | A − B | seeds | verdict |", "|---|---|---|---:|---|"]
    for c in checks:
        measured = "–" if c.difference is None else f"{c.difference:+.1f} [{c.low:+.1f}, {c.high:+.1f}]"
        lines.append(f"| {c.criterion.name} | {c.criterion.statement(NAMES)} | {measured} | "
                     f"{c.seeds if c.seeds is not None else '–'} | {c.verdict} |")
    lines.append("\n" + summary(checks) + "\n")
    return "\n".join(lines)


def summary(checks: list[Check]) -> str:
    if any(c.verdict == "not measured" for c in checks):
        return ("Not every criterion could be measured: the run needs the IMM and vanilla strategies and the base's "
                "evaluation on the ID set and at least one OOD set.")
    failed = [c.criterion.name for c in checks if c.verdict in ("fails", "not met: not resolved")]
    point = [c.criterion.name for c in checks if c.verdict == "holds on the point only"]
    seeds = min(c.seeds or 0 for c in checks)
    pooled = f"pooled over {seeds} seeds" if seeds > 1 else "one seed; the criteria are stated pooled over seeds"
    if failed:
        return (f"The pattern is NOT shown by this run ({pooled}): {', '.join(failed)} not met"
                + (f"; {', '.join(point)} on the point only." if point else "."))
    if point:
        return f"Every criterion is on its stated side ({pooled}); {', '.join(point)} on the point only."
    return f"Every criterion holds with a resolved interval ({pooled})."
