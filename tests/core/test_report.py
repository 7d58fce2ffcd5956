"""The run report on constructed evaluations: intervals, seeds pooled, paired comparisons and their wording."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from actors.evaluation import evaluate_samples
from imm_ray.report import ALPHA_CONVENTION, results_table, trajectory, write_report

N, M = 60, 2  # questions per set, samples per question
FORBIDDEN = re.compile(r"\b(gains?|loss(es)?|better|worse|improv\w*)\b", re.IGNORECASE)


def metrics(id_acc, ood_acc):
    return pd.DataFrame({"set": ["toy_id", "toy_ood"], "pass@1": [id_acc, ood_acc], "pass@4": [id_acc, ood_acc]})


ROWS = [  # rows as an older loop wrote them: metrics only, no samples, no seed
    {"strategy": "base", "iteration": None, "role": "base", "metrics": metrics(0.4, 0.5)},
    {"strategy": "imm", "iteration": 0, "role": "sft", "metrics": metrics(0.6, 0.3)},
    {"strategy": "imm", "iteration": 0, "role": "merge", "metrics": metrics(0.55, 0.45)},
    {"strategy": "vanilla", "iteration": 0, "role": "sft", "metrics": metrics(0.6, 0.3)},
]


def _samples(correct: dict[str, set[int]], words: int = 3) -> pd.DataFrame:
    """Every question of every set with M samples; the questions in ``correct[set]`` right on all of them."""
    rows = []
    for set_name, right in correct.items():
        for q in range(N):
            for j in range(M):
                ok = q in right
                rows.append({"question_id": f"{set_name}-{q}", "set_name": set_name, "question": "Q", "prompt": "P",
                             "sample_index": j, "temperature": 0.6, "completion": " ".join(["w"] * words) + f" {j}",
                             "extracted": "1" if ok else str(j + 2), "correct": ok})
    return pd.DataFrame(rows)


def _evaluation(folder: Path, correct: dict[str, set[int]]) -> tuple[Path, pd.DataFrame]:
    folder.mkdir(parents=True, exist_ok=True)
    frame = _samples(correct)
    frame.to_parquet(folder / "samples.parquet", index=False)
    return folder / "samples.parquet", evaluate_samples(frame, (1, 2))


def _rows(tmp_path: Path, merge_id: int, merge_ood: set[int]) -> list[dict]:
    """Two seeds; the base is one evaluation shared by both. SFT (IMM's and vanilla's, the same model) is right
    on 50 ID and 20 OOD questions, the base on 20 and 30; IMM's merge on ``merge_id`` (+ seed) ID questions and
    the OOD questions ``merge_ood``."""
    base_path, base_metrics = _evaluation(tmp_path / "base", {"toy_id": set(range(20)), "toy_ood": set(range(30))})
    generation = tmp_path / "generate.parquet"
    _samples({"train": set(range(40))}).to_parquet(generation, index=False)
    rows = []
    for seed in (0, 1):
        rows.append({"strategy": "base", "iteration": None, "role": "base", "seed": seed, "metrics": base_metrics,
                     "samples": base_path, "generation": None, "analysis": None})
        sft = _evaluation(tmp_path / f"sft{seed}", {"toy_id": set(range(50 + seed)), "toy_ood": set(range(20))})
        merge = _evaluation(tmp_path / f"merge{seed}",
                            {"toy_id": set(range(merge_id + seed)), "toy_ood": merge_ood})
        for strategy, role, (path, frame) in (("imm", "sft", sft), ("imm", "merge", merge), ("vanilla", "sft", sft)):
            rows.append({"strategy": strategy, "iteration": 0, "role": role, "seed": seed, "metrics": frame,
                         "samples": path, "generation": generation, "analysis": None})
    return rows


MERGE_OOD = (set(range(30)) - {5}) | {45, 46}  # against the base: +2 −1 questions, not resolved


def test_results_table_pools_seeds_with_intervals_and_counts(tmp_path):
    table = results_table(_rows(tmp_path, 40, MERGE_OOD), "toy_id", "pass@1").set_index("model")
    merge = table.loc["IMM · Merge_0"]
    assert merge["seeds"] == 2 and merge["toy_id"] == pytest.approx(100 * 40.5 / 60)
    assert merge["toy_id low"] < merge["toy_id"] < merge["toy_id high"]
    assert merge["toy_id questions"] == N and merge["toy_id samples"] == M
    assert merge["OOD mean"] == pytest.approx(100 * 31 / 60)
    assert table.loc["Base", "seeds"] == 2 and table.loc["Base", "toy_id"] == pytest.approx(100 / 3)


def test_report_with_a_resolved_headline(tmp_path):
    first = write_report(tmp_path, _rows(tmp_path, 40, MERGE_OOD), "toy_id", (1, 2))
    text = (tmp_path / "report.md").read_text()
    summary = text.split("## Summary")[1].split("##")[0]
    assert "**IMM · Merge_0** (A) against **STaR (vanilla) · SFT_0** (B), pass@1, pooled over 2 seeds" in summary
    assert "on the OOD mean: IMM's is higher by 18.3 points" in summary
    assert "on the ID set `toy_id`: IMM's is lower by 16.7 points" in summary
    assert "Counts: `toy_id` 60 questions × 2 samples; `toy_ood` 60 questions × 2 samples. Seeds: 0, 1" in text
    assert re.search(r"\| IMM · Merge_0 \| 67\.5 \[\d+\.\d, \d+\.\d\] \|", text)
    compared = pd.read_csv(tmp_path / "comparisons.csv")
    row = compared[(compared["k"] == 1) & (compared["comparison"] == "IMM · Merge_0 − Base")].set_index("set")
    assert row.loc["toy_id", "resolved"] and not row.loc["toy_ood", "resolved"]
    assert row.loc["toy_ood", "difference"] == pytest.approx(100 / 60)
    assert "IMM · Merge_0 − STaR (vanilla) · SFT_0" in set(compared["comparison"])
    assert "- IMM · Merge_0 − Base: resolved: A is higher on toy_id" in text and "not resolved on toy_ood (+1.7 [" in text
    assert not FORBIDDEN.search(text)
    assert list(first.columns[:8]) == ["model", "strategy", "iteration", "role", "seeds", "toy_id", "toy_id low",
                                       "toy_id high"]
    csv = pd.read_csv(tmp_path / "results_pass@2.csv")
    assert {"OOD mean low", "OOD mean high", "toy_ood questions", "toy_ood samples"} <= set(csv.columns)


def test_an_unresolved_headline_is_worded_as_not_resolved(tmp_path):
    # IMM's merge: as the SFT model on ID but one question (of 60) fewer, OOD: 1 up, 1 down against SFT
    merge_ood = (set(range(20)) - {3}) | {40}
    write_report(tmp_path, _rows(tmp_path, 49, merge_ood), "toy_id", (1,))
    text = (tmp_path / "report.md").read_text()
    summary = text.split("## Summary")[1].split("##")[0]
    assert "on the OOD mean: the difference is +0.0 points" in summary
    assert "on the ID set `toy_id`: the difference is -1.7 points" in summary
    assert summary.count("not resolved (the 95% interval contains 0)") == 2
    assert "higher" not in summary and "lower" not in summary
    assert not FORBIDDEN.search(text)


def test_seed_appendix_diagnostics_and_plot(tmp_path):
    write_report(tmp_path, _rows(tmp_path, 40, MERGE_OOD), "toy_id", (1, 2))
    text = (tmp_path / "report.md").read_text()
    assert "## Appendix: each seed" in text and "### Seed 1, pass@2 (%)" in text
    seed1 = text.split("### Seed 1, pass@1 (%)")[1]
    assert re.search(r"\| STaR \(vanilla\) · SFT_0 \| 85\.0 \[", seed1)  # 51 of 60 in seed 1
    diagnostics = text.split("## Collapse diagnostics")[1]
    assert "| IMM · Merge_0 | toy_id | " in diagnostics and "length (words)" in diagnostics
    assert "| IMM | 0 | 60 × 2 | 66.7 | 66.7 |" in diagnostics  # 40 of 60 training questions right
    assert (tmp_path / "accuracy_over_iterations.png").stat().st_size > 5000


def test_rows_without_samples_still_give_a_report(tmp_path):
    first = write_report(tmp_path, ROWS, "toy_id", (1, 4))
    text = (tmp_path / "report.md").read_text()
    assert ALPHA_CONVENTION in text and "| Base | 40.0 |" in text and "IMM · Merge_0" in text
    assert "No paired comparisons" in text and first.loc[2, "OOD mean"] == pytest.approx(45.0)
    assert (tmp_path / "results_pass@4.csv").is_file()


def test_trajectory_follows_the_handed_on_model():
    table = results_table(ROWS, "toy_id", "pass@1")
    xs, ys = trajectory(table, "imm", "toy_id")
    assert xs == [0, 1] and ys == pytest.approx([40.0, 55.0])
    xs, ys = trajectory(table, "vanilla", "toy_id")
    assert xs == [0, 1] and ys == pytest.approx([40.0, 60.0])


def test_layer_section_tabulates_weight_change_and_importance(tmp_path):
    folder = tmp_path / "analysis"
    folder.mkdir()
    pd.DataFrame({"layer": [0, 1], "weight_change": [0.5, 0.75]}).to_csv(folder / "weight_change.csv", index=False)
    pd.DataFrame({"layer": [0, 1], "importance": [1.5, 0.25]}).to_csv(folder / "importance.csv", index=False)
    rows = [{**ROWS[0], "analysis": None}, {**ROWS[1], "analysis": folder}]
    write_report(tmp_path, rows, "toy_id", (1,))
    text = (tmp_path / "report.md").read_text()
    assert "| IMM · SFT_0 | 0.5 | 0.75 |" in text and "| IMM · SFT_0 | 1.5 | 0.25 |" in text


# ---- the paper's pattern (imm_ray/pattern.py) ----
def test_the_report_checks_the_pattern_on_the_last_models(tmp_path):
    write_report(tmp_path, _rows(tmp_path, 40, MERGE_OOD), "toy_id", (1,))
    section = (tmp_path / "report.md").read_text().split("## The paper's pattern")[1].split("\n## ")[0]
    assert "| (a) in-domain | vanilla STaR's last model is above the base in-domain | +" in section
    assert section.count("| holds |") == 4
    assert "Every criterion holds with a resolved interval (pooled over 2 seeds)." in section


def test_the_report_says_when_the_pattern_is_not_shown(tmp_path):
    # IMM's merge as vanilla's SFT model out-of-domain but for one question each way: (c) is +0.0
    write_report(tmp_path, _rows(tmp_path, 49, (set(range(20)) - {3}) | {40}), "toy_id", (1,))
    section = (tmp_path / "report.md").read_text().split("## The paper's pattern")[1].split("\n## ")[0]
    assert "| +0.0 [" in section and section.rstrip().endswith("(c) not met.")
    assert "The pattern is NOT shown by this run (pooled over 2 seeds)" in section


def test_a_run_without_vanilla_has_no_pattern_section(tmp_path):
    rows = [r for r in _rows(tmp_path, 40, MERGE_OOD) if r["strategy"] != "vanilla"]
    write_report(tmp_path, rows, "toy_id", (1,))
    assert "## The paper's pattern" not in (tmp_path / "report.md").read_text()
