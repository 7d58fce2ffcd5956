"""``imm-ray run``'s printed table: every cell with its interval, within 100 columns for the toy's four columns."""

from __future__ import annotations

import pandas as pd
from rich.console import Console

from imm_ray.cli.run import _rich_table


def test_run_table_shows_intervals_and_fits_100_columns():
    sets = ["toy_id", "toy_ood_compare", "toy_ood_distractor", "OOD mean"]
    record = {"strategy": "accumulation", "iteration": 2, "role": "sft", "seeds": 3}
    for name in sets:
        record.update({name: 55.25, f"{name} low": 45.1, f"{name} high": 65.0, f"{name} questions": 48.0,
                       f"{name} samples": 4.0})
    frame = pd.DataFrame([{"model": "Data accumulation · SFT_2", **record},
                          {"model": "Base", **record, "toy_id low": float("nan")}])
    console = Console(width=100, record=True)
    console.print(_rich_table(frame, "pass@1 (%)"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert text.count("55.2 [45, 65]") == 7 and "Data accumulation · SFT_2" in text
    assert "questions" not in text and "seeds" in text  # counts are not set columns; the caption names seeds
