"""Tables and plots of a run: accuracy per model (base, SFT_t, Merge_t per strategy) on ID and OOD sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from imm_ray.strategies import STRATEGIES

ALPHA_CONVENTION = (
    "α is the weight of the ORIGINAL base model (the paper's Eq. 6): θ_m = α·θ_base + (1−α)·(θ^t + DARE(θ_SFT − θ^t)); "
    "α = 1 returns the base, α = 0 the (DARE'd) fine-tuned model. The paper's Table 3 reads α the other way round."
)


def model_label(strategy: str, iteration: int | None, role: str) -> str:
    if role == "base":
        return "Base"
    name = STRATEGIES[strategy].label if strategy in STRATEGIES else strategy
    return f"{name} · {'SFT' if role == 'sft' else 'Merge'}_{iteration}"


def results_table(rows: Sequence[dict], id_set: str, metric: str) -> pd.DataFrame:
    """One row per evaluated model, one column per set (ID first) plus the OOD mean, values in percent.

    ``rows`` are dicts with strategy, iteration, role and the metrics frame (columns set, pass@k, ...).
    """
    records = []
    for row in rows:
        metrics = row["metrics"].set_index("set")[metric]
        record = {"model": model_label(row["strategy"], row["iteration"], row["role"]),
                  "strategy": row["strategy"], "iteration": row["iteration"], "role": row["role"]}
        record.update({name: 100 * float(value) for name, value in metrics.items()})
        records.append(record)
    table = pd.DataFrame(records)
    sets = [c for c in table.columns if c not in ("model", "strategy", "iteration", "role")]
    ood = [s for s in sets if s != id_set]
    table = table[["model", "strategy", "iteration", "role", id_set, *ood]]
    if ood:
        table["OOD mean"] = table[ood].mean(axis=1)
    return table


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of already formatted cells: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["strategy", "iteration", "role"])
    rows = [[str(row["model"])] + [f"{row[c]:.1f}" for c in shown.columns[1:]] for _, row in shown.iterrows()]
    return markdown_table(list(shown.columns), rows)


def trajectory(table: pd.DataFrame, strategy: str, column: str) -> tuple[list[int], list[float]]:
    """Accuracy of the model each iteration hands on (the merge if the strategy merges, else the SFT model);
    x = 0 is the base model."""
    base = float(table.loc[table["role"] == "base", column].iloc[0])
    rows = table[table["strategy"] == strategy]
    handed_on = "merge" if (rows["role"] == "merge").any() else "sft"
    rows = rows[rows["role"] == handed_on].sort_values("iteration")
    return [0, *[int(t) + 1 for t in rows["iteration"]]], [base, *rows[column].astype(float)]


def plot_trajectories(table: pd.DataFrame, id_set: str, path: Path, title: str) -> None:
    """ID and OOD-mean accuracy over iterations per strategy, like the paper's Figures 6 and 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [id_set] + (["OOD mean"] if "OOD mean" in table.columns else [])
    figure, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4), squeeze=False)
    strategies = [s for s in dict.fromkeys(table["strategy"]) if s != "base"]
    for axis, column in zip(axes[0], columns):
        for strategy in strategies:
            xs, ys = trajectory(table, strategy, column)
            axis.plot(xs, ys, marker="o", label=STRATEGIES[strategy].label if strategy in STRATEGIES else strategy)
        axis.set_title(f"{'In-domain' if column == id_set else 'Out-of-domain'}: {column}")
        axis.set_xticks(range(int(table["iteration"].max()) + 2))
        axis.set_xlabel("iteration (0 = base)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(run_dir: Path, rows: Sequence[dict], id_set: str, ks: Sequence[int], extra: str = "") -> pd.DataFrame:
    """Write report.md, results CSVs and the trajectory plot; return the pass@1-style table (first k)."""
    run_dir = Path(run_dir)
    sections = [f"# imm-ray report: {run_dir.name}\n", f"> {ALPHA_CONVENTION}\n"]
    first = None
    for k in ks:
        table = results_table(rows, id_set, f"pass@{k}")
        table.to_csv(run_dir / f"results_pass@{k}.csv", index=False)
        sections.append(f"## pass@{k} (%), in-domain `{id_set}` first\n\n{to_markdown(table)}\n")
        first = table if first is None else first
    plot_trajectories(first, id_set, run_dir / "accuracy_over_iterations.png", f"pass@{ks[0]} over iterations")
    sections.append(f"![accuracy over iterations](accuracy_over_iterations.png)\n\n{summarise(first, id_set)}\n")
    sections.append(layer_section(rows, run_dir))
    if extra:
        sections.append(extra)
    (run_dir / "report.md").write_text("\n".join(sections))
    return first


def summarise(table: pd.DataFrame, id_set: str) -> str:
    """Plain sentences on what came out: each strategy's last handed-on model against the base."""
    lines = ["## What came out\n"]
    for strategy in [s for s in dict.fromkeys(table["strategy"]) if s != "base"]:
        parts = []
        for column in [id_set] + (["OOD mean"] if "OOD mean" in table.columns else []):
            _, ys = trajectory(table, strategy, column)
            parts.append(f"{column} {ys[0]:.1f} → {ys[-1]:.1f} ({ys[-1] - ys[0]:+.1f})")
        label = STRATEGIES[strategy].label if strategy in STRATEGIES else strategy
        lines.append(f"- {label}, after the last iteration: " + "; ".join(parts))
    return "\n".join(lines)


def layer_table(rows: Sequence[dict], file: str, column: str) -> pd.DataFrame | None:
    """One row per analysed model, one column per layer (L0, L1, ...)."""
    records = []
    for row in rows:
        folder = row.get("analysis")
        if folder is None or not (Path(folder) / file).is_file():
            continue
        values = pd.read_csv(Path(folder) / file).set_index("layer")[column]
        records.append({"model": model_label(row["strategy"], row["iteration"], row["role"]),
                        **{f"L{layer}": float(v) for layer, v in values.items()}})
    return pd.DataFrame(records) if records else None


def layer_section(rows: Sequence[dict], run_dir: Path) -> str:
    """The paper's Figures 3 and 4 as tables: weight change vs the base and importance, per layer and model."""
    parts = []
    for title, file, column, digits in (
        ("Weight change ΔW^n against the ORIGINAL base (Σ‖W − W_base‖_F over the layer's weight matrices)",
         "weight_change.csv", "weight_change", 3),
        ("Layer importance I^n (Σ|∂L/∂W ⊙ W| on reference solutions)", "importance.csv", "importance", 4),
    ):
        table = layer_table(rows, file, column)
        if table is None:
            continue
        cells = [[str(r["model"])] + [f"{r[c]:.{digits}g}" for c in table.columns[1:]] for _, r in table.iterrows()]
        parts.append(f"### {title}\n\n" + markdown_table(list(table.columns), cells) + "\n")
    if not parts:
        return ""
    note = ("Per-model CSVs and bar plots: `<strategy>/iter_<t>/analysis_{sft,merge}/` "
            "(weight_change.png, importance.png).\n")
    return "## Layer analysis\n\n" + note + "\n" + "\n".join(parts)
