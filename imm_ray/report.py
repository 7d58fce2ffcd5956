"""Tables and plots of a run: pass@k per model (base, SFT_t, Merge_t per strategy) on ID and OOD sets, each with
its 95% interval, paired comparisons on the same questions, seeds pooled, and collapse diagnostics.

The numbers come from each evaluation's samples.parquet (per-question counts), not only its metrics.csv, so every
value carries an interval over questions and two models are compared question by question (imm_ray/stats.py).
A difference whose interval contains 0 is reported as "not resolved"; only resolved differences are worded as
higher or lower. Rows (one per evaluated model and seed) are dicts with the keys of :data:`ROW_KEYS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imm_ray import diagnostics, pattern, stats
from imm_ray.strategies import STRATEGIES

ALPHA_CONVENTION = (
    "α is the weight of the ORIGINAL base model (the paper's Eq. 6): θ_m = α·θ_base + (1−α)·(θ^t + DARE(θ_SFT − θ^t)); "
    "α = 1 returns the base, α = 0 the (DARE'd) fine-tuned model. The paper's Table 3 reads α the other way round."
)
ROW_KEYS = ("strategy", "iteration", "role", "seed", "metrics", "samples", "generation", "analysis")
OOD_MEAN = "OOD mean"
META_COLUMNS = ("model", "strategy", "iteration", "role", "seeds")
LOW, HIGH, QUESTIONS, SAMPLES = " low", " high", " questions", " samples"
SUFFIXES = (LOW, HIGH, QUESTIONS, SAMPLES)
SAMPLE_COLUMNS = ["question_id", "set_name", "completion", "extracted", "correct"]
TRAJECTORY_PNG = "accuracy_over_iterations.png"
LAYERS_PNG = "layers.png"


# ---- the models of a run -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # compared by identity: a Run holds a DataFrame, whose == is elementwise
class Run:
    """One evaluation of a model: the seeds it stands for (the base is often one evaluation for every seed)."""

    seeds: tuple[int, ...]
    metrics: pd.DataFrame
    samples: Path | None
    generation: Path | None
    analysis: Path | None


@dataclass(frozen=True)
class Model:
    """One evaluated model (strategy, iteration, role) with its evaluation per seed."""

    strategy: str
    iteration: int | None
    role: str
    runs: tuple[Run, ...]

    @property
    def label(self) -> str:
        return model_label(self.strategy, self.iteration, self.role)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted({s for run in self.runs for s in run.seeds}))

    def run_for(self, seed: int) -> Run | None:
        """The evaluation of ``seed``; a model evaluated once (the base) stands for every seed."""
        match = [run for run in self.runs if seed in run.seeds]
        return match[0] if match else self.runs[0] if len(self.runs) == 1 else None


def model_label(strategy: str, iteration: int | None, role: str) -> str:
    if role == "base":
        return "Base"
    name = STRATEGIES[strategy].label if strategy in STRATEGIES else strategy
    return f"{name} · {'SFT' if role == 'sft' else 'Merge'}_{iteration}"


def collect_models(rows: Sequence[dict]) -> list[Model]:
    """Rows grouped by model in first-seen order; rows of one model with the same samples file are one run."""
    grouped: dict[tuple, dict[object, dict]] = {}
    for row in rows:
        key = (row["strategy"], row["iteration"], row["role"])
        samples = row.get("samples")
        identity = Path(samples).resolve() if samples is not None else ("seed", row.get("seed", 0))
        grouped.setdefault(key, {}).setdefault(identity, {"rows": []})["rows"].append(row)
    models = []
    for (strategy, iteration, role), runs in grouped.items():
        built = [Run(tuple(sorted({int(r.get("seed", 0) or 0) for r in g["rows"]})), g["rows"][0]["metrics"],
                     _path(g["rows"][0].get("samples")), _path(g["rows"][0].get("generation")),
                     _path(g["rows"][0].get("analysis"))) for g in runs.values()]
        models.append(Model(strategy, iteration, role, tuple(sorted(built, key=lambda r: r.seeds))))
    return models


def _path(value) -> Path | None:
    return Path(value) if value is not None else None


class ScoreBook:
    """Per-question counts of each evaluation's samples, read once; ``None`` where a run has no samples file."""

    def __init__(self) -> None:
        self._scores: dict[tuple[Path, int], dict[str, pd.Series]] = {}
        self._frames: dict[Path, pd.DataFrame] = {}

    def frame(self, path: Path | None) -> pd.DataFrame | None:
        if path is None or not Path(path).is_file():
            return None
        if path not in self._frames:
            self._frames[path] = pd.read_parquet(path, columns=SAMPLE_COLUMNS)
        return self._frames[path]

    def scores(self, run: Run, k: int, sets: Sequence[str]) -> dict[str, pd.Series] | None:
        frame = self.frame(run.samples)
        if frame is None:
            return None
        if (run.samples, k) not in self._scores:
            self._scores[run.samples, k] = stats.set_scores(stats.question_counts(frame), k)
        scores = self._scores[run.samples, k]
        return {name: scores[name] for name in sets} if all(name in scores for name in sets) else None


def set_names(models: Sequence[Model], id_set: str) -> tuple[list[str], list[str]]:
    """(every set, ID first; the OOD sets) in the order the evaluations list them."""
    names = list(dict.fromkeys(str(s) for m in models for r in m.runs for s in r.metrics["set"]))
    ood = [s for s in names if s != id_set]
    return ([id_set] if id_set in names else []) + ood, ood


# ---- estimates -----------------------------------------------------------------------------------------------
def model_estimate(model: Model, sets: Sequence[str], k: int, book: ScoreBook) -> stats.Estimate | None:
    """pass@k of the mean over ``sets`` (one set, or the OOD sets), pooled over the model's seeds, in percent."""
    scores = [book.scores(run, k, sets) for run in model.runs]
    if all(s is not None for s in scores):
        return stats.estimate(scores).scaled(100)
    return _metrics_estimate(model, sets, k)


def _metrics_estimate(model: Model, sets: Sequence[str], k: int) -> stats.Estimate | None:
    """Without samples: the metrics' point values (mean over seeds); the interval only for one set and one run."""
    column = f"pass@{k}"
    values = []
    for run in model.runs:
        frame = run.metrics.set_index("set")
        if column not in frame.columns or not all(s in frame.index for s in sets):
            return None
        values.append(float(frame.loc[list(sets), column].mean()))
    value = 100 * float(np.mean(values))
    low = high = float("nan")
    if len(sets) == 1 and len(model.runs) == 1 and f"{column}_low" in frame.columns:
        low, high = 100 * float(frame.loc[sets[0], f"{column}_low"]), 100 * float(frame.loc[sets[0], f"{column}_high"])
    return stats.Estimate(value, low, high, "from metrics.csv (no samples)", len(model.runs))


def difference(a: Model, b: Model, sets: Sequence[str], k: int, book: ScoreBook) -> stats.Estimate | None:
    """A − B in points on the same questions, paired seed by seed, pooled over seeds; None without samples."""
    pairs = []
    for seed in sorted(set(a.seeds) | set(b.seeds)):
        runs = (a.run_for(seed), b.run_for(seed))
        if None not in runs and runs not in pairs:
            pairs.append(runs)
    scored = [(book.scores(x, k, sets), book.scores(y, k, sets)) for x, y in pairs]
    if not scored or any(x is None or y is None for x, y in scored):
        return None
    return stats.paired_difference([x for x, _ in scored], [y for _, y in scored]).scaled(100)


# ---- the results table ---------------------------------------------------------------------------------------
def results_table(rows: Sequence[dict], id_set: str, metric: str, book: ScoreBook | None = None) -> pd.DataFrame:
    """One row per evaluated model; per set (ID first), then the OOD mean: value, low, high in percent, pooled over
    seeds; per set also questions and samples per question. ``metric`` is ``pass@k``."""
    models = collect_models(rows)
    return model_table(models, id_set, int(metric.split("@")[1]), book or ScoreBook())


def model_table(models: Sequence[Model], id_set: str, k: int, book: ScoreBook) -> pd.DataFrame:
    sets, ood = set_names(models, id_set)
    columns = [(name, [name]) for name in sets] + ([(OOD_MEAN, ood)] if ood else [])
    records = []
    for model in models:
        record: dict[str, object] = {"model": model.label, "strategy": model.strategy, "iteration": model.iteration,
                                     "role": model.role, "seeds": len(model.seeds)}
        for name, members in columns:
            result = model_estimate(model, members, k, book)
            record.update(_cells(name, result))
        for name in sets:
            record.update(_counts(model, name))
        records.append(record)
    return pd.DataFrame(records)


def _cells(name: str, result: stats.Estimate | None) -> dict[str, float]:
    nan = float("nan")
    if result is None:
        return {name: nan, name + LOW: nan, name + HIGH: nan}
    return {name: result.value, name + LOW: result.low, name + HIGH: result.high}


def _counts(model: Model, name: str) -> dict[str, float]:
    frame = model.runs[0].metrics.set_index("set")
    if name not in frame.index or "questions" not in frame.columns:
        return {name + QUESTIONS: float("nan"), name + SAMPLES: float("nan")}
    return {name + QUESTIONS: float(frame.loc[name, "questions"]), name + SAMPLES: float(frame.loc[name, "samples"])}


def set_columns(table: pd.DataFrame) -> list[str]:
    """The value columns of a results table: the sets, ID first, and the OOD mean."""
    return [c for c in table.columns if c not in META_COLUMNS and not str(c).endswith(SUFFIXES)]


def cell(value: float, low: float, high: float, digits: int = 1, sign: bool = False) -> str:
    """``value [low, high]``; the value alone when there is no interval."""
    if pd.isna(value):
        return "–"
    shown = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return shown if pd.isna(low) else f"{shown} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of already formatted cells: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame) -> str:
    """The results table as ``value [low, high]`` cells in percent."""
    names = set_columns(table)
    rows = [[str(row["model"])] + [cell(row[c], row[c + LOW], row[c + HIGH]) for c in names]
            for _, row in table.iterrows()]
    return markdown_table(["model", *names], rows)


# ---- trajectories and plots ----------------------------------------------------------------------------------
def trajectory(table: pd.DataFrame, strategy: str, column: str) -> tuple[list[int], list[float]]:
    """Accuracy of the model each iteration hands on (the merge if the strategy merges, else the SFT model);
    x = 0 is the base model."""
    xs, band = trajectory_band(table, strategy, column)
    return xs, list(band[:, 0])


def trajectory_band(table: pd.DataFrame, strategy: str, column: str) -> tuple[list[int], np.ndarray]:
    """As :func:`trajectory`, with the interval: an array of (value, low, high) per x."""
    picked = [column, column + LOW, column + HIGH]
    base = table.loc[table["role"] == "base", picked].iloc[0].to_numpy(dtype=float)
    rows = table[table["strategy"] == strategy]
    handed_on = "merge" if (rows["role"] == "merge").any() else "sft"
    rows = rows[rows["role"] == handed_on].sort_values("iteration")
    values = np.vstack([base, rows[picked].to_numpy(dtype=float)])
    return [0, *[int(t) + 1 for t in rows["iteration"]]], values


def strategies_of(table: pd.DataFrame) -> list[str]:
    return [s for s in dict.fromkeys(table["strategy"]) if s != "base"]


def plot_trajectories(table: pd.DataFrame, id_set: str, path: Path, title: str) -> None:
    """ID and OOD-mean pass@k over iterations per strategy with 95% bands, on a 0–100 axis (paper Figs. 6, 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [id_set] + ([OOD_MEAN] if OOD_MEAN in table.columns else [])
    figure, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4), squeeze=False)
    for axis, column in zip(axes[0], columns):
        for strategy in strategies_of(table):
            xs, band = trajectory_band(table, strategy, column)
            name = STRATEGIES[strategy].label if strategy in STRATEGIES else strategy
            line, = axis.plot(xs, band[:, 0], marker="o", label=name)
            if not np.isnan(band[:, 1:]).all():
                axis.fill_between(xs, band[:, 1], band[:, 2], color=line.get_color(), alpha=0.15, linewidth=0)
        axis.set_title(f"{'In-domain' if column == id_set else 'Out-of-domain'}: {column}")
        axis.set_xticks(range(int(table["iteration"].max()) + 2))
        axis.set_ylim(0, 100)
        axis.set_xlabel("iteration (0 = base)")
        axis.set_ylabel("accuracy (%), 95% band")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- paired comparisons --------------------------------------------------------------------------------------
def handed_on(models: Sequence[Model], strategy: str) -> dict[int, Model]:
    """The model each iteration of ``strategy`` hands on: the merge if the strategy merges, else the SFT model."""
    own = [m for m in models if m.strategy == strategy and m.role != "base"]
    role = "merge" if any(m.role == "merge" for m in own) else "sft"
    return {int(m.iteration): m for m in own if m.role == role}


def comparison_pairs(models: Sequence[Model]) -> list[tuple[Model, Model]]:
    """Every strategy's model at every iteration against the base; IMM's handed-on model against every other
    strategy's at the same iteration."""
    base = next((m for m in models if m.role == "base"), None)
    pairs = [(m, base) for m in models if base is not None and m.role != "base"]
    imm = handed_on(models, "imm")
    for strategy in dict.fromkeys(m.strategy for m in models):
        if strategy in ("imm", "base"):
            continue
        other = handed_on(models, strategy)
        pairs += [(imm[t], other[t]) for t in sorted(imm) if t in other]
    return pairs


def comparison_frame(models: Sequence[Model], id_set: str, ks: Sequence[int], book: ScoreBook) -> pd.DataFrame:
    """Long table: one row per (k, comparison, set or OOD mean) with the difference A − B in points."""
    sets, ood = set_names(models, id_set)
    columns = [(name, [name]) for name in sets] + ([(OOD_MEAN, ood)] if ood else [])
    records = []
    for k in ks:
        for a, b in comparison_pairs(models):
            for name, members in columns:
                result = difference(a, b, members, k, book)
                if result is not None:
                    records.append({"k": k, "comparison": f"{a.label} − {b.label}", "a": a.label, "b": b.label,
                                    "set": name, "difference": result.value, "low": result.low,
                                    "high": result.high, "resolved": result.resolved, "seeds": result.seeds,
                                    "method": result.method})
    return pd.DataFrame(records, columns=["k", "comparison", "a", "b", "set", "difference", "low", "high",
                                          "resolved", "seeds", "method"])


def verdict(resolved: bool) -> str:
    return "resolved" if resolved else "not resolved"


def comparison_markdown(frame: pd.DataFrame, k: int) -> str:
    """One row per comparison, one column per set: ``+d [low, high] resolved`` or ``... not resolved``."""
    shown = frame[frame["k"] == k]
    names = list(dict.fromkeys(shown["set"]))
    rows = []
    for label, group in shown.groupby("comparison", sort=False):
        by_set = group.set_index("set")
        rows.append([label] + [_comparison_cell(by_set.loc[name]) if name in by_set.index else "–" for name in names])
    return markdown_table(["A − B", *names], rows)


def _comparison_cell(row: pd.Series) -> str:
    return f"{cell(row['difference'], row['low'], row['high'], sign=True)} {verdict(bool(row['resolved']))}"


def difference_phrase(row: pd.Series, where: str, subject: str = "A") -> str:
    """Words for one difference: higher/lower only when resolved; otherwise the interval and "not resolved"."""
    shown = f"{abs(row['difference']):.1f} points [{row['low']:+.1f}, {row['high']:+.1f}]"
    if row["resolved"]:
        side = "higher" if row["difference"] > 0 else "lower"
        return f"{where}: {subject} is {side} by {shown} (resolved: the 95% interval excludes 0)"
    return (f"{where}: the difference is {row['difference']:+.1f} points [{row['low']:+.1f}, {row['high']:+.1f}], "
            "not resolved (the 95% interval contains 0)")


def headline(models: Sequence[Model], frame: pd.DataFrame, id_set: str, k: int) -> str:
    """The run in one sentence: IMM's last merged model against vanilla STaR's last model, OOD mean and ID."""
    imm, vanilla = handed_on(models, "imm"), handed_on(models, "vanilla")
    if not imm or not vanilla:
        present = ", ".join(s for s in dict.fromkeys(m.strategy for m in models) if s != "base")
        return (f"The headline comparison (IMM's last merged model against vanilla STaR's last model) needs both "
                f"strategies in the run; this run has: {present or 'none'}. The tables below compare each model "
                "with the base.")
    a, b = imm[max(imm)], vanilla[max(vanilla)]
    rows = frame[(frame["k"] == k) & (frame["a"] == a.label) & (frame["b"] == b.label)].set_index("set")
    if rows.empty:
        return f"No paired comparison of {a.label} and {b.label}: their evaluation samples were not found."
    seeds = int(rows["seeds"].max())
    where = [(OOD_MEAN, "on the OOD mean")] if OOD_MEAN in rows.index else []
    where += [(id_set, f"on the ID set `{id_set}`")] if id_set in rows.index else []
    parts = [difference_phrase(rows.loc[name], text, "IMM's") for name, text in where]
    pooled = f"pooled over {seeds} seeds" if seeds > 1 else "one seed"
    return f"**{a.label}** (A) against **{b.label}** (B), pass@{k}, {pooled}, A − B: " + "; ".join(parts) + "."


def what_came_out(frame: pd.DataFrame, k: int) -> str:
    """Which differences are resolved and which are not, per comparison, in words."""
    lines = ["## What came out\n"]
    shown = frame[frame["k"] == k]
    if shown.empty:
        return "\n".join(lines + ["No paired comparisons: the evaluations' samples were not found.\n"])
    lines.append(f"pass@{k}, A − B on the same questions (points). Only resolved differences are read as higher or "
                 "lower; a difference that is not resolved is not read in either direction.\n")
    for label, group in shown.groupby("comparison", sort=False):
        resolved = [f"{'higher' if r['difference'] > 0 else 'lower'} on {r['set']} "
                    f"({cell(r['difference'], r['low'], r['high'], sign=True)})"
                    for _, r in group.iterrows() if r["resolved"]]
        open_ = [f"{r['set']} ({cell(r['difference'], r['low'], r['high'], sign=True)})"
                 for _, r in group.iterrows() if not r["resolved"]]
        parts = ([f"resolved: A is {'; '.join(resolved)}"] if resolved else []) + (
            [f"not resolved on {', '.join(open_)}"] if open_ else [])
        lines.append(f"- {label}: " + "; ".join(parts))
    total, done = len(frame), int(frame["resolved"].sum())
    lines.append(f"\nAcross every k and set: {done} of {total} paired differences are resolved "
                 f"(all in comparisons.csv).\n")
    return "\n".join(lines)


def pattern_section(models: Sequence[Model], frame: pd.DataFrame, id_set: str, k: int) -> str:
    """imm_ray.pattern's criteria on IMM's and vanilla STaR's last models; empty unless the run has both."""
    imm, vanilla = handed_on(models, "imm"), handed_on(models, "vanilla")
    base = next((m for m in models if m.role == "base"), None)
    if not imm or not vanilla or base is None:
        return ""
    labels = {"imm": imm[max(imm)].label, "vanilla": vanilla[max(vanilla)].label, "base": base.label}
    return pattern.markdown(pattern.check(frame, labels, {"id": id_set, "ood": OOD_MEAN}, k), k)


# ---- collapse diagnostics ------------------------------------------------------------------------------------
def diagnostics_table(models: Sequence[Model], ks: Sequence[int], book: ScoreBook) -> pd.DataFrame | None:
    """imm_ray.diagnostics per model and set of the evaluation samples, mean over the model's seeds."""
    frames = []
    for model in models:
        per_run = [diagnostics.set_diagnostics(f, ks) for f in (book.frame(r.samples) for r in model.runs)
                   if f is not None]
        if per_run:
            mean = pd.concat(per_run).groupby("set", sort=False).mean(numeric_only=True).reset_index()
            frames.append(mean.assign(model=model.label, iteration=model.iteration, seeds=len(per_run)))
    return pd.concat(frames, ignore_index=True) if frames else None


def generation_table(models: Sequence[Model]) -> pd.DataFrame | None:
    """Per strategy and iteration: what the training samples θ^t drew (solved share), mean over seeds."""
    seen: dict[tuple[str, int], dict[Path, dict[str, float]]] = {}
    for model in models:
        for run in model.runs:
            if run.generation is None or not run.generation.is_file():
                continue
            key = (model.strategy, int(model.iteration))
            if run.generation not in seen.setdefault(key, {}):
                frame = pd.read_parquet(run.generation, columns=["question_id", "correct"])
                seen[key][run.generation] = diagnostics.generation_diagnostics(frame)
    records = [{"strategy": strategy, "iteration": t, "seeds": len(found),
                **pd.DataFrame(list(found.values())).mean().to_dict()} for (strategy, t), found in seen.items()]
    return pd.DataFrame(records) if records else None


def diagnostics_section(models: Sequence[Model], ks: Sequence[int], book: ScoreBook) -> str:
    table, generation = diagnostics_table(models, ks, book), generation_table(models)
    if table is None and generation is None:
        return ""
    parts = ["## Collapse diagnostics\n",
             "From the samples already drawn, mean over seeds. Distinct answers: distinct extracted final answers "
             "per question (samples with no answer are not counted there but as 'no answer'); distinct rationales: "
             "distinct completions per question after case-folding and collapsing whitespace; gap: pass@K − pass@1 "
             "in points (K the largest k); length: mean whitespace-separated words per completion.\n"]
    if table is not None:
        gap = next((c for c in table.columns if c.startswith("pass@") and c.endswith("-pass@1")), None)
        rows = [[str(r["model"]), str(r["set"]), f"{r['distinct_answers']:.2f}", f"{100 * r['no_answer_share']:.1f}",
                 f"{r['distinct_rationales']:.2f}", "–" if gap is None or pd.isna(r[gap]) else f"{100 * r[gap]:.1f}",
                 f"{r['mean_words']:.1f}"] for _, r in table.iterrows()]
        parts.append(markdown_table(["model", "set", "distinct answers", "no answer (%)", "distinct rationales",
                                     f"gap {gap or 'pass@K−pass@1'}", "length (words)"], rows) + "\n")
    if generation is not None:
        rows = [[STRATEGIES[r["strategy"]].label if r["strategy"] in STRATEGIES else str(r["strategy"]),
                 str(int(r["iteration"])), f"{int(r['train_questions'])} × {int(r['train_samples'])}",
                 f"{100 * r['solved_share']:.1f}", f"{100 * r['correct_share']:.1f}"] for _, r in generation.iterrows()]
        parts.append("Training samples of each iteration (drawn by θ^t, or the teacher): share of training questions "
                     "with at least one correct sample.\n\n" + markdown_table(
                         ["strategy", "iteration", "questions × samples", "solved (%)", "correct samples (%)"], rows)
                     + "\n")
    return "\n".join(parts)


# ---- the report ----------------------------------------------------------------------------------------------
def counts_line(models: Sequence[Model], id_set: str) -> str:
    """Questions per set, samples per question, seeds, and the interval methods, in one paragraph."""
    sets, _ = set_names(models, id_set)
    counts = []
    for name in sets:
        found = {(int(c[name + QUESTIONS]), int(c[name + SAMPLES])) for m in models for c in [_counts(m, name)]
                 if not pd.isna(c[name + QUESTIONS])}
        counts += [f"`{name}` {q} questions × {m} samples" for q, m in sorted(found)]
    seeds = sorted({s for m in models for s in m.seeds})
    shared = any(m.role == "base" and len(m.runs) == 1 for m in models) and len(seeds) > 1
    return (f"Counts: {'; '.join(counts) or 'not recorded'}. Seeds: {', '.join(map(str, seeds))} "
            f"({len(seeds)} replicate run{'s' if len(seeds) != 1 else ''}"
            f"{'; the base is one evaluation shared by every seed' if shared else ''}). "
            f"Cells: value [95% interval] in percent. One seed: {stats.BOOTSTRAP_METHOD}; several seeds: "
            f"{stats.POOLED_METHOD}. OOD mean: each OOD set's questions are resampled on their own and the set means "
            "averaged. Differences: the same method on the per-question difference of the two models.\n")


def seed_appendix(models: Sequence[Model], id_set: str, ks: Sequence[int], book: ScoreBook) -> str:
    """Per-seed tables (each seed's own evaluations, single-seed intervals), when the run has several seeds."""
    seeds = sorted({s for m in models for s in m.seeds})
    if len(seeds) < 2:
        return ""
    parts = ["## Appendix: each seed\n"]
    for seed in seeds:
        own = [Model(m.strategy, m.iteration, m.role, (m.run_for(seed),)) for m in models if m.run_for(seed)]
        for k in ks:
            parts.append(f"### Seed {seed}, pass@{k} (%)\n\n{to_markdown(model_table(own, id_set, k, book))}\n")
    return "\n".join(parts)


def write_report(run_dir: Path, rows: Sequence[dict], id_set: str, ks: Sequence[int], extra: str = "") -> pd.DataFrame:
    """Write report.md, results_pass@k.csv (values, intervals, counts), comparisons.csv and the trajectory plot;
    return the first k's results table (percent; ``<set>``, ``<set> low``, ``<set> high`` columns)."""
    run_dir = Path(run_dir)
    models, book = collect_models(rows), ScoreBook()
    tables = {k: model_table(models, id_set, k, book) for k in ks}
    for k, table in tables.items():
        table.to_csv(run_dir / f"results_pass@{k}.csv", index=False)
    compared = comparison_frame(models, id_set, ks, book)
    compared.to_csv(run_dir / "comparisons.csv", index=False)
    first = tables[ks[0]]
    plot_trajectories(first, id_set, run_dir / TRAJECTORY_PNG, f"pass@{ks[0]} over iterations (95% bands)")
    sections = [f"# imm-ray report: {run_dir.name}\n", f"## Summary\n\n{headline(models, compared, id_set, ks[0])}\n",
                f"> {ALPHA_CONVENTION}\n", counts_line(models, id_set)]
    sections += [f"## pass@{k} (%), in-domain `{id_set}` first\n\n{to_markdown(t)}\n" for k, t in tables.items()]
    sections += [comparisons_section(compared, ks), what_came_out(compared, ks[0]),
                 pattern_section(models, compared, id_set, ks[0])]
    sections += ["## Figures\n", f"![accuracy over iterations]({TRAJECTORY_PNG})\n\nBands: each model's own 95% "
                 "interval. Whether two models differ is read from the paired comparisons above, not from "
                 "overlapping bands (pairing on the same questions removes the shared question difficulty).\n",
                 layer_figure_section(rows, run_dir)]
    sections += [diagnostics_section(models, ks, book), layer_section(rows, run_dir)]
    sections += [extra, seed_appendix(models, id_set, ks, book)]
    text = "\n".join(s for s in sections if s)
    (run_dir / "report.md").write_text(text)
    from imm_ray.report_html import write_html

    write_html(run_dir / "report.html", text, run_dir, f"imm-ray report: {run_dir.name}")
    return first


def comparisons_section(frame: pd.DataFrame, ks: Sequence[int]) -> str:
    if frame.empty:
        return ""
    parts = ["## Paired comparisons\n",
             "A − B in points on the same questions (paired bootstrap, seeds pooled as above); \"resolved\": the 95% "
             "interval excludes 0. Each model against the base; IMM's handed-on model against each other "
             "strategy's at the same iteration.\n"]
    parts += [f"### pass@{k}\n\n{comparison_markdown(frame, k)}\n" for k in ks]
    return "\n".join(parts)


# ---- layer analysis ------------------------------------------------------------------------------------------
def layer_table(rows: Sequence[dict], file: str, column: str) -> pd.DataFrame | None:
    """One row per analysed model (and seed, when the run has several), one column per layer (L0, L1, ...)."""
    several = len({row.get("seed", 0) for row in rows}) > 1
    records, seen = [], set()
    for row in rows:
        folder = row.get("analysis")
        if folder is None or not (Path(folder) / file).is_file() or Path(folder).resolve() in seen:
            continue
        seen.add(Path(folder).resolve())
        values = pd.read_csv(Path(folder) / file).set_index("layer")[column]
        label = model_label(row["strategy"], row["iteration"], row["role"])
        records.append({"model": f"{label} (seed {row.get('seed', 0)})" if several else label,
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


def last_layer_profiles(rows: Sequence[dict], file: str, column: str) -> dict[str, np.ndarray]:
    """Per model of each strategy's last iteration (SFT and merge): its per-layer values, one row per seed."""
    last: dict[str, int] = {}
    for row in rows:
        if row.get("analysis") is not None and row["iteration"] is not None:
            last[row["strategy"]] = max(last.get(row["strategy"], -1), int(row["iteration"]))
    profiles: dict[str, list[np.ndarray]] = {}
    seen: set[Path] = set()
    for row in rows:
        folder = row.get("analysis")
        if folder is None or row["iteration"] != last.get(row["strategy"]) or not (Path(folder) / file).is_file():
            continue
        if Path(folder).resolve() in seen:  # a stage two strategies share (iteration 0's SFT) is drawn once
            continue
        seen.add(Path(folder).resolve())
        values = pd.read_csv(Path(folder) / file).sort_values("layer")[column].to_numpy(dtype=float)
        profiles.setdefault(model_label(row["strategy"], row["iteration"], row["role"]), []).append(values)
    return {label: np.vstack(found) for label, found in profiles.items()}


def plot_layer_figure(rows: Sequence[dict], path: Path) -> bool:
    """The paper's Figures 3 and 4 side by side: weight change against the base and layer importance, per layer,
    for each strategy's last models; the line is the mean over seeds, the band their range (several seeds)."""
    change = last_layer_profiles(rows, "weight_change.csv", "weight_change")
    importance = last_layer_profiles(rows, "importance.csv", "importance")
    if not change and not importance:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    panels = ((change, "Weight change against the ORIGINAL base", r"$\Delta W^n = \sum_k \|W - W_{base}\|_F$"),
              (importance, "Layer importance", r"$I^n = \sum |\partial L / \partial W \odot W|$"))
    for axis, (profiles, title, ylabel) in zip(axes[0], panels):
        for label, values in profiles.items():
            layers = np.arange(values.shape[1])
            line, = axis.plot(layers, values.mean(axis=0), marker="o", markersize=3, label=label)
            if len(values) > 1:
                axis.fill_between(layers, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15,
                                  linewidth=0)
        axis.set_title(title)
        axis.set_xlabel("layer n")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if profiles:
            axis.legend(fontsize=8)
    several = any(len(values) > 1 for profiles, _, _ in panels for values in profiles.values())
    figure.suptitle("Per layer, each strategy's last models" + (" (line: mean over seeds, band: their range)"
                                                               if several else " (one seed)"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def layer_figure_section(rows: Sequence[dict], run_dir: Path) -> str:
    if not plot_layer_figure(rows, run_dir / LAYERS_PNG):
        return ""
    seeds = len({row.get("seed", 0) for row in rows})
    spread = ("the band is the range over the seeds" if seeds > 1
              else "one seed, so no band: these are measurements of one model each, not estimates")
    return (f"![weight change and importance per layer]({LAYERS_PNG})\n\nWhere fine-tuning moved the weights "
            f"(left) against where the layers matter for reasoning (right), as the paper's Figures 3 and 4; {spread}."
            " Tables of both are in the layer analysis below.\n")
