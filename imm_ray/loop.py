"""The iteration loop: for each strategy and iteration t, generate → filter → SFT → merge → evaluate.

θ is the ORIGINAL base, θ^0 = θ. In iteration t the current model θ^t (or a teacher, for distillation) samples
k answers per training question, the correct ones are kept, θ^t is fine-tuned on them (θ_SFT^t), and strategies
that merge produce θ_m^t = α·θ + (1−α)·(θ^t + DARE(θ_SFT^t − θ^t)), which becomes θ^{t+1}; the others continue
from θ_SFT^t. Every stage goes through the stage cache (imm_ray/stages.py): finished stages are skipped on a
rerun, and a stage two strategies share (iteration 0's generation and SFT) is computed once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

import imm_ray
from actors.cluster import ray_session
from imm_ray.config import ExperimentConfig, save_config
from imm_ray.data.records import Problem
from imm_ray.preflight import PreparedRun, prepare_run
from imm_ray.report import write_report
from imm_ray.stages import StageStore, fingerprint, model_fingerprint
from imm_ray.strategies import PAIR_COLUMNS, STRATEGIES, StrategySpec, select_sft_pairs


class NoCorrectSamplesError(RuntimeError):
    """An iteration in which no sampled answer was correct: there is nothing to fine-tune on."""


@dataclass(frozen=True)
class ModelRef:
    path: str
    fingerprint: str


@dataclass(frozen=True)
class EvalEntry:
    """One evaluated model in the report: base, or (strategy, iteration, role in {sft, merge})."""

    strategy: str
    iteration: int | None
    role: str
    folder: Path
    analysis: Path | None = None  # weight_change.csv and importance.csv of this model, if analysed


@dataclass
class RunResult:
    run_dir: Path
    evaluations: list[EvalEntry] = field(default_factory=list)
    seconds: float = 0.0
    table: pd.DataFrame | None = None


def report_rows(entries: list[EvalEntry]) -> list[dict[str, Any]]:
    """The evaluated models with their per-set metrics, as the report expects them."""
    return [
        {"strategy": e.strategy, "iteration": e.iteration, "role": e.role,
         "metrics": pd.read_csv(e.folder / "metrics.csv"), "analysis": e.analysis}
        for e in entries
    ]


def _timing_note(seconds: float) -> str:
    return f"## Run\n\nWall time of this invocation: {seconds:.0f} s (stages done earlier were reused, not redone).\n"


class IterationLoop:
    """Runs every configured strategy for ``experiment.iterations`` iterations over one stage cache."""

    def __init__(
        self,
        config: ExperimentConfig,
        console: Console | None = None,
        *,
        run_dir: Path | None = None,
        stage_cache: Path | None = None,
    ) -> None:
        """``run_dir`` defaults to ``output_dir/name``; a sweep trial gets its own run_dir and the sweep's
        shared ``stage_cache``, so stages equal across trials are computed once."""
        self.config = config
        self.console = console or Console()
        # absolute: Ray workers run in their own working directories
        self.run_dir = (Path(run_dir) if run_dir is not None else config.run_dir).resolve()
        self.store = StageStore(self.run_dir, Path(stage_cache).resolve() if stage_cache else None)
        self.prepared: PreparedRun | None = None

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.clean_leftovers()
        save_config(self.config, self.run_dir / "config.yaml")
        result = RunResult(self.run_dir)
        with ray_session():
            self.prepared = prepare_run(self.config)
            base = self.prepared.base
            result.evaluations.append(EvalEntry("base", None, "base", self.evaluate(base, self.run_dir / "base" / "eval")))
            for name in self.config.experiment.strategies:
                result.evaluations.extend(self.run_strategy(STRATEGIES[name], base))
        result.seconds = time.time() - started
        result.table = write_report(self.run_dir, report_rows(result.evaluations), self.config.data.train_set,
                                    self.config.eval.k, extra=_timing_note(result.seconds))
        return result

    def run_strategy(self, strategy: StrategySpec, base: ModelRef) -> list[EvalEntry]:
        entries: list[EvalEntry] = []
        current = base
        earlier_pairs: list[Path] = []
        for t in range(self.config.experiment.iterations):
            where = self.run_dir / strategy.name / f"iter_{t}"
            self._say(f"[bold]{strategy.label}[/] iteration {t}")
            generator = self.prepared.teacher if strategy.teacher_generates else current
            samples = self.generate(generator, t, where / "generate")
            pairs = self.select_pairs(strategy, samples, earlier_pairs, t, where / "sft_data")
            earlier_pairs.append(pairs)
            sft = self.fine_tune(current, pairs, t, where / "sft")
            entries.append(EvalEntry(strategy.name, t, "sft", self.evaluate(sft, where / "eval_sft"),
                                     self.analyze(base, sft, where / "analysis_sft")))
            if strategy.merge_method is None:
                current = sft
                continue
            merged = self.merge(base, current, sft, t, strategy.merge_method, where / "merge")
            entries.append(EvalEntry(strategy.name, t, "merge", self.evaluate(merged, where / "eval_merge"),
                                     self.analyze(base, merged, where / "analysis_merge")))
            current = merged
        return entries

    # ---- stages -----------------------------------------------------------------------------------------
    def generate(self, model: ModelRef, iteration: int, link: Path) -> Path:
        from actors.generation import generate_samples

        cfg = self.config
        prepared = self.prepared
        key = {
            "stage": "generate", "model": model.fingerprint, "data": prepared.train_fingerprint,
            "generation": cfg.generation.model_dump(mode="json"), "engine": prepared.engine_kind,
            "seed": cfg.experiment.seed, "iteration": iteration, "version": imm_ray.__version__,
        }

        def work(out: Path) -> dict[str, Any]:
            plan = prepared.sampling_plan(seed=_mix(cfg.experiment.seed, iteration))
            frame = generate_samples(
                prepared.train_problems, prepared.train_prompts, prepared.engine_spec(model.path), plan,
                prepared.generation_pool,
            )
            out.mkdir(parents=True)
            frame.to_parquet(out / "samples.parquet", index=False)
            return _sample_summary(frame)

        return self._stage("generate", key, work, link, f"generate from {Path(model.path).name}")

    def select_pairs(self, strategy: StrategySpec, samples: Path, earlier: list[Path], t: int, link: Path) -> Path:
        cfg = self.config
        # with no earlier data every policy selects the same pairs, so iteration 0 is shared by all strategies
        policy = strategy.data_policy if earlier else "current"
        key = {
            "stage": "sft_data", "samples": _fp_of(samples), "policy": policy,
            "earlier": [_fp_of(p) for p in earlier] if policy != "current" else [],
            "share": cfg.sft.mixture_share if policy == "mixture" else None,
            "seed": cfg.experiment.seed, "iteration": t,
        }

        def work(out: Path) -> dict[str, Any]:
            current = kept_pairs(pd.read_parquet(samples / "samples.parquet"), t)
            if current.empty:
                raise NoCorrectSamplesError(
                    f"iteration {t}: none of the sampled answers in {samples} is correct, so there is nothing to "
                    "fine-tune on. Raise generation.samples_per_question or the temperatures, use few-shot "
                    "exemplars (data.num_shots), or start from a stronger model.path."
                )
            previous = [pd.read_parquet(p / "pairs.parquet") for p in earlier]
            pairs = select_sft_pairs(
                policy, current, previous, mixture_share=cfg.sft.mixture_share,
                seed=_mix(cfg.experiment.seed, t),
            )
            out.mkdir(parents=True)
            pairs.to_parquet(out / "pairs.parquet", index=False)
            return {"pairs": len(pairs), "kept_this_iteration": len(current)}

        return self._stage("sft_data", key, work, link, "select SFT pairs")

    def fine_tune(self, model: ModelRef, pairs: Path, t: int, link: Path) -> ModelRef:
        from actors.training import SFTJob, run_sft

        cfg = self.config
        res = cfg.resources
        key = {
            "stage": "sft", "model": model.fingerprint, "pairs": _fp_of(pairs),
            "sft": cfg.sft.model_dump(mode="json"), "workers": res.sft_workers, "seed": cfg.experiment.seed,
            "iteration": t, "version": imm_ray.__version__,
        }

        def work(out: Path) -> dict[str, Any]:
            job = SFTJob(
                model_path=model.path, data_path=str(pairs / "pairs.parquet"), output_dir=str(out),
                storage_path=str((self.run_dir / "_ray_train").resolve()), name=f"sft-{uuid.uuid4().hex[:8]}",
                seed=_mix(cfg.experiment.seed, t), trust_remote_code=cfg.model.trust_remote_code,
                num_workers=res.sft_workers, min_workers=res.sft_min_workers, cpus_per_worker=res.cpus_per_sft_worker,
                use_gpu=res.use_gpu, max_failures=res.sft_max_failures,
                **cfg.sft.model_dump(exclude={"mixture_share"}),
            )
            return run_sft(job)

        folder = self._stage("sft", key, work, link, f"SFT on {_count(pairs)} pairs")
        return ModelRef(str(folder), _fp_of(folder))

    def merge(self, base: ModelRef, previous: ModelRef, sft: ModelRef, t: int, method: str, link: Path) -> ModelRef:
        from actors.merging import merge_models
        from imm_ray.merge.options import MergeOptions

        cfg = self.config
        importance = self.importance(base) if method == "iimm" else None
        key = {
            "stage": "merge", "base": base.fingerprint, "previous": previous.fingerprint, "sft": sft.fingerprint,
            "merge": cfg.merge.model_dump(mode="json"), "method": method, "seed": cfg.experiment.seed,
            "iteration": t, "importance": _fp_of(importance) if importance else None, "version": imm_ray.__version__,
        }

        def work(out: Path) -> dict[str, Any]:
            record = merge_models(MergeOptions(
                base=base.path, finetuned=(sft.path,), previous=previous.path, out=str(out), method=method,
                alpha=cfg.merge.alpha, drop_rate=cfg.merge.drop_rate, seed=cfg.experiment.seed, iteration=t,
                exclude=cfg.merge.exclude, dtype=cfg.merge.dtype,
                importance=str(importance / "importance.csv") if importance else None,
                workers=cfg.resources.merge_workers,
            ))
            return {"record": record.model_dump(mode="json")}

        folder = self._stage("merge", key, work, link, f"merge (α={cfg.merge.alpha}, p={cfg.merge.drop_rate})")
        return ModelRef(str(folder), _fp_of(folder))

    def importance(self, base: ModelRef) -> Path:
        """IIMM's layer importance I^n of the base model on reference solutions (computed once per run)."""
        from imm_ray.analysis import layer_importance, plot_layers, write_layer_csv

        prepared = self.prepared
        key = {"stage": "importance", "model": base.fingerprint, "data": prepared.importance_fingerprint}

        def work(out: Path) -> dict[str, Any]:
            frame = layer_importance(base.path, prepared.importance_pairs())
            out.mkdir(parents=True)
            write_layer_csv(frame, out / "importance.csv")
            plot_layers(frame, "importance", out / "importance.png", "Layer importance of the base model")
            return {"layers": len(frame)}

        return self._stage("importance", key, work, self.run_dir / "base" / "importance", "layer importance")

    def analyze(self, base: ModelRef, model: ModelRef, link: Path) -> Path | None:
        """The paper's layer analysis of one model: ΔW^n against the ORIGINAL base and importance I^n."""
        if not self.config.eval.layer_analysis:
            return None
        from imm_ray.analysis import layer_importance, plot_layers, weight_change, write_layer_csv

        prepared = self.prepared
        key = {"stage": "analysis", "base": base.fingerprint, "model": model.fingerprint,
               "data": prepared.importance_fingerprint, "version": imm_ray.__version__}

        def work(out: Path) -> dict[str, Any]:
            out.mkdir(parents=True)
            change = weight_change(base.path, model.path)
            write_layer_csv(change, out / "weight_change.csv")
            plot_layers(change, "weight_change", out / "weight_change.png", "Weight change vs the base, per layer")
            importance = layer_importance(model.path, prepared.importance_pairs(), progress=False)
            write_layer_csv(importance, out / "importance.csv")
            plot_layers(importance, "importance", out / "importance.png", "Layer importance")
            return {"layers": len(change)}

        return self._stage("analysis", key, work, link, f"layer analysis of {Path(model.path).name}")

    def evaluate(self, model: ModelRef, link: Path) -> Path:
        from actors.evaluation import evaluate_model

        cfg = self.config
        prepared = self.prepared
        key = {
            "stage": "eval", "model": model.fingerprint, "data": prepared.eval_fingerprint,
            "eval": cfg.eval.model_dump(mode="json"), "engine": prepared.engine_kind, "seed": cfg.experiment.seed,
            "version": imm_ray.__version__,
        }

        def work(out: Path) -> dict[str, Any]:
            samples, metrics = evaluate_model(
                prepared.eval_sets, prepared.eval_prompts, prepared.engine_spec(model.path), prepared.eval_plan(),
                prepared.generation_pool, cfg.eval.k,
            )
            out.mkdir(parents=True)
            samples.to_parquet(out / "samples.parquet", index=False)
            metrics.to_csv(out / "metrics.csv", index=False)
            metrics.to_json(out / "metrics.json", orient="records", indent=2)
            return {"metrics": metrics.to_dict(orient="records")}

        return self._stage("eval", key, work, link, f"evaluate {Path(model.path).name}")

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _stage(self, kind: str, key: Mapping[str, Any], work: Callable[[Path], Any], link: Path, what: str) -> Path:
        stage_fp = fingerprint(key)
        if self.store.is_done(kind, stage_fp):
            self._say(f"  [dim]{what}: done earlier, reused ({kind}-{stage_fp[:8]})[/]")
            return self.store.run(kind, stage_fp, work, link=link)
        self._say(f"  {what} ...")
        started = time.time()
        folder = self.store.run(kind, stage_fp, work, link=link, inputs=key)
        self._say(f"  [green]{what}: done in {time.time() - started:.1f} s[/]")
        return folder

    def _say(self, text: str) -> None:
        self.console.print(text)


def kept_pairs(samples: pd.DataFrame, iteration: int) -> pd.DataFrame:
    """The correct samples as SFT pairs (zero-shot prompt, the generated rationale + answer), deduplicated.

    The SFT prompt is the instruction without few-shot exemplars: the model learns to answer the bare question;
    the exemplars only steer sampling.
    """
    from imm_ray.data.prompts import build_prompt

    kept = samples[samples["correct"]].copy()
    kept["response"] = kept["completion"].str.strip()
    kept = kept[kept["response"] != ""]
    kept["prompt"] = [build_prompt(question) for question in kept["question"]]
    kept["iteration"] = iteration
    kept = kept.drop_duplicates(subset=["question_id", "response"])
    return kept[PAIR_COLUMNS].reset_index(drop=True)


def _sample_summary(frame: pd.DataFrame) -> dict[str, Any]:
    per_question = frame.groupby("question_id")["correct"].any()
    return {
        "samples": len(frame), "correct": int(frame["correct"].sum()),
        "questions": len(per_question), "questions_with_a_correct_sample": int(per_question.sum()),
    }


def _fp_of(folder: Path) -> str:
    return model_fingerprint(folder)


def _count(pairs: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(pairs / "pairs.parquet").metadata.num_rows


def _mix(seed: int, iteration: int) -> int:
    """A per-iteration seed derived from the experiment seed (iteration 0 of every strategy gets the same)."""
    return int(fingerprint({"seed": seed, "iteration": iteration})[:8], 16)


__all__ = ["IterationLoop", "NoCorrectSamplesError", "RunResult", "EvalEntry", "kept_pairs", "Problem"]
