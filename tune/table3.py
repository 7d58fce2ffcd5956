"""The paper's Table 3 from sweep trials: one row per data set, one column per merge α, plus Base and SFT.

Pure functions over :class:`TrialOutcome` records (what each Tune trial reported), so the layout is tested without
running a sweep. Outputs: ``table3.md`` (with the α convention; cells ``value [low, high]``, the 95% interval of
imm_ray/stats.py over questions, pooled over seeds when a trial ran several), ``table3.csv`` (value columns and
``<column> low`` / ``<column> high``), ``table3.png`` (accuracy vs α per set with error bars, matplotlib) and
``trials.csv`` (every trial, failed ones with their error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from imm_ray.report import ALPHA_CONVENTION, HIGH, LOW, QUESTIONS, SAMPLES, set_columns
from imm_ray.stats import BOOTSTRAP_METHOD, POOLED_METHOD
from tune.space import TrialParams

SFT_PREFIX = "sft/"
BASE_PREFIX = "base/"
SFT_ID_KEY = "sft_eval"  # the SFT model's evaluation stage: equal ids mean the same SFT model
OOD_MEAN = "OOD mean"
CSV_NOTE = "# α convention: " + ALPHA_CONVENTION
SEEDS_KEY = "seeds"


@dataclass(frozen=True)
class TrialOutcome:
    """One trial: its point, what it reported or the error it ended with.

    ``final``, ``sft`` and ``base`` map each set to its accuracy in percent and, where the trial reported them,
    ``<set> low`` / ``<set> high`` (95% interval) and ``<set> questions`` / ``<set> samples`` (counts).
    """

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
            keys = [s + suffix for s in sets for suffix in ("", LOW, HIGH, QUESTIONS, SAMPLES)]
            return {key: float(metrics[prefix + key]) for key in keys if prefix + key in metrics}

        sft_id = metrics.get(SFT_ID_KEY)
        final = pick("") | ({SEEDS_KEY: float(metrics[SEEDS_KEY])} if SEEDS_KEY in metrics else {})
        return cls(params, final, pick(SFT_PREFIX), pick(BASE_PREFIX), str(sft_id) if sft_id else None,
                   error, run_dir)


def flat_metrics(final: Mapping[str, float], sft: Mapping[str, float], base: Mapping[str, float],
                 sft_id: str) -> dict[str, object]:
    """What a trial reports to Tune: the handed-on model's sets at top level (so ``sweep.metric`` names one)."""
    return {**final, **{SFT_PREFIX + k: v for k, v in sft.items()},
            **{BASE_PREFIX + k: v for k, v in base.items()}, SFT_ID_KEY: sft_id}


def metrics_from_table(table: pd.DataFrame, strategy: str, sft_id: str) -> dict[str, object]:
    """A trial's report from the loop's result table (imm_ray.report.results_table: one row per evaluated model,
    per set and the OOD mean its value, ``low``, ``high`` and counts): the model the last iteration hands on (the
    merge if the strategy merges, else the SFT model), that iteration's SFT model, and the base; the seeds count."""
    sets = set_columns(table)
    keys = [c for c in table.columns if c in sets or any(c == s + x for s in sets for x in (LOW, HIGH, QUESTIONS,
                                                                                              SAMPLES))]
    rows = table[table["strategy"] == strategy]
    if rows.empty:
        raise ValueError(f"the run's table has no rows for strategy {strategy!r}")
    last = rows["iteration"].max()
    handed_on = "merge" if (rows["role"] == "merge").any() else "sft"

    def row(role: str, frame: pd.DataFrame) -> dict[str, float]:
        picked = frame[frame["role"] == role]
        if role != "base":
            picked = picked[picked["iteration"] == last]
        return {key: float(picked.iloc[0][key]) for key in keys if not math.isnan(float(picked.iloc[0][key]))}

    flat = flat_metrics(row(handed_on, rows), row("sft", rows), row("base", table), sft_id)
    if SEEDS_KEY in table.columns:
        flat[SEEDS_KEY] = int(rows[SEEDS_KEY].max())
    return flat


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


def table3(outcomes: Sequence[TrialOutcome], sets: Sequence[str], suffix: str = "") -> pd.DataFrame:
    """Rows: the sets (ID first, then OOD, then the OOD mean); columns: Base, each finished trial's merged model
    in order of (iterations, drop rate, α), then SFT (one column per distinct SFT model). ``suffix`` LOW or HIGH
    gives the interval bounds in the same layout (NaN where a trial reported none)."""
    done = sorted((o for o in outcomes if o.ok), key=lambda o: o.params.sort_key)
    if not done:
        return pd.DataFrame(index=pd.Index(list(sets), name="set"))
    labels = column_labels(done)
    columns: dict[str, list[float]] = {"Base": _values(done[0].base, sets, suffix)}
    for outcome in done:
        columns[labels[outcome.params]] = _values(outcome.final, sets, suffix)
    sft_models = {o.sft_id or labels[o.params]: o for o in done}
    for outcome in sft_models.values():
        name = "SFT" if len(sft_models) == 1 else f"SFT ({labels[outcome.params]})"
        columns[name] = _values(outcome.sft, sets, suffix)
    return pd.DataFrame(columns, index=pd.Index(list(sets), name="set"))


def table3_bounds(outcomes: Sequence[TrialOutcome], sets: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The 95% interval's low and high ends, laid out as :func:`table3`."""
    return table3(outcomes, sets, LOW), table3(outcomes, sets, HIGH)


def _values(accuracies: Mapping[str, float], sets: Sequence[str], suffix: str = "") -> list[float]:
    return [float(accuracies.get(s + suffix, math.nan)) for s in sets]


def to_markdown(table: pd.DataFrame, low: pd.DataFrame | None = None, high: pd.DataFrame | None = None) -> str:
    """A GitHub markdown table, one decimal, ``value [low, high]`` where the bounds are known, missing values as an
    en dash."""
    header = "| set | " + " | ".join(table.columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in table.columns) + "|"
    rows = [f"| {name} | " + " | ".join(_cell(table, low, high, name, column) for column in table.columns) + " |"
            for name in table.index]
    return "\n".join([header, rule, *rows])


def _cell(table: pd.DataFrame, low: pd.DataFrame | None, high: pd.DataFrame | None, row: str, column: str) -> str:
    value = float(table.loc[row, column])
    if math.isnan(value):
        return "–"
    if low is None or high is None or math.isnan(float(low.loc[row, column])):
        return f"{value:.1f}"
    return f"{value:.1f} [{float(low.loc[row, column]):.1f}, {float(high.loc[row, column]):.1f}]"


def counts_note(outcomes: Sequence[TrialOutcome], sets: Sequence[str]) -> str:
    """Questions per set, samples per question and seeds behind the cells, and how the intervals were made."""
    done = [o for o in outcomes if o.ok]
    counts = sorted({(s, int(o.base[s + QUESTIONS]), int(o.base[s + SAMPLES])) for o in done for s in sets
                     if s + QUESTIONS in o.base}, key=lambda c: list(sets).index(c[0]))
    seeds = sorted({int(o.final.get(SEEDS_KEY, 1)) for o in done})
    shown = "; ".join(f"`{s}` {q} questions × {m} samples" for s, q, m in counts) or "not reported by the trials"
    method = BOOTSTRAP_METHOD if seeds in ([], [1]) else f"{BOOTSTRAP_METHOD}; several seeds: {POOLED_METHOD}"
    return (f"Counts: {shown}; seeds per trial: {', '.join(map(str, seeds)) or '–'}. Cells: value [95% interval] "
            f"({method}; OOD mean: each OOD set's questions resampled on their own). Two columns differ only where "
            "a paired comparison resolves it (each trial's report.md); overlapping or disjoint intervals here are "
            "not that test.")


def trials_frame(outcomes: Sequence[TrialOutcome], metric: str) -> pd.DataFrame:
    """Every trial with its point, status, the sweep metric with its interval, and its error (if any)."""
    return pd.DataFrame([
        {"trial": o.params.label, "alpha": o.params.alpha, "drop_rate": o.params.drop_rate,
         "iterations": o.params.iterations, "status": o.status,
         metric: o.final.get(metric, math.nan), metric + LOW: o.final.get(metric + LOW, math.nan),
         metric + HIGH: o.final.get(metric + HIGH, math.nan), "error": o.error or "", "run_dir": o.run_dir or ""}
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
        values = [o.final.get(name, math.nan) for o in members]
        below = [v - o.final.get(name + LOW, v) for o, v in zip(members, values)]
        above = [o.final.get(name + HIGH, v) - v for o, v in zip(members, values)]
        axis.errorbar([o.params.alpha for o in members], values, yerr=[below, above], marker="o", capsize=3,
                      label=f"merge (p={drop_rate:g}, T={iterations}), 95% interval")
    if done:
        _reference(axis, done[0].base, name, "grey", "--", "Base")
        sft_models = {o.sft_id or o.params.label: o for o in done}
        if len(sft_models) == 1:
            _reference(axis, done[0].sft, name, "black", ":", "SFT")
    axis.set_title(name)
    axis.set_xlabel("α")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if done:
        axis.legend(fontsize=7)


def _reference(axis, accuracies: Mapping[str, float], name: str, color: str, style: str, label: str) -> None:
    """A horizontal line for Base or SFT, with its 95% interval as a light band where known."""
    axis.axhline(accuracies.get(name, math.nan), color=color, linestyle=style, label=label)
    if name + LOW in accuracies:
        axis.axhspan(accuracies[name + LOW], accuracies[name + HIGH], color=color, alpha=0.08)


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
    low, high = table3_bounds(outcomes, sets)
    files.csv.write_text(CSV_NOTE + "\n" + csv_frame(table, low, high).to_csv())
    trials_frame(outcomes, metric).to_csv(files.trials, index=False)
    plot_table3(outcomes, sets, files.plot, value_name)
    text = _markdown(table, (low, high), outcomes, metric, value_name, heading, notes, files.plot.name)
    files.markdown.write_text(text)
    return table, files


def csv_frame(table: pd.DataFrame, low: pd.DataFrame, high: pd.DataFrame) -> pd.DataFrame:
    """The value columns, then ``<column> low`` and ``<column> high`` for each (empty where not reported)."""
    return pd.concat([table, low.add_suffix(LOW), high.add_suffix(HIGH)], axis=1)


def _markdown(table: pd.DataFrame, bounds: tuple[pd.DataFrame, pd.DataFrame], outcomes: Sequence[TrialOutcome],
              metric: str, value_name: str, heading: str, notes: Sequence[str], plot_name: str) -> str:
    sets = list(table.index)
    sections = [f"# {heading}\n", f"> {ALPHA_CONVENTION}\n", f"Values: {value_name}.\n", *[f"{n}\n" for n in notes],
                counts_note(outcomes, sets) + "\n", to_markdown(table, *bounds) + "\n",
                f"![{value_name} vs α]({plot_name})\n"]
    best = best_trial(outcomes, metric)
    if best is not None:
        interval = (f" [{best.final[metric + LOW]:.1f}, {best.final[metric + HIGH]:.1f}]"
                    if metric + LOW in best.final else "")
        sections.append(f"Best trial by `{metric}`: {best.params.label} ({best.final[metric]:.1f}{interval}): the "
                        "highest point value, not a resolved difference from the other trials.\n")
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
