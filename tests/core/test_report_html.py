"""report.html: beside report.md, self-contained (plots embedded, nothing fetched), the headline at the top."""

from __future__ import annotations

import re

import pandas as pd

from imm_ray.report import write_report
from test_report import MERGE_OOD, _rows

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", re.IGNORECASE)


def _analysis(folder, scale):
    folder.mkdir(parents=True)
    pd.DataFrame({"layer": range(4), "weight_change": [scale * v for v in (1, 3, 2, 1)]}).to_csv(
        folder / "weight_change.csv", index=False)
    pd.DataFrame({"layer": range(4), "importance": [2.0, 0.5, 0.75, 1.0]}).to_csv(folder / "importance.csv",
                                                                                   index=False)
    return folder


def test_report_html_is_self_contained_and_opens_with_the_headline(tmp_path):
    rows = _rows(tmp_path, 40, MERGE_OOD)
    for row in rows:
        if row["role"] != "base":
            row["analysis"] = _analysis(tmp_path / f"an_{row['strategy']}_{row['role']}_{row['seed']}",
                                        1 + row["seed"] + (row["role"] == "sft"))
    write_report(tmp_path, rows, "toy_id", (1, 2))
    page = (tmp_path / "report.html").read_text()
    assert not EXTERNAL.search(page) and "<script" not in page and "<link" not in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") and len(src) > 5000 for src in images)
    summary = re.search(r'<h2 id="summary">Summary</h2>\s*<p>(.*?)</p>', page, re.S).group(1)
    assert "<strong>IMM · Merge_0</strong> (A) against <strong>STaR (vanilla) · SFT_0</strong>" in summary
    assert re.search(r"on the OOD mean: .*\[[+-]\d+\.\d, [+-]\d+\.\d\]", summary)  # the interval
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    assert headings[0] == "Summary" and headings.index("Figures") > headings.index("Paired comparisons")
    assert (tmp_path / "layers.png").stat().st_size > 5000  # weight change and importance per layer
    markdown = (tmp_path / "report.md").read_text()
    assert "![weight change and importance per layer](layers.png)" in markdown
