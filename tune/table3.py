"""The paper's Table 3 from sweep trials: one row per data set, one column per merge α, plus Base and SFT.

Pure functions over :class:`TrialOutcome` records (what each Tune trial reported), so the layout is tested without
running a sweep. Outputs: ``table3.md`` (with the α convention), ``table3.csv``, ``table3.png`` (accuracy vs α per
set, matplotlib) and ``trials.csv`` (every trial, failed ones with their error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from imm_ray.report import ALPHA_CONVENTION
from tune.space import TrialParams

SFT_PREFIX = "sft/"
BASE_PREFIX = "base/"
SFT_ID_KEY = "sft_eval"  # the SFT model's evaluation stage: equal ids mean the same SFT model
OOD_MEAN = "OOD mean"
CSV_NOTE = "# α convention: " + ALPHA_CONVENTION


@dataclass(frozen=True)
class TrialOutcome:
    """One trial: its point, what it reported (accuracy in percent per set) or the error it ended with."""

    params: TrialParams
    final: Mapping[str, float] = field(default_factory=dict)  # the model the last iteration hands on
    sft: Mapping[str, float] = field(default_factory=dict)  # the last iteration's SFT model, before merging
    base: Mapping[str, float] = field(default_factory=dict)
    sft_id: str | None = None
    error: str | None = None
    run_dir: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.final)

    @property
    def status(self) -> str:
        """done, failed (it raised), or unfinished (an interrupted sweep: rerunning the command resumes it)."""
        return "done" if self.ok else "failed" if self.error else "unfinished"

    @classmethod
    def from_metrics(cls, params: TrialParams, metrics: Mapping[str, object], sets: Sequence[str],
                     error: str | None = None, run_dir: str | None = None) -> TrialOutcome:
        """Split a flat Tune result (``set``, ``sft/set``, ``base/set``) into the three models' accuracies."""

        def pick(prefix: str) -> dict[str, float]:
            return {s: float(metrics[prefix + s]) for s in sets if prefix + s in metrics}

        sft_id = metrics.get(SFT_ID_KEY)
        return cls(params, pick(""), pick(SFT_PREFIX), pick(BASE_PREFIX), str(sft_id) if sft_id else None,
                   error, run_dir)


def flat_metrics(final: Mapping[str, float], sft: Mapping[str, float], base: Mapping[str, float],
                 sft_id: str) -> dict[str, object]:
    """What a trial reports to Tune: the handed-on model's sets at top level (so ``sweep.metric`` names one)."""
    return {**final, **{SFT_PREFIX + k: v for k, v in sft.items()},
            **{BASE_PREFIX + k: v for k, v in base.items()}, SFT_ID_KEY: sft_id}


def metrics_from_table(table: pd.DataFrame, strategy: str, sft_id: str) -> dict[str, object]:
    """A trial's report from the loop's result table (imm_ray.report.results_table: one row per evaluated model,
    one column per set plus the OOD mean): the model the last iteration hands on (the merge if the strategy
    merges, else the SFT model), that iteration's SFT model, and the base."""
    sets = [c for c in table.columns if c not in ("model", "strategy", "iteration", "role")]
    rows = table[table["strategy"] == strategy]
    if rows.empty:
        raise ValueError(f"the run's table has no rows for strategy {strategy!r}")
    last = rows["iteration"].max()
    handed_on = "merge" if (rows["role"] == "merge").any() else "sft"

    def row(role: str, frame: pd.DataFrame) -> dict[str, float]:
        picked = frame[frame["role"] == role]
        if role != "base":
            picked = picked[picked["iteration"] == last]
        return {s: float(picked.iloc[0][s]) for s in sets}

    return flat_metrics(row(handed_on, rows), row("sft", rows), row("base", table), sft_id)


def column_labels(outcomes: Sequence[TrialOutcome]) -> dict[TrialParams, str]:
    """``α=0.3`` when only α varies across the trials; the drop rate and iteration count join the label when
    they vary too."""
    params = [o.params for o in outcomes]
    vary_p = len({p.drop_rate for p in params}) > 1
    vary_t = len({p.iterations for p in params}) > 1
    labels = {}
    for p in params:
        parts = [f"α={p.alpha:.4g}"] + ([f"p={p.drop_rate:.4g}"] if vary_p else []) + (
            [f"T={p.iterations}"] if vary_t else [])
        labels[p] = ", ".join(parts)
    return labels


def table3(outcomes: Sequence[TrialOutcome], sets: Sequence[str]) -> pd.DataFrame:
    """Rows: the sets (ID first, then OOD, then the OOD mean); columns: Base, each finished trial's merged model
    in order of (iterations, drop rate, α), then SFT (one column per distinct SFT model)."""
    done = sorted((o for o in outcomes if o.ok), key=lambda o: o.params.sort_key)
    if not done:
        return pd.DataFrame(index=pd.Index(list(sets), name="set"))
    labels = column_labels(done)
    columns: dict[str, list[float]] = {"Base": _values(done[0].base, sets)}
    for outcome in done:
        columns[labels[outcome.params]] = _values(outcome.final, sets)
    sft_models = {o.sft_id or labels[o.params]: o for o in done}
    for outcome in sft_models.values():
        name = "SFT" if len(sft_models) == 1 else f"SFT ({labels[outcome.params]})"
        columns[name] = _values(outcome.sft, sets)
    return pd.DataFrame(columns, index=pd.Index(list(sets), name="set"))


def _values(accuracies: Mapping[str, float], sets: Sequence[str]) -> list[float]:
    return [float(accuracies.get(s, math.nan)) for s in sets]


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table, one decimal, missing values as an en dash."""
    header = "| set | " + " | ".join(table.columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in table.columns) + "|"
    rows = [
        f"| {name} | " + " | ".join("–" if math.isnan(v) else f"{v:.1f}" for v in row) + " |"
        for name, row in zip(table.index, table.to_numpy(dtype=float))
    ]
    return "\n".join([header, rule, *rows])


def trials_frame(outcomes: Sequence[TrialOutcome], metric: str) -> pd.DataFrame:
    """Every trial with its point, status, the sweep metric and its error (if any)."""
    return pd.DataFrame([
        {"trial": o.params.label, "alpha": o.params.alpha, "drop_rate": o.params.drop_rate,
         "iterations": o.params.iterations, "status": o.status,
         metric: o.final.get(metric, math.nan), "error": o.error or "", "run_dir": o.run_dir or ""}
        for o in outcomes
    ])


def best_trial(outcomes: Sequence[TrialOutcome], metric: str) -> TrialOutcome | None:
    scored = [o for o in outcomes if o.ok and metric in o.final]
    return max(scored, key=lambda o: o.final[metric]) if scored else None


def plot_table3(outcomes: Sequence[TrialOutcome], sets: Sequence[str], path: Path, ylabel: str) -> None:
    """Accuracy vs α, one panel per set, one line per (drop rate, iterations); Base and SFT as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [o for o in outcomes if o.ok]
    columns = min(len(sets), 4)
    rows = math.ceil(len(sets) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows + 0.6), squeeze=False)
    for axis, name in zip(axes.flat, sets):
        _plot_set(axis, done, name, ylabel)
    for axis in list(axes.flat)[len(sets):]:
        axis.set_visible(False)
    figure.suptitle(f"{ylabel} vs merge α (α = weight of the ORIGINAL base, Eq. 6: α=1 is the base)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_set(axis, done: Sequence[TrialOutcome], name: str, ylabel: str) -> None:
    groups: dict[tuple[float, int], list[TrialOutcome]] = {}
    for outcome in done:
        groups.setdefault((outcome.params.drop_rate, outcome.params.iterations), []).append(outcome)
    for (drop_rate, iterations), members in sorted(groups.items()):
        members = sorted(members, key=lambda o: o.params.alpha)
        axis.plot([o.params.alpha for o in members], [o.final.get(name, math.nan) for o in members], marker="o",
                  label=f"merge (p={drop_rate:g}, T={iterations})")
    if done:
        axis.axhline(done[0].base.get(name, math.nan), color="grey", linestyle="--", label="Base")
        sft_models = {o.sft_id or o.params.label: o for o in done}
        if len(sft_models) == 1:
            axis.axhline(done[0].sft.get(name, math.nan), color="black", linestyle=":", label="SFT")
    axis.set_title(name)
    axis.set_xlabel("α")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if done:
        axis.legend(fontsize=7)


@dataclass(frozen=True)
class Table3Files:
    markdown: Path
    csv: Path
    plot: Path
    trials: Path


def write_table3(folder: Path, outcomes: Sequence[TrialOutcome], sets: Sequence[str], *, metric: str,
                 value_name: str, heading: str, notes: Sequence[str] = ()) -> tuple[pd.DataFrame, Table3Files]:
    """Write table3.md / .csv / .png and trials.csv into ``folder``; return the table and the paths.

    ``value_name`` says what the numbers are (e.g. ``pass@1 (%)``); ``notes`` are extra markdown paragraphs
    (sweep settings, wall time).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = Table3Files(folder / "table3.md", folder / "table3.csv", folder / "table3.png", folder / "trials.csv")
    table = table3(outcomes, sets)
    files.csv.write_text(CSV_NOTE + "\n" + table.to_csv())
    trials_frame(outcomes, metric).to_csv(files.trials, index=False)
    plot_table3(outcomes, sets, files.plot, value_name)
    files.markdown.write_text(_markdown(table, outcomes, metric, value_name, heading, notes, files.plot.name))
    return table, files


def _markdown(table: pd.DataFrame, outcomes: Sequence[TrialOutcome], metric: str, value_name: str, heading: str,
              notes: Sequence[str], plot_name: str) -> str:
    sections = [f"# {heading}\n", f"> {ALPHA_CONVENTION}\n", f"Values: {value_name}.\n", *[f"{n}\n" for n in notes],
                to_markdown(table) + "\n", f"![{value_name} vs α]({plot_name})\n"]
    best = best_trial(outcomes, metric)
    if best is not None:
        sections.append(f"Best trial by `{metric}`: {best.params.label} ({best.final[metric]:.1f}).\n")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        sections.append("## Failed trials\n")
        sections.extend(f"- {o.params.label}: {o.error}" for o in failed)
        sections.append("")
    unfinished = [o for o in outcomes if o.status == "unfinished"]
    if unfinished:
        sections.append("## Unfinished trials (run the same command again to resume them)\n")
        sections.extend(f"- {o.params.label}" for o in unfinished)
        sections.append("")
    return "\n".join(sections)
