"""The Tune sweep: search spaces, per-trial configs and Table 3 from fake trial results (fast, no Ray); then
real sweeps on the session's 2-CPU Ray cluster (integration): a 2-α sweep on the toy model that must share its
generation and SFT and redo nothing when restored, and a sweep whose trials fail and are reported."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search.sample import Categorical, Float

from imm_ray.config import ConfigError, load_config, save_config
from imm_ray.report import ALPHA_CONVENTION
from tune.space import TrialParams, num_samples, search_algorithm, search_space
from tune.sweep import (
    SweepPaths, absolute_paths, account_stages, check_concurrency, check_metric, check_same_sweep, error_line, report_sets,
)
from tune.table3 import (
    TrialOutcome, column_labels, metrics_from_table, table3, table3_bounds, to_markdown, trials_frame, write_table3,
)

SETS = ["toy_id", "toy_ood_compare", "OOD mean"]
BASE = {"toy_id": 20.0, "toy_ood_compare": 30.0, "OOD mean": 30.0}
SFT = {"toy_id": 60.0, "toy_ood_compare": 10.0, "OOD mean": 10.0}


def _config(*overrides: str):
    return load_config(None, list(overrides))


def _outcome(alpha: float, final_id: float, *, drop_rate: float = 0.2, iterations: int = 1,
             sft_id: str = "eval-sft0", error: str | None = None) -> TrialOutcome:
    params = TrialParams(alpha, drop_rate, iterations)
    if error:
        return TrialOutcome(params, error=error)
    final = {"toy_id": final_id, "toy_ood_compare": 100 - final_id, "OOD mean": 100 - final_id}
    return TrialOutcome(params, final, SFT, BASE, sft_id)


# ---- search space -------------------------------------------------------------------------------------------
def test_grid_space_is_every_listed_value_sorted_and_deduplicated():
    sweep = _config("sweep.alpha=[0.5, 0.1, 0.5]", "sweep.drop_rate=[0.2]", "sweep.iterations=[2, 1]").sweep
    space = search_space(sweep)
    assert space["alpha"] == {"grid_search": [0.1, 0.5]}
    assert space["drop_rate"] == {"grid_search": [0.2]}
    assert space["iterations"] == {"grid_search": [1, 2]}
    assert num_samples(sweep) == 1


def test_random_space_spans_the_listed_range_and_draws_num_samples():
    sweep = _config("sweep.search=random", "sweep.alpha=[0.7, 0.1, 0.4]", "sweep.drop_rate=[0.3]",
                    "sweep.iterations=[1, 3]", "sweep.num_samples=5").sweep
    space = search_space(sweep)
    assert isinstance(space["alpha"], Float) and (space["alpha"].lower, space["alpha"].upper) == (0.1, 0.7)
    assert space["drop_rate"] == 0.3  # a single value is a constant, not uniform(0.3, 0.3)
    assert isinstance(space["iterations"], Categorical) and space["iterations"].categories == [1, 3]
    assert num_samples(sweep) == 5


def _no_op_trainable(config: dict) -> None:
    """Tune's variant generator needs a trainable to expand a spec; drawing points never calls it."""


def _draws(seed: int) -> list[dict]:
    sweep = _config("sweep.search=random", "sweep.alpha=[0.1, 0.9]", "sweep.iterations=[1, 2]",
                    "sweep.num_samples=4").sweep
    searcher = search_algorithm(sweep, seed)
    spec = {"run": _no_op_trainable, "config": search_space(sweep), "num_samples": num_samples(sweep)}
    searcher.add_configurations({"draws": spec})
    draws = []
    for _ in range(4):
        trial = searcher.next_trial()
        searcher.on_trial_complete(trial.trial_id)  # one trial at a time (sweep.max_concurrent_trials = 1)
        draws.append(trial.config)
    return draws


def test_random_search_is_seeded():
    first, again, other = _draws(3), _draws(3), _draws(4)
    assert first == again and first != other
    assert all(0.1 <= c["alpha"] <= 0.9 and c["iterations"] in (1, 2) for c in first)


def test_trial_config_sets_the_point_and_runs_only_the_sweep_strategy():
    config = _config("sweep.strategy=iimm", "experiment.strategies=[imm, vanilla]")
    trial = TrialParams(1e-05, 0.35, 2).apply(config)
    assert trial.merge.alpha == 1e-05 and trial.merge.drop_rate == 0.35
    assert trial.experiment.iterations == 2 and trial.experiment.strategies == ("iimm",)
    assert trial.generation == config.generation and trial.sft == config.sft


def test_trial_config_is_validated_like_a_file():
    with pytest.raises(ConfigError, match="merge.drop_rate"):
        TrialParams(0.5, 1.0, 1).apply(_config())


def test_labels_tell_points_apart_and_are_file_names():
    labels = {TrialParams(a, 0.2, 1).label for a in (0.1, 0.1001, 0.3)}
    assert len(labels) == 3 and all("/" not in label and " " not in label for label in labels)


# ---- Table 3 ------------------------------------------------------------------------------------------------
def test_table3_rows_are_sets_columns_base_alphas_sft():
    outcomes = [_outcome(0.5, 40.0), _outcome(0.1, 55.0), _outcome(0.9, 25.0)]
    table = table3(outcomes, SETS)
    assert list(table.index) == SETS
    assert list(table.columns) == ["Base", "α=0.1", "α=0.5", "α=0.9", "SFT"]
    assert table.loc["toy_id", "α=0.1"] == 55.0 and table.loc["toy_ood_compare", "α=0.9"] == 75.0
    assert table.loc["toy_id", "Base"] == 20.0 and table.loc["OOD mean", "SFT"] == 10.0


def test_table3_labels_grow_when_drop_rate_or_iterations_vary():
    outcomes = [_outcome(0.5, 40.0, drop_rate=0.1), _outcome(0.5, 42.0, drop_rate=0.3)]
    assert list(column_labels(outcomes).values()) == ["α=0.5, p=0.1", "α=0.5, p=0.3"]
    outcomes = [_outcome(0.5, 40.0, iterations=1), _outcome(0.5, 42.0, iterations=2, sft_id="eval-sft1")]
    table = table3(outcomes, SETS)
    assert list(table.columns) == ["Base", "α=0.5, T=1", "α=0.5, T=2", "SFT (α=0.5, T=1)", "SFT (α=0.5, T=2)"]


def test_failed_trials_leave_the_table_and_are_listed_with_their_error(tmp_path):
    outcomes = [_outcome(0.3, 50.0), _outcome(0.7, 0.0, error="NoCorrectSamplesError: iteration 0: none ...")]
    table, files = write_table3(tmp_path, outcomes, SETS, metric="OOD mean", value_name="pass@1 (%)",
                                heading="Table 3 (test)", notes=["Wall time: 1 s."])
    assert list(table.columns) == ["Base", "α=0.3", "SFT"]
    text = files.markdown.read_text()
    assert ALPHA_CONVENTION in text and "| toy_id | 20.0 | 50.0 | 60.0 |" in text and "Wall time: 1 s." in text
    assert "## Failed trials" in text and "a0.7_p0.2_T1: NoCorrectSamplesError" in text
    assert "Best trial by `OOD mean`: a0.3_p0.2_T1 (50.0)" in text
    trials = pd.read_csv(files.trials)
    assert list(trials["status"]) == ["done", "failed"] and trials["error"].iloc[1].startswith("NoCorrect")
    csv = pd.read_csv(files.csv, comment="#", index_col="set")
    assert files.csv.read_text().startswith("# α convention: α is the weight of the ORIGINAL base")
    assert csv.loc["toy_id", "α=0.3"] == 50.0
    assert files.plot.stat().st_size > 5000


def test_no_finished_trial_gives_an_empty_table_with_the_rows():
    table = table3([_outcome(0.3, 0.0, error="boom")], SETS)
    assert list(table.index) == SETS and table.columns.empty
    assert to_markdown(table).splitlines()[2] == "| toy_id |  |"


def test_missing_set_is_a_dash_in_markdown():
    outcome = TrialOutcome(TrialParams(0.5, 0.2, 1), {"toy_id": 40.0}, {"toy_id": 60.0}, {"toy_id": 20.0}, "x")
    assert "| toy_ood_compare | – | – | – |" in to_markdown(table3([outcome], SETS))


def test_unfinished_trials_are_marked_for_resuming(tmp_path):
    unfinished = TrialOutcome(TrialParams(0.5, 0.2, 1))
    frame = trials_frame([unfinished, _outcome(0.3, 50.0)], "OOD mean")
    assert list(frame["status"]) == ["unfinished", "done"] and math.isnan(frame.loc[0, "OOD mean"])
    _, files = write_table3(tmp_path, [unfinished], SETS, metric="OOD mean", value_name="pass@1 (%)", heading="T")
    text = files.markdown.read_text()
    assert "## Unfinished trials" in text and "- a0.5_p0.2_T1" in text and "Failed" not in text


def test_metrics_from_the_loop_table_pick_the_last_handed_on_model():
    table = pd.DataFrame([
        {"model": "Base", "strategy": "base", "iteration": None, "role": "base", "toy_id": 20.0, "OOD mean": 30.0},
        {"model": "s0", "strategy": "imm", "iteration": 0, "role": "sft", "toy_id": 50.0, "OOD mean": 12.0},
        {"model": "m0", "strategy": "imm", "iteration": 0, "role": "merge", "toy_id": 45.0, "OOD mean": 28.0},
        {"model": "s1", "strategy": "imm", "iteration": 1, "role": "sft", "toy_id": 70.0, "OOD mean": 8.0},
        {"model": "m1", "strategy": "imm", "iteration": 1, "role": "merge", "toy_id": 65.0, "OOD mean": 26.0},
    ])
    metrics = metrics_from_table(table, "imm", "eval-abc")
    assert metrics == {"toy_id": 65.0, "OOD mean": 26.0, "sft/toy_id": 70.0, "sft/OOD mean": 8.0,
                       "base/toy_id": 20.0, "base/OOD mean": 30.0, "sft_eval": "eval-abc"}
    outcome = TrialOutcome.from_metrics(TrialParams(0.5, 0.2, 2), metrics, ["toy_id", "OOD mean"])
    assert outcome.final["toy_id"] == 65.0 and outcome.sft["OOD mean"] == 8.0 and outcome.sft_id == "eval-abc"
    vanilla = table.assign(strategy=table["strategy"].replace("imm", "vanilla"))
    vanilla = vanilla[vanilla["role"] != "merge"]
    assert metrics_from_table(vanilla, "vanilla", "e")["toy_id"] == 70.0
    with pytest.raises(ValueError, match="iimm"):
        metrics_from_table(table, "iimm", "e")


def _with_intervals(accuracies: dict[str, float], half: float = 5.0) -> dict[str, float]:
    out = dict(accuracies)
    for name, value in accuracies.items():
        out.update({f"{name} low": value - half, f"{name} high": value + half})
        if name != "OOD mean":
            out.update({f"{name} questions": 48.0, f"{name} samples": 4.0})
    return out


def test_table3_cells_and_csv_carry_intervals_and_counts(tmp_path):
    params = TrialParams(0.3, 0.2, 1)
    final = _with_intervals({"toy_id": 50.0, "toy_ood_compare": 40.0, "OOD mean": 40.0})
    outcome = TrialOutcome(params, {**final, "seeds": 1.0}, _with_intervals(SFT), _with_intervals(BASE), "e")
    low, high = table3_bounds([outcome], SETS)
    assert low.loc["toy_id", "α=0.3"] == 45.0 and high.loc["OOD mean", "SFT"] == 15.0
    table, files = write_table3(tmp_path, [outcome], SETS, metric="OOD mean", value_name="pass@1 (%)", heading="T")
    text = files.markdown.read_text()
    assert "| toy_id | 20.0 [15.0, 25.0] | 50.0 [45.0, 55.0] | 60.0 [55.0, 65.0] |" in text
    assert "Counts: `toy_id` 48 questions × 4 samples; `toy_ood_compare` 48 questions × 4 samples" in text
    assert "percentile bootstrap over questions" in text
    assert "Best trial by `OOD mean`: a0.3_p0.2_T1 (40.0 [35.0, 45.0]): the highest point value" in text
    csv = pd.read_csv(files.csv, comment="#", index_col="set")
    assert list(csv.columns) == ["Base", "α=0.3", "SFT", "Base low", "α=0.3 low", "SFT low", "Base high",
                                 "α=0.3 high", "SFT high"]
    assert csv.loc["toy_id", "α=0.3 high"] == 55.0
    trials = pd.read_csv(files.trials)
    assert trials.loc[0, "OOD mean low"] == 35.0 and trials.loc[0, "OOD mean high"] == 45.0


def test_a_trial_reports_the_report_tables_intervals(tmp_path):
    """metrics_from_table on the table imm_ray.report returns: value, low, high and counts per set, and seeds."""
    columns = {}
    for name in ("toy_id", "OOD mean"):
        columns.update({name: [20.0, 65.0], f"{name} low": [15.0, 60.0], f"{name} high": [25.0, 70.0]})
    columns.update({"toy_id questions": [48.0, 48.0], "toy_id samples": [4.0, 4.0]})
    table = pd.DataFrame({"model": ["Base", "m0"], "strategy": ["base", "imm"], "iteration": [None, 0],
                          "role": ["base", "merge"], "seeds": [1, 2], **columns})
    table = pd.concat([table, table.iloc[[1]].assign(model="s0", role="sft")], ignore_index=True)
    metrics = metrics_from_table(table, "imm", "e")
    assert metrics["toy_id"] == 65.0 and metrics["toy_id low"] == 60.0 and metrics["OOD mean high"] == 70.0
    assert metrics["base/toy_id questions"] == 48.0 and metrics["sft/toy_id high"] == 70.0 and metrics["seeds"] == 2
    outcome = TrialOutcome.from_metrics(TrialParams(0.5, 0.2, 1), metrics, ["toy_id", "OOD mean"])
    assert outcome.final["toy_id low"] == 60.0 and outcome.base["toy_id samples"] == 4.0
    assert outcome.final["seeds"] == 2.0


# ---- sweep plumbing -----------------------------------------------------------------------------------------
def test_report_sets_put_id_first_and_add_the_ood_mean():
    config = _config("data.eval_sets=[toy_ood_compare, toy_id]")
    assert report_sets(config) == ["toy_id", "toy_ood_compare", "OOD mean"]
    assert report_sets(_config("data.eval_sets=[toy_id]")) == ["toy_id"]


def test_the_searcher_holds_back_trials_beyond_the_concurrency_limit():
    sweep = _config("sweep.alpha=[0.1, 0.5, 0.9]").sweep
    searcher = search_algorithm(sweep, 0)
    searcher.add_configurations({"grid": {"run": _no_op_trainable, "config": search_space(sweep)}})
    first = searcher.next_trial()
    assert first is not None and searcher.next_trial() is None
    searcher.on_trial_complete(first.trial_id)
    assert searcher.next_trial() is not None


def test_concurrent_trials_must_fit_the_cluster_together():
    check_concurrency(_config("sweep.max_concurrent_trials=2"), 4.0)
    check_concurrency(_config(), 2.0)  # one trial at a time always fits (the loop's preflight checks the stages)
    with pytest.raises(ConfigError, match="2 trials × up to 2 CPUs per stage exceed the cluster's 2 CPUs.*to 1"):
        check_concurrency(_config("sweep.max_concurrent_trials=2"), 2.0)


def test_metric_must_be_a_reported_set():
    check_metric(_config("sweep.metric=toy_ood_compare"))
    with pytest.raises(ConfigError, match="sweep.metric: 'OOD mean' is not reported; choose one of toy_id"):
        check_metric(_config("data.eval_sets=[toy_id]"))


def test_restore_refuses_a_changed_config(tmp_path):
    config = _config(f"experiment.output_dir={tmp_path}", "sweep.alpha=[0.1, 0.5]")
    paths = SweepPaths.of(config)
    paths.root.mkdir(parents=True)
    save_config(config, paths.config)
    check_same_sweep(config, paths)
    changed = _config(f"experiment.output_dir={tmp_path}", "sweep.alpha=[0.1, 0.6]", "eval.samples=8")
    with pytest.raises(ConfigError, match="changed: eval.samples, sweep.alpha.*--fresh"):
        check_same_sweep(changed, paths)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    config = absolute_paths(_config("model.path=models/m", "data.data_dir=missing"))
    assert config.model.path == str(tmp_path / "models" / "m") and config.data.data_dir == "missing"


def test_error_line_takes_the_innermost_cause():
    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::trial()\n  Traceback ...\nlong text")
            self.cause = cause

    assert error_line(Wrapper(Wrapper(ValueError("bad alpha\nmore")))) == "ValueError: bad alpha"
    assert error_line(RuntimeError()) == "RuntimeError"


def test_stage_accounting_counts_shared_stages_once(tmp_path):
    import json

    paths = SweepPaths(tmp_path)
    for name, seconds in (("generate-a", 10.0), ("sft-b", 20.0), ("merge-c", 1.0), ("merge-d", 2.0)):
        (paths.stages / name).mkdir(parents=True)
        (paths.stages / name / "_COMPLETE.json").write_text(json.dumps({"fingerprint": "x", "seconds": seconds}))
    for trial, merge in (("t1", "merge-c"), ("t2", "merge-d")):
        where = paths.trials / trial / "seed_0" / "imm" / "iter_0"
        where.mkdir(parents=True)
        for link, stage in (("generate", "generate-a"), ("sft", "sft-b"), ("merge", merge)):
            (where / link).symlink_to(Path("../../../../../_stages") / stage)
    accounting = account_stages(paths)
    assert accounting.computed_seconds == 33.0 and accounting.unshared_seconds == 63.0
    assert accounting.stages == {"generate": 1, "merge": 2, "sft": 1}


# ---- the command line (no Ray: user errors stop it before the cluster starts) -------------------------------
def test_cli_user_errors_exit_2_before_ray_starts(tmp_path):
    from typer.testing import CliRunner

    from imm_ray.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["sweep", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    bad = runner.invoke(app, ["sweep", "configs/table3.yaml", "--set", "sweep.alpha=[1.5]"])
    assert bad.exit_code == 2 and "sweep.alpha" in bad.output


def test_shipped_sweep_configs_are_valid():
    table3_config = load_config(Path("configs/table3.yaml"))
    assert table3_config.sweep.alpha == (0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9)
    assert len(table3_config.sweep.drop_rate) == 1 and table3_config.sweep.iterations == (1,)
    strategies = load_config(Path("configs/strategies.yaml"))
    assert set(strategies.experiment.strategies) == {"vanilla", "mixture", "accumulation", "imm", "iimm",
                                                    "distillation"}


# ---- real sweeps (integration) ------------------------------------------------------------------------------
TINY = [
    "experiment.iterations=1", "data.train_limit=8", "data.eval_limit=4", "generation.samples_per_question=2",
    "generation.max_new_tokens=64", "eval.samples=2", "eval.k=[1,2]", "sft.epochs=1",
    "sweep.alpha=[0.3, 0.7]", "sweep.drop_rate=[0.2]", "sweep.iterations=[1]",
]


def _stage_counts(paths: SweepPaths) -> dict[str, int]:
    return {kind: len([p for p in paths.stages.glob(f"{kind}-*") if p.is_dir()])
            for kind in ("generate", "sft_data", "sft", "merge", "eval")}


def _written(paths: SweepPaths) -> dict[str, int]:
    """Modification times of every stage record and every trial's report: a rerun stage or trial changes them."""
    files = [*paths.stages.glob("*/_COMPLETE.json"), *paths.trials.glob("*/report.md")]
    return {str(f): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def toy_sweep(ray_cluster, tmp_path_factory):
    from tune.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    config = load_config(Path("configs/table3.yaml"), [*TINY, f"experiment.output_dir={out}", "experiment.name=sw"])
    first = run_sweep(config)
    written = _written(first.paths)
    again = run_sweep(config)
    return first, written, again


@pytest.mark.integration
@pytest.mark.timeout(900)  # a sweep that waits on CPUs forever must fail, not hang the suite
def test_alpha_sweep_runs_generation_and_sft_once(toy_sweep):
    first, _, _ = toy_sweep
    assert [o.error for o in first.outcomes] == [None, None]
    assert _stage_counts(first.paths) == {"generate": 1, "sft_data": 1, "sft": 1, "merge": 2, "eval": 4}
    assert list(first.table.columns) == ["Base", "α=0.3", "α=0.7", "SFT"]
    assert list(first.table.index) == ["toy_id", "toy_ood_compare", "toy_ood_distractor", "OOD mean"]
    assert first.table.notna().all().all()
    assert first.accounting.unshared_seconds > first.accounting.computed_seconds
    for outcome in first.outcomes:
        trial = Path(outcome.run_dir)
        assert (trial / "seed_0" / "imm" / "iter_0" / "sft").resolve().parent == first.paths.stages
        assert (trial / "report.md").is_file()
    assert ALPHA_CONVENTION in first.files.markdown.read_text()


@pytest.mark.integration
@pytest.mark.timeout(900)  # a sweep that waits on CPUs forever must fail, not hang the suite
def test_restored_sweep_redoes_nothing(toy_sweep):
    first, written, again = toy_sweep
    assert again.restored and not first.restored
    assert _written(again.paths) == written
    pd.testing.assert_frame_equal(again.table, first.table)


@pytest.mark.integration
@pytest.mark.timeout(900)  # a sweep that waits on CPUs forever must fail, not hang the suite
def test_failed_trials_are_reported_and_the_sweep_goes_on(ray_cluster, tiny_model, tmp_path):
    """An untrained model samples no correct answer: every trial fails in its SFT-data stage, each is reported
    with its error, and the sweep ends normally with the failures in table3.md."""
    from tune.sweep import run_sweep

    config = load_config(None, [*TINY, f"model.path={tiny_model}", "generation.engine=transformers",
                                f"experiment.output_dir={tmp_path}", "experiment.name=failing"])
    result = run_sweep(config)
    assert len(result.outcomes) == 2 and not any(o.ok for o in result.outcomes)
    assert all(o.error.startswith("NoCorrectSamplesError: iteration 0") for o in result.outcomes)
    text = result.files.markdown.read_text()
    assert "## Failed trials" in text and text.count("NoCorrectSamplesError") == 2
    assert _stage_counts(result.paths)["generate"] == 1  # the second trial reused the first one's generation
