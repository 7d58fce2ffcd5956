import pytest
import pandas as pd

from imm_ray.report import ALPHA_CONVENTION, results_table, trajectory, write_report


def metrics(id_acc, ood_acc):
    return pd.DataFrame({"set": ["toy_id", "toy_ood"], "pass@1": [id_acc, ood_acc], "pass@4": [id_acc, ood_acc]})


ROWS = [
    {"strategy": "base", "iteration": None, "role": "base", "metrics": metrics(0.4, 0.5)},
    {"strategy": "imm", "iteration": 0, "role": "sft", "metrics": metrics(0.6, 0.3)},
    {"strategy": "imm", "iteration": 0, "role": "merge", "metrics": metrics(0.55, 0.45)},
    {"strategy": "vanilla", "iteration": 0, "role": "sft", "metrics": metrics(0.6, 0.3)},
]


def test_table_has_id_first_and_ood_mean_in_percent():
    table = results_table(ROWS, "toy_id", "pass@1")
    assert list(table.columns[4:]) == ["toy_id", "toy_ood", "OOD mean"]
    assert table.loc[1, "toy_id"] == 60.0 and table.loc[2, "OOD mean"] == 45.0


def test_trajectory_follows_the_handed_on_model():
    table = results_table(ROWS, "toy_id", "pass@1")
    xs, ys = trajectory(table, "imm", "toy_id")
    assert xs == [0, 1] and ys == pytest.approx([40.0, 55.0])
    xs, ys = trajectory(table, "vanilla", "toy_id")
    assert xs == [0, 1] and ys == pytest.approx([40.0, 60.0])


def test_report_files(tmp_path):
    write_report(tmp_path, ROWS, "toy_id", (1, 4))
    text = (tmp_path / "report.md").read_text()
    assert ALPHA_CONVENTION in text and "| Base |" in text and "IMM · Merge_0" in text
    assert (tmp_path / "accuracy_over_iterations.png").stat().st_size > 1000
    assert (tmp_path / "results_pass@4.csv").is_file()


def test_layer_section_tabulates_weight_change_and_importance(tmp_path):
    folder = tmp_path / "analysis"
    folder.mkdir()
    pd.DataFrame({"layer": [0, 1], "weight_change": [0.5, 0.75]}).to_csv(folder / "weight_change.csv", index=False)
    pd.DataFrame({"layer": [0, 1], "importance": [1.5, 0.25]}).to_csv(folder / "importance.csv", index=False)
    rows = [{**ROWS[0], "analysis": None}, {**ROWS[1], "analysis": folder}]
    write_report(tmp_path, rows, "toy_id", (1,))
    text = (tmp_path / "report.md").read_text()
    assert "| IMM · SFT_0 | 0.5 | 0.75 |" in text and "| IMM · SFT_0 | 1.5 | 0.25 |" in text
