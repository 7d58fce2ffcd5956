"""The Ray Tune sweep over merge α, DARE drop rate and iteration count: one trial = the loop for one strategy.

Layout of a sweep folder ``<output_dir>/<name>/``::

    _stages/          the ONE stage cache every trial shares (imm_ray/stages.py): generation and SFT that do not
                      depend on the merge settings are computed once, each trial adds only its merge + evaluation
    trials/<label>/   each trial's own run folder (links into _stages, its report.md)
    tune/             Ray Tune's experiment (RunConfig(storage_path=<sweep folder>, name="tune")); restorable
    sweep_config.yaml the resolved config the sweep was started with (a restore must match it)
    table3.md/.csv/.png, trials.csv   the paper's Table 3 layout (tune/table3.py)

Resources. Tune places each trial in a placement group and captures the trial's child tasks in it
(``placement_group_capture_child_tasks=True``), and it rejects an all-zero request (``ResourceRequest``: "empty
head and zero worker bundles"). The loop's stages need the cluster's CPUs (Ray Data actors, Ray Train workers,
merge actors), so a trial reserves only 1 MiB of ``memory`` and runs the loop in a zero-CPU Ray task scheduled with
``scheduling_strategy="DEFAULT"``, outside the trial's placement group; that task reuses the running Ray
(``ray.is_initialized()``) and its stages take CPUs from the whole cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rich.console import Console

from imm_ray.config import ConfigError, ExperimentConfig, save_config, validate
from imm_ray.console import RunView
from imm_ray.progress import ProgressFn, Tick
from tune.space import TrialParams, num_samples, search_algorithm, search_space
from tune.table3 import OOD_MEAN, Table3Files, TrialOutcome, metrics_from_table, write_table3

TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20}
PATH_FIELDS = (("model", "path"), ("model", "teacher"), ("data", "train_path"), ("data", "data_dir"))


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps its things; ``root`` is absolute, as Tune's storage path must be."""

    root: Path

    @classmethod
    def of(cls, config: ExperimentConfig) -> SweepPaths:
        return cls(config.run_dir.resolve())

    @property
    def stages(self) -> Path:
        return self.root / "_stages"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def config(self) -> Path:
        return self.root / "sweep_config.yaml"


@dataclass(frozen=True)
class StageAccounting:
    """Seconds of stage work: as computed (each shared stage once) and as it would be if no trial shared any."""

    computed_seconds: float
    unshared_seconds: float
    stages: Mapping[str, int]  # stage kind → folders in the shared cache


@dataclass(frozen=True)
class SweepResult:
    paths: SweepPaths
    outcomes: tuple[TrialOutcome, ...]
    table: pd.DataFrame
    files: Table3Files
    seconds: float
    restored: bool
    accounting: StageAccounting


def run_sweep(config: ExperimentConfig, console: Console | RunView | None = None, *, fresh: bool = False,
              capture_output: bool = False) -> SweepResult:
    """Run (or resume) the sweep of ``config.sweep`` and write Table 3; failed trials are reported, not raised.

    The console shows one line per trial started and finished and the trials done so far; the trials' own stage
    lines, Tune's status tables and Ray's output are in ``<sweep>/logs/`` (``capture_output``: what else this
    process prints goes to ``logs/driver.log``, unless the view is verbose)."""
    import contextlib

    from actors.cluster import ray_session
    from imm_ray.console import DRIVER_LOG, output_to

    view = console if isinstance(console, RunView) else RunView(console or Console())
    paths = SweepPaths.of(config)
    restore = prepare_folder(config, paths, fresh=fresh, console=view.console)
    started = time.time()
    logs = paths.root / "logs"
    view.header(f"imm-ray sweep {config.experiment.name}", logs)
    capture = output_to(logs / DRIVER_LOG, view.console) if capture_output and not view.verbose \
        else contextlib.nullcontext()
    with capture, ray_session(logs, verbose=view.verbose):
        import ray

        check_concurrency(config, ray.cluster_resources().get("CPU", 0.0))
        with view.stage("sweep trials") as progress:
            grid = make_tuner(config, paths, restore=restore, callbacks=[trial_lines(view, progress)]).fit()
    seconds = time.time() - started
    outcomes = tuple(sorted((outcome_of(result, config) for result in grid), key=lambda o: o.params.sort_key))
    accounting = account_stages(paths)
    table, files = write_table3(
        paths.root, outcomes, report_sets(config), metric=config.sweep.metric,
        value_name=f"pass@{config.eval.k[0]} (%)", heading=f"Table 3 ({config.experiment.name})",
        notes=sweep_notes(config, seconds, restore, accounting),
    )
    return SweepResult(paths, outcomes, table, files, seconds, restore, accounting)


def prepare_folder(config: ExperimentConfig, paths: SweepPaths, *, fresh: bool, console: Console) -> bool:
    """Decide, before Ray starts, between resuming the Tune experiment in ``paths.tune`` and starting a new one;
    ``fresh`` moves an earlier experiment aside. A resume must have the config the sweep started with."""
    from ray import tune

    check_metric(config)
    if fresh and paths.tune.exists():
        aside = paths.root / f"tune.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.tune.rename(aside)
        console.print(f"--fresh: the earlier Tune experiment was moved to {aside}", markup=False)
    if tune.Tuner.can_restore(str(paths.tune)):
        check_same_sweep(config, paths)
        console.print(f"Resuming the sweep in {paths.tune} (finished trials are not rerun)", markup=False)
        return True
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(config, paths.config)
    return False


def make_tuner(config: ExperimentConfig, paths: SweepPaths, *, restore: bool, callbacks: Sequence[Any] = ()) -> Any:
    """The ``ray.tune.Tuner``: restored (finished trials kept, unfinished resumed, failed ones restarted) or new,
    storing its experiment at ``<sweep folder>/tune``; a failed trial never stops the others. ``callbacks``: Tune
    callbacks for a new experiment (a restored one keeps the run config it was saved with)."""
    from ray import tune

    trainable = make_trainable(config, paths)
    if restore:
        return tune.Tuner.restore(str(paths.tune), trainable=trainable, resume_unfinished=True, restart_errored=True)
    sweep = config.sweep
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode="max", num_samples=num_samples(sweep),
            search_alg=search_algorithm(sweep, config.experiment.seed),
        ),
        run_config=tune.RunConfig(
            storage_path=str(paths.root), name=paths.tune.name, verbose=1,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), callbacks=list(callbacks),
        ),
    )


def trial_lines(view: RunView, progress: ProgressFn) -> Any:
    """A Tune callback (it runs on the driver): a line per trial started and finished, the trials done so far.

    Tune saves its run config, callbacks included, with the experiment: the saved copy drops the console."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self, view: RunView | None, progress: ProgressFn | None) -> None:
            self.view, self.progress = view, progress
            self.total: int | None = None
            self.finished = 0
            self.started: dict[str, float] = {}

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "view": None, "progress": None}

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info: Any) -> None:
            self.total = total_num_samples

        def on_trial_start(self, iteration, trials, trial, **info: Any) -> None:
            self.started[trial.trial_id] = time.monotonic()
            if self.view is not None:
                self.view.line(f"  > trial {TrialParams.from_config(trial.config).label} started")

        def on_trial_complete(self, iteration, trials, trial, **info: Any) -> None:
            self._finished(trial, "done", "green")

        def on_trial_error(self, iteration, trials, trial, **info: Any) -> None:
            self._finished(trial, "failed (Table 3 lists why)", "red")

        def _finished(self, trial, outcome: str, style: str) -> None:
            self.finished += 1
            if self.view is None or self.progress is None:
                return
            took = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
            self.view.line(f"  {'+' if style == 'green' else 'x'} trial "
                           f"{TrialParams.from_config(trial.config).label}: {outcome} in {took:.0f} s", style=style)
            self.progress(Tick(self.finished, self.total, "trials"))

    return TrialLines(view, progress)


def make_trainable(config: ExperimentConfig, paths: SweepPaths) -> Any:
    """The function trainable with the sweep's config bound (``tune.with_parameters``) and its tiny request."""
    from ray import tune

    raw = absolute_paths(config).model_dump(mode="json")
    bound = tune.with_parameters(sweep_trial, sweep_config=raw, sweep_root=str(paths.root))
    return tune.with_resources(bound, TRIAL_RESOURCES)


def sweep_trial(trial_config: dict[str, Any], sweep_config: dict[str, Any], sweep_root: str) -> None:
    """One Tune trial: run the loop outside the trial's placement group, report what it measured."""
    import ray
    from ray import tune

    params = TrialParams.from_config(trial_config)
    paths = SweepPaths(Path(sweep_root))
    raw = params.apply(validate(sweep_config, "sweep config")).model_dump(mode="json")
    run_dir = paths.trials / params.label
    task = ray.remote(num_cpus=0)(run_trial_loop).options(scheduling_strategy="DEFAULT", name=f"trial-{params.label}")
    metrics = ray.get(task.remote(raw, str(run_dir), str(paths.stages)))
    tune.report({**metrics, "run_dir": str(run_dir)})


def run_trial_loop(raw: dict[str, Any], run_dir: str, stage_cache: str) -> dict[str, object]:
    """The loop for the trial's single strategy over the shared stage cache (runs in a plain Ray task)."""
    from imm_ray.loop import IterationLoop

    config = validate(raw, "trial config")
    strategy = config.experiment.strategies[0]
    (Path(run_dir) / "logs").mkdir(parents=True, exist_ok=True)  # the loop writes config.yaml there before any stage
    # the trial's own stage lines, in plain lines, in its run folder (this task's stdout is a Ray worker log)
    with open(Path(run_dir) / "logs" / "trial.log", "a", buffering=1) as log:
        console = Console(file=log, width=120, force_terminal=False)
        console.print(f"trial {Path(run_dir).name}: α={config.merge.alpha} p={config.merge.drop_rate} "
                      f"T={config.experiment.iterations} strategy={strategy}", markup=False)
        result = IterationLoop(config, console, run_dir=Path(run_dir), stage_cache=Path(stage_cache)).run()
    last = config.experiment.iterations - 1
    sft_eval = next(e.folder for e in result.evaluations
                    if e.strategy == strategy and e.role == "sft" and e.iteration == last)
    return metrics_from_table(result.table, strategy, Path(sft_eval).name)


def outcome_of(result: Any, config: ExperimentConfig) -> TrialOutcome:
    """A ``ray.tune.Result`` as a :class:`TrialOutcome` (its error summarised in one line)."""
    metrics = result.metrics or {}
    params = TrialParams.from_config(result.config)
    error = error_line(result.error) if result.error is not None else None
    run_dir = metrics.get("run_dir") or str(SweepPaths.of(config).trials / params.label)
    return TrialOutcome.from_metrics(params, metrics, report_sets(config), error, str(run_dir))


def error_line(error: BaseException) -> str:
    """The innermost cause of a (nested) Ray task error, as ``Type: first line of its message``."""
    seen = 0
    while getattr(error, "cause", None) is not None and seen < 10:
        error, seen = error.cause, seen + 1
    text = str(error).strip()
    if type(error).__name__.startswith("RayTaskError"):
        text = text.splitlines()[-1] if text else text
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def stage_cpus(config: ExperimentConfig) -> float:
    """The most CPUs one stage of a trial asks for at once (stages of one trial run one at a time)."""
    res = config.resources
    return max(res.generation_actors * res.cpus_per_generation_actor,
               (res.sft_min_workers or res.sft_workers) * res.cpus_per_sft_worker, float(res.merge_workers))


def check_concurrency(config: ExperimentConfig, cluster_cpus: float) -> None:
    """Concurrent trials whose stages together need more CPUs than the cluster has wait on each other and can
    deadlock (seen: two merge pools on 2 CPUs, each holding one actor and waiting for a second one)."""
    trials, need = config.sweep.max_concurrent_trials, stage_cpus(config)
    if trials > 1 and trials * need > cluster_cpus:
        raise ConfigError(
            f"sweep.max_concurrent_trials: {trials} trials × up to {need:g} CPUs per stage exceed the cluster's "
            f"{cluster_cpus:g} CPUs; concurrent trials would hold part of each other's CPUs and can deadlock. "
            f"Lower it to {max(1, int(cluster_cpus // need))} or shrink the resources section."
        )


def check_metric(config: ExperimentConfig) -> None:
    """Tune stops a trial whose result lacks the metric it optimises, so a metric no trial reports is a config
    error, found before any trial runs."""
    if config.sweep.metric not in report_sets(config):
        raise ConfigError(f"sweep.metric: {config.sweep.metric!r} is not reported; choose one of "
                          f"{', '.join(report_sets(config))}")


def report_sets(config: ExperimentConfig) -> list[str]:
    """Table 3's rows in the loop's order: the ID set, the OOD sets, the OOD mean (if there are OOD sets)."""
    ood = [s for s in config.data.eval_sets if s != config.data.train_set]
    return [config.data.train_set, *ood, *([OOD_MEAN] if ood else [])]


def absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Relative local paths made absolute: trials and Ray workers do not share the caller's working directory.

    Harmless to the stage cache: models and data are fingerprinted by content, not by path.
    """
    raw = config.model_dump(mode="json")
    for section, name in PATH_FIELDS:
        value = raw[section].get(name)
        if value and Path(value).exists() and not Path(value).is_absolute():
            raw[section][name] = str(Path(value).resolve())
    return validate(raw, "sweep config")


def check_same_sweep(config: ExperimentConfig, paths: SweepPaths) -> None:
    """A restore continues the experiment as it was started; a changed config would silently mix two sweeps."""
    if not paths.config.is_file():
        return
    saved = _flatten(yaml.safe_load(paths.config.read_text()) or {})
    now = _flatten(config.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(
            f"{paths.root} holds a sweep started with a different config (changed: {', '.join(changed)}). "
            "Pass --fresh to start a new sweep there (finished stages are still reused), or set experiment.name."
        )


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def account_stages(paths: SweepPaths) -> StageAccounting:
    """Sum the completion records' ``seconds``: once per stage folder (what sharing cost) and once per trial that
    links it (what the trials would have cost computing every stage on their own)."""
    from imm_ray.stages import read_record

    per_trial = [_linked_stages(trial) for trial in sorted(paths.trials.glob("*")) if trial.is_dir()]
    unique = {folder for stages in per_trial for folder in stages}
    seconds = {folder: float((read_record(folder) or {}).get("seconds", 0.0)) for folder in unique}
    kinds: dict[str, int] = {}
    for folder in paths.stages.glob("*-*"):
        if folder.is_dir() and not folder.name.startswith("."):
            kinds[folder.name.split("-", 1)[0]] = kinds.get(folder.name.split("-", 1)[0], 0) + 1
    return StageAccounting(
        computed_seconds=sum(seconds.values()),
        unshared_seconds=sum(seconds[f] for stages in per_trial for f in stages),
        stages=dict(sorted(kinds.items())),
    )


def _linked_stages(trial_dir: Path) -> set[Path]:
    """The stage folders a trial's run folder links to (the loop's per-iteration symlinks)."""
    return {link.resolve() for link in trial_dir.rglob("*") if link.is_symlink() and link.resolve().is_dir()}


def sweep_notes(config: ExperimentConfig, seconds: float, restored: bool,
                accounting: StageAccounting) -> Sequence[str]:
    """The settings and costs Table 3 was produced with, as markdown paragraphs."""
    sweep, data, ev = config.sweep, config.data, config.eval
    stages = ", ".join(f"{kind} ×{count}" for kind, count in accounting.stages.items())
    return [
        f"Strategy `{sweep.strategy}`, {sweep.search} search over α {list(sweep.alpha)}, drop rate "
        f"{list(sweep.drop_rate)}, iterations {list(sweep.iterations)}; seeds {list(config.experiment.seeds)} "
        f"(replicates: cells are means over them). "
        f"Train set `{data.train_set}` ({data.train_limit} questions × {config.generation.samples_per_question} "
        f"samples); eval: {data.eval_limit} questions per set × {ev.samples} samples at T={ev.temperature}. "
        "Merged/SFT columns: the model of the last iteration (the merge is what that iteration hands on).",
        f"Wall time of this invocation: {seconds:.0f} s{' (restored sweep)' if restored else ''}. Stage work: "
        f"{accounting.computed_seconds:.0f} s computed with the shared stage cache, "
        f"{accounting.unshared_seconds:.0f} s if every trial computed its own stages. Shared cache: {stages}.",
    ]

