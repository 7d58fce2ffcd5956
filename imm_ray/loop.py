"""The iteration loop: for each strategy and iteration t, generate → filter → SFT → merge → evaluate.

θ is the ORIGINAL base, θ^0 = θ. In iteration t the current model θ^t (or a teacher, for distillation) samples
k answers per training question, the correct ones are kept, θ^t is fine-tuned on them (θ_SFT^t), and strategies
that merge produce θ_m^t = α·θ + (1−α)·(θ^t + DARE(θ_SFT^t − θ^t)), which becomes θ^{t+1}; the others continue
from θ_SFT^t. Every stage goes through the stage cache (imm_ray/stages.py): finished stages are skipped on a
rerun, and a stage two strategies share (iteration 0's generation and SFT) is computed once.

Each stage is a declaration (imm_ray/steps.py) whose fingerprint follows from what it reads. With several
``experiment.seeds`` the whole experiment runs once per seed (``<run>/seed_<s>/<strategy>/iter_<t>/``); the base
model's evaluation reads no seed, so it is one stage shared by every seed.

Each (seed, strategy) pair is a chain of stages that reads nothing of the other chains but the stages they share.
``resources.concurrent_chains`` of them run at once, each in a driver thread, so that a cluster's GPUs, or a small
machine's cores idle between short stages, take the next chain's work; Ray queues what does not fit. A stage that
two running chains declare is computed by the first and reused by the second (one lock per stage). The report
lists the chains in the order of the config whatever order they finished in, and no stage reads the setting, so
results are the same for any value.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from actors.cluster import ray_session, root_cause
from imm_ray.analysis_resources import analysis_resources
from imm_ray.config import ExperimentConfig, save_config
from imm_ray.console import DRIVER_LOG, RunView, output_to
from imm_ray.preflight import ModelRef, PreparedRun, prepare_run
from imm_ray.progress import reporting
from imm_ray.stages import StageStore, Step, fingerprint, read_record
from imm_ray.steps import (
    Analyze, Evaluate, ExternalModel, FineTune, Generate, Importance, Merge, NoCorrectSamplesError, SelectPairs,
    model_path, run_step,
)
from imm_ray.strategies import STRATEGIES, StrategySpec


@dataclass(frozen=True)
class EvalEntry:
    """One evaluated model in the report: base, or (strategy, iteration, role in {sft, merge}) of one seed."""

    strategy: str
    iteration: int | None
    role: str
    folder: Path
    analysis: Path | None = None  # weight_change.csv and importance.csv of this model, if analysed
    seed: int = 0
    generation: Path | None = None  # the samples this model's iteration was trained from


@dataclass(frozen=True)
class StageEvent:
    """One stage as an invocation met it: computed, reused, or (when only planning) done or pending."""

    link: str  # the run-folder path that links to the stage, relative to the run folder
    kind: str
    fingerprint: str
    what: str
    status: str  # computed | reused | done | pending | pending (inputs changed): the link shows an older stage
    seconds: float | None  # the stage's own compute time (from its completion record)


HISTORY_FILE = "history.jsonl"  # one line per invocation of the run: start, end, wall time, what it computed
LOGS = "logs"  # <run>/logs/: the driver's other output, Ray's session logs (linked), stage tracebacks


class ChainStopped(RuntimeError):
    """A chain that stopped before its next stage because another chain's stage failed."""


class StageError(RuntimeError):
    """A stage that failed, in one line: which stage, the cause (the exception a Ray worker or the driver raised,
    unwrapped from Ray's layers: ``cause``) and the file holding the full traceback (``traceback_file``)."""

    def __init__(self, message: str, cause: BaseException, traceback_file: Path) -> None:
        super().__init__(message)
        self.cause = cause
        self.traceback_file = traceback_file

    def __reduce__(self):  # it crosses process boundaries (a sweep trial runs the loop in a Ray task)
        return (type(self), (str(self), self.cause, self.traceback_file))


@dataclass
class RunResult:
    run_dir: Path
    evaluations: list[EvalEntry] = field(default_factory=list)
    seconds: float = 0.0
    table: pd.DataFrame | None = None
    events: list[StageEvent] = field(default_factory=list)


def report_rows(entries: list[EvalEntry]) -> list[dict[str, Any]]:
    """The evaluated models with their per-set metrics, as the report expects them."""
    return [
        {"strategy": e.strategy, "iteration": e.iteration, "role": e.role, "seed": e.seed,
         "metrics": pd.read_csv(e.folder / "metrics.csv"), "samples": e.folder / "samples.parquet",
         "generation": e.generation / "samples.parquet" if e.generation else None, "analysis": e.analysis}
        for e in entries
    ]


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every invocation of a run recorded so far, oldest first."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_history(run_dir: Path, entry: dict[str, Any]) -> None:
    with open(Path(run_dir) / HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def history_note(history: list[dict[str, Any]]) -> str:
    """The report's record of every invocation, so a rerun that reuses everything does not hide the first."""
    from imm_ray.report import markdown_table

    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])), f"{h['seconds']:.0f}",
             str(h["computed"]), str(h["reused"]), f"{h['stage_seconds']:.0f}"] for h in history]
    table = markdown_table(["started", "wall s", "stages computed", "stages reused", "stage compute s"], rows)
    return ("## Run history\n\nEvery invocation of this run (`imm-ray status RUN_DIR` lists every stage).\n\n"
            + table + "\n")


def stage_error(stage: str, error: Exception, traceback_file: Path) -> StageError:
    """One line for the console (the stage, the cause unwrapped from Ray's layers, the traceback's file); the
    whole traceback, every Ray worker's part included, written to ``traceback_file``."""
    cause = root_cause(error)
    traceback_file.parent.mkdir(parents=True, exist_ok=True)
    parts = traceback.format_exception(error)
    if cause is not error:
        parts += ["\nThe cause, as the worker raised it:\n", *traceback.format_exception(cause)]
    traceback_file.write_text("".join(parts))
    text = str(cause).strip()
    shown = f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__
    if len(shown) > 400:
        shown = shown[:397] + "..."
    return StageError(f"{stage} failed: {shown} (full traceback: {traceback_file})", cause, traceback_file)


class IterationLoop:
    """Runs every configured strategy for ``experiment.iterations`` iterations, once per seed, over one stage cache."""

    def __init__(
        self,
        config: ExperimentConfig,
        console: Console | RunView | None = None,
        *,
        run_dir: Path | None = None,
        stage_cache: Path | None = None,
        capture_output: bool = False,
    ) -> None:
        """``run_dir`` defaults to ``output_dir/name``; a sweep trial gets its own run_dir and the sweep's
        shared ``stage_cache``, so stages equal across trials are computed once. ``capture_output`` (the CLI):
        what else this process prints while the run lasts (Ray, libraries) goes to ``<run>/logs/driver.log``
        unless the view is verbose."""
        self.config = config
        self.view = console if isinstance(console, RunView) else RunView(console or Console())
        self.console = self.view.console
        self.capture_output = capture_output
        # absolute: Ray workers run in their own working directories
        self.run_dir = (Path(run_dir) if run_dir is not None else config.run_dir).resolve()
        self.store = StageStore(self.run_dir, Path(stage_cache).resolve() if stage_cache else None)
        self.prepared: PreparedRun | None = None
        self.events: list[StageEvent] = []
        self.planning = False  # True: declare and record stages, run none (see plan)
        self._stage_locks: dict[str, threading.Lock] = {}  # one per stage: chains that share it wait, then reuse
        self._locks_guard = threading.Lock()
        self._stop = threading.Event()  # set when a chain's stage failed: the other chains start no new stage
        self._chain_section = threading.local()  # concurrent chains: the section a chain's stage lines are in

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.clean_leftovers()
        save_config(self.config, self.run_dir / "config.yaml")
        result = RunResult(self.run_dir)
        logs = self.run_dir / LOGS
        self.view.header(self._title(), logs)
        capture = output_to(logs / DRIVER_LOG, self.console) if self.capture_output and not self.view.verbose \
            else contextlib.nullcontext()
        with capture, ray_session(logs, verbose=self.view.verbose):
            self.prepared = prepare_run(self.config)
            self.view.stages_total = self._count_stages()
            self._traverse(result)
        result.seconds = time.time() - started
        result.events = list(self.events)
        computed = [e for e in self.events if e.status == "computed"]
        _append_history(self.run_dir, {
            "started": started, "ended": time.time(), "seconds": round(result.seconds, 1),
            "computed": len(computed), "reused": len(self.events) - len(computed),
            "stage_seconds": round(sum(e.seconds or 0 for e in computed), 1), "argv": sys.argv,
        })
        from imm_ray.report import write_report

        result.table = write_report(self.run_dir, report_rows(result.evaluations), self.config.data.train_set,
                                    self.config.eval.k, extra=history_note(read_history(self.run_dir)))
        return result

    def _title(self) -> str:
        exp = self.config.experiment
        labels = ", ".join(STRATEGIES[s].label for s in exp.strategies)
        seeds = ",".join(map(str, exp.seeds))
        return (f"imm-ray run {exp.name} · {labels} · seed{'s' if len(exp.seeds) > 1 else ''} {seeds} · "
                f"{exp.iterations} iteration{'s' if exp.iterations > 1 else ''}")

    def _count_stages(self) -> int:
        """How many stages this run declares (for the view's "stage k of n"); runs nothing."""
        self.planning = True
        try:
            self._traverse(RunResult(self.run_dir))
            return len(self.events)
        finally:
            self.planning = False
            self.events.clear()

    def plan(self) -> list[StageEvent]:
        """Every stage of the run as declared now, each done or pending; runs nothing and starts no cluster."""
        self.prepared = prepare_run(self.config, check_cluster=False)
        self.planning = True
        try:
            self._traverse(RunResult(self.run_dir))
        finally:
            self.planning = False
        return list(self.events)

    def _traverse(self, result: RunResult) -> None:
        base = _external(self.prepared.base)
        self._section("Base model (one evaluation, shared by every strategy and seed)")
        base_eval = self.evaluate(base, self.run_dir / "base" / "eval")
        exp = self.config.experiment
        chains = [(STRATEGIES[name], seed) for seed in exp.seeds for name in exp.strategies]
        entries = iter(self._run_chains(chains, base))
        for seed in exp.seeds:
            result.evaluations.append(EvalEntry("base", None, "base", base_eval, seed=seed))
            for _ in exp.strategies:
                result.evaluations.extend(next(entries))

    def _run_chains(self, chains: list[tuple[StrategySpec, int]], base: ExternalModel) -> list[list[EvalEntry]]:
        """Every chain's evaluated models, in the order of ``chains``; ``resources.concurrent_chains`` at once.

        The first stage that fails stops the run: the other chains finish the stage they are in (it is kept)
        and start no other, and its error is raised."""
        lanes = 1 if self.planning else min(self.config.resources.concurrent_chains, len(chains))
        if lanes == 1:
            return [self.run_strategy(strategy, base, seed) for strategy, seed in chains]
        pool = ThreadPoolExecutor(lanes, thread_name_prefix="chain")
        # started strategy by strategy, seed by seed: the chains that run first share no stage (the strategies of
        # a seed share iteration 0, and one chain would wait for the other's)
        names = [strategy.name for strategy, _ in chains]
        started = sorted(range(len(chains)), key=lambda i: (names.index(names[i]), i))
        submitted = {i: pool.submit(self._chain, chains[i][0], base, chains[i][1]) for i in started}
        futures = [submitted[i] for i in range(len(chains))]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                self._stop.set()
                wait([f for f in futures if not f.cancel()])
                errors = [f.exception() for f in failed]
                raise next((e for e in errors if not isinstance(e, ChainStopped)), errors[0])
            return [f.result() for f in futures]
        except BaseException:  # KeyboardInterrupt too: no chain starts another stage
            self._stop.set()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _chain(self, strategy: StrategySpec, base: ExternalModel, seed: int) -> list[EvalEntry]:
        """One chain in a thread of its own, whose stage lines name it (see _section)."""
        self._chain_section.text = f"{strategy.label} · seed {seed}"
        return self.run_strategy(strategy, base, seed)

    def seed_dir(self, seed: int) -> Path:
        return self.run_dir / f"seed_{seed}"

    def run_strategy(self, strategy: StrategySpec, base: ExternalModel, seed: int) -> list[EvalEntry]:
        entries: list[EvalEntry] = []
        current: Step = base
        generations: list[Generate] = []
        teacher = _external(self.prepared.teacher) if strategy.teacher_generates else None
        for t in range(self.config.experiment.iterations):
            where = self.seed_dir(seed) / strategy.name / f"iter_{t}"
            self._section(f"{strategy.label} · seed {seed} · iteration {t}")
            samples = self.generate(teacher or current, seed, t)
            generated = self._run(samples, where / "generate", f"generate from {_name(samples.model)}")
            pairs = self.select_pairs(strategy, samples, tuple(generations), seed, t)
            generations.append(samples)
            self._run(pairs, where / "sft_data", "select SFT pairs")
            sft = self.fine_tune(current, pairs, seed, t)
            self._run(sft, where / "sft", f"SFT on {_count(self.store, pairs)} pairs")
            entries.append(EvalEntry(strategy.name, t, "sft", self.evaluate(sft, where / "eval_sft"),
                                     self.analyze(base, sft, where / "analysis_sft"), seed, generated))
            if strategy.merge_method is None:
                current = sft
                continue
            merged = self.merge(base, current, sft, seed, t, strategy.merge_method)
            cfg = self.config.merge
            self._run(merged, where / "merge", f"merge (α={cfg.alpha}, p={cfg.drop_rate})")
            entries.append(EvalEntry(strategy.name, t, "merge", self.evaluate(merged, where / "eval_merge"),
                                     self.analyze(base, merged, where / "analysis_merge"), seed, generated))
            current = merged
        return entries

    # ---- stage declarations -----------------------------------------------------------------------------
    def generate(self, model: Step, seed: int, iteration: int) -> Generate:
        prepared = self.prepared
        return Generate(
            model=model, problems=tuple(prepared.train_problems), prompts=tuple(prepared.train_prompts),
            engine=prepared.engine_spec(""), plan=prepared.sampling_plan(seed=_mix(seed, iteration)),
            pool=prepared.generation_pool,
        )

    def select_pairs(self, strategy: StrategySpec, samples: Generate, earlier: tuple[Generate, ...], seed: int,
                     t: int) -> SelectPairs:
        # with no earlier data every policy selects the same pairs, so iteration 0 is shared by all strategies
        policy = strategy.data_policy if earlier else "current"
        mixture = policy == "mixture"
        return SelectPairs(
            samples=samples, earlier=earlier if policy != "current" else (), policy=policy, iteration=t,
            sft_prompts=tuple(sorted(self.prepared.sft_prompts.items())),
            mixture_share=self.config.data.mixture_share if mixture else None,
            seed=_mix(seed, t) if mixture else None,
        )

    def fine_tune(self, model: Step, pairs: SelectPairs, seed: int, t: int) -> FineTune:
        cfg, res = self.config, self.config.resources
        return FineTune(
            model=model, pairs=pairs, sft=cfg.sft, seed=_mix(seed, t), workers=res.sft_workers,
            min_workers=res.sft_min_workers, use_gpu=res.use_gpu, trust_remote_code=cfg.model.trust_remote_code,
            cpus_per_worker=res.cpus_per_sft_worker, max_failures=res.sft_max_failures,
        )

    def merge(self, base: Step, previous: Step, sft: FineTune, seed: int, t: int, method: str) -> Merge:
        importance = self.importance(base) if method == "iimm" else None
        return Merge(base=base, previous=previous, sft=sft, method=method, merge=self.config.merge, seed=seed,
                     iteration=t, importance=importance, workers=self.config.resources.merge_workers)

    def importance(self, base: Step) -> Importance:
        """IIMM's layer importance I^n of the base model on reference solutions (computed once per run)."""
        step = Importance(model=base, pairs=tuple(self.prepared.importance_pairs()),
                          resources=analysis_resources(self.config))
        self._run(step, self.run_dir / "base" / "importance", "layer importance")
        return step

    def analyze(self, base: Step, model: Step, link: Path) -> Path | None:
        """The paper's layer analysis of one model: ΔW^n against the ORIGINAL base and importance I^n."""
        if not self.config.eval.layer_analysis:
            return None
        step = Analyze(base=base, model=model, pairs=tuple(self.prepared.importance_pairs()),
                       resources=analysis_resources(self.config))
        return self._run(step, link, f"layer analysis of {_name(model)}")

    def evaluate(self, model: Step, link: Path) -> Path:
        prepared = self.prepared
        names = list(prepared.eval_sets)
        step = Evaluate(
            model=model, sets=tuple((n, tuple(prepared.eval_sets[n])) for n in names),
            prompts=tuple((n, tuple(prepared.eval_prompts[n])) for n in names),
            engine=prepared.engine_spec(""), plan=prepared.eval_plan(), ks=tuple(self.config.eval.k),
            pool=prepared.generation_pool,
        )
        return self._run(step, link, f"evaluate {_name(model)}")

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _run(self, step: Step, link: Path, what: str) -> Path:
        if self.planning:
            done = self.store.is_done(step.kind, step.fingerprint)
            final = self.store.folder(step.kind, step.fingerprint)
            stale = link.is_symlink() and link.resolve() != final.resolve()
            self._record(step, link, what, "done" if done else "pending (inputs changed)" if stale else "pending")
            return final
        if self._stop.is_set():
            raise ChainStopped(f"{what}: not started, another chain's stage failed")
        if hasattr(self._chain_section, "text"):  # in a chain's thread
            what = f"{self._chain_section.text} · {what}"
        with self._stage_lock(step.fingerprint):
            return self._run_once(step, link, what)

    def _stage_lock(self, stage_fingerprint: str) -> threading.Lock:
        with self._locks_guard:
            return self._stage_locks.setdefault(stage_fingerprint, threading.Lock())

    def _run_once(self, step: Step, link: Path, what: str) -> Path:
        if self.store.is_done(step.kind, step.fingerprint):
            folder = run_step(self.store, step, link)
            self.view.reused(what, self._record(step, link, what, "reused").seconds)
            return folder
        with self.view.stage(what) as progress, reporting(progress):
            try:
                folder = run_step(self.store, step, link)
            except Exception as error:
                raise self._stage_error(step, link, what, error) from error
        self._record(step, link, what, "computed")
        return folder

    def _stage_error(self, step: Step, link: Path, what: str, error: Exception) -> StageError:
        where = link.relative_to(self.run_dir) if link.is_relative_to(self.run_dir) else link
        file = self.run_dir / LOGS / f"{step.kind}-{step.fingerprint[:12]}.traceback.txt"
        return stage_error(f"stage {where} ({what})", error, file)

    def _record(self, step: Step, link: Path, what: str, status: str) -> StageEvent:
        record = read_record(self.store.folder(step.kind, step.fingerprint)) or {}
        event = StageEvent(str(link.relative_to(self.run_dir)), step.kind, step.fingerprint, what, status,
                           record.get("seconds"))
        self.events.append(event)
        return event

    def _section(self, text: str) -> None:
        """A section line; with concurrent chains, whose lines would interleave, each stage line names its section
        instead (the base's section, before the chains start, is still printed)."""
        if self.planning:
            return
        if hasattr(self._chain_section, "text"):  # in a chain's thread
            self._chain_section.text = text
        else:
            self.view.section(text)


def _external(model: ModelRef) -> ExternalModel:
    return ExternalModel(path=model.path, content=model.fingerprint)


def _name(model: Step) -> str:
    return Path(model.path).name if isinstance(model, ExternalModel) else f"{model.kind}-{model.fingerprint[:8]}"


def _count(store: StageStore, pairs: SelectPairs) -> str:
    import pyarrow.parquet as pq

    file = store.folder(pairs.kind, pairs.fingerprint) / "pairs.parquet"
    return str(pq.ParquetFile(file).metadata.num_rows) if file.is_file() else "the selected"


def _mix(seed: int, iteration: int) -> int:
    """A per-iteration seed derived from the experiment seed (iteration 0 of every strategy gets the same)."""
    return int(fingerprint({"seed": seed, "iteration": iteration})[:8], 16)


__all__ = ["ChainStopped", "IterationLoop", "NoCorrectSamplesError", "RunResult", "EvalEntry", "ModelRef", "StageEvent",
           "model_path", "read_history"]
