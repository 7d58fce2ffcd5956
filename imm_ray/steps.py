"""The loop's stages as declarations: one frozen object per stage, whose fields are everything the stage reads.

As a mergekit merge step declares its inputs, each step here names the steps it depends on (fields holding a
:class:`~imm_ray.stages.Step`: :meth:`arguments`) and the values it reads (every other field). Its fingerprint is
derived from that declaration (:class:`imm_ray.stages.Step`): the values, the arguments' fingerprints, the source
of the code it runs (the import closure of ``code``) and the step's own source. Fields that cannot change what a
stage writes are listed in ``not_identity`` with the reason, and tested to be so.

``run(out, store)`` does the work into the folder ``out`` (which does not exist yet) and returns the summary
stored in the completion record; ``store`` resolves where the outputs of the steps it depends on lie.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import pandas as pd

from actors.engines.base import EngineSpec
from actors.generation import PoolSpec, SamplingPlan
from imm_ray.analysis_resources import AnalysisResources
from imm_ray.config import MergeSection, SFTSection
from imm_ray.data.records import Problem
from imm_ray.progress import current as current_progress
from imm_ray.stages import StageStore, Step
from imm_ray.strategies import DataPolicy

# ---------------------------------------------------------------------------------------------------- models


class ExternalModel(Step):
    """A model the run did not make (the base, a teacher): identified by the content of its files."""

    kind = "model"
    not_identity = ("path",)  # where a folder lies does not change what it holds; ``content`` identifies it

    path: str
    content: str  # imm_ray.stages.model_fingerprint of the folder


ModelSource = Union[ExternalModel, "FineTune", "Merge"]


def model_path(model: Step, store: StageStore) -> str:
    """Where a model lies: an external model's own folder, or the stage folder of the step that made it."""
    if isinstance(model, ExternalModel):
        return model.path
    return str(store.folder(model.kind, model.fingerprint))


def _engine_for(engine: EngineSpec, model: Step, store: StageStore) -> EngineSpec:
    return engine.model_copy(update={"model_path": model_path(model, store)})


# ------------------------------------------------------------------------------------------------ generation


class Generate(Step):
    """Sample k answers per training question from ``model`` and grade them."""

    kind = "generate"
    code = ("actors.generation",)
    # request groups carry their own seeds, so the samples do not depend on the pool's size (tested)
    not_identity = ("pool",)

    model: ModelSource
    problems: tuple[Problem, ...]
    prompts: tuple[str, ...]
    engine: EngineSpec  # model_path empty: the model is the ``model`` argument
    plan: SamplingPlan
    pool: PoolSpec

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.generation import generate_samples

        frame = generate_samples(list(self.problems), list(self.prompts), _engine_for(self.engine, self.model, store),
                                 self.plan, self.pool, current_progress())
        out.mkdir(parents=True)
        frame.to_parquet(out / "samples.parquet", index=False)
        return sample_summary(frame)


def sample_summary(frame: pd.DataFrame) -> dict[str, Any]:
    per_question = frame.groupby("question_id")["correct"].any()
    return {
        "samples": len(frame), "correct": int(frame["correct"].sum()),
        "questions": len(per_question), "questions_with_a_correct_sample": int(per_question.sum()),
    }


class NoCorrectSamplesError(RuntimeError):
    """An iteration in which no sampled answer was correct: there is nothing to fine-tune on."""


class SelectPairs(Step):
    """The SFT pairs of iteration t: this iteration's kept answers under the strategy's data policy.

    ``earlier`` are the generations of iterations 0..t-1 (empty for the "current" policy): mixture draws its
    share from the previous iteration's KEPT pairs, accumulation trains on every iteration's kept pairs.
    """

    kind = "sft_data"
    code = ("imm_ray.strategies",)

    samples: Generate
    earlier: tuple[Generate, ...] = ()
    policy: DataPolicy
    iteration: int
    sft_prompts: tuple[tuple[str, str], ...]  # (question id, the prompt its answers are trained on)
    mixture_share: float | None = None  # mixture only
    seed: int | None = None  # mixture only: which of the previous pairs join

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from imm_ray.strategies import kept_pairs, select_sft_pairs

        prompts = dict(self.sft_prompts)

        def kept(step: Generate, iteration: int) -> pd.DataFrame:
            folder = store.folder(step.kind, step.fingerprint)
            return kept_pairs(pd.read_parquet(folder / "samples.parquet"), iteration, prompts)

        current = kept(self.samples, self.iteration)
        if current.empty:
            raise NoCorrectSamplesError(
                f"iteration {self.iteration}: none of the sampled answers is correct, so there is nothing to "
                "fine-tune on. Raise generation.samples_per_question or the temperatures, use few-shot exemplars "
                "(generation.num_shots), or start from a stronger model.path."
            )
        earlier = [kept(step, t) for t, step in enumerate(self.earlier)]
        pairs = select_sft_pairs(self.policy, current, earlier, mixture_share=self.mixture_share or 0.0,
                                 seed=self.seed or 0)
        out.mkdir(parents=True)
        pairs.to_parquet(out / "pairs.parquet", index=False)
        return {"pairs": len(pairs), "kept_this_iteration": len(current)}


# ----------------------------------------------------------------------------------------------------- SFT


class FineTune(Step):
    """SFT of ``model`` on ``pairs`` (Ray Train + DeepSpeed).

    The Ray Train run is named by this step's fingerprint and kept in the stage cache, so a job killed in the
    middle of the stage and started again resumes from the checkpoint Ray Train last wrote.
    """

    kind = "sft"
    code = ("actors.training",)
    # a restarted worker group resumes to the same weights (tests/actors/test_training_resilience.py)
    not_identity = ("max_failures",)

    model: ModelSource
    pairs: SelectPairs
    sft: SFTSection
    seed: int
    workers: int  # with min_workers: the elastic range, which decides the data-parallel degree
    min_workers: int | None
    use_gpu: bool
    trust_remote_code: bool
    cpus_per_worker: float  # torch's thread count: it can change the order of float sums
    max_failures: int

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.training import SFTJob, run_sft

        job = SFTJob(
            model_path=model_path(self.model, store), output_dir=str(out),
            data_path=str(store.folder(self.pairs.kind, self.pairs.fingerprint) / "pairs.parquet"),
            storage_path=str(store.cache_dir / "_ray_train"), name=f"sft-{self.fingerprint}", seed=self.seed,
            trust_remote_code=self.trust_remote_code, num_workers=self.workers, min_workers=self.min_workers,
            cpus_per_worker=self.cpus_per_worker, use_gpu=self.use_gpu, max_failures=self.max_failures,
            **self.sft.model_dump(),
        )
        return run_sft(job, current_progress())


# ---------------------------------------------------------------------------------------------------- merge


class Importance(Step):
    """Layer importance I^n of a model on reference solutions (IIMM's per-layer scale), in a Ray task with its
    own resources (actors/analysis.py): the driver never loads the model."""

    kind = "importance"
    code = ("imm_ray.analysis", "actors.analysis")

    model: ModelSource
    pairs: tuple[tuple[str, str], ...]
    resources: AnalysisResources = AnalysisResources()

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.analysis import model_importance
        from imm_ray.analysis import plot_layers, write_layer_csv

        frame = model_importance(model_path(self.model, store), self.pairs, self.resources)
        out.mkdir(parents=True)
        write_layer_csv(frame, out / "importance.csv")
        plot_layers(frame, "importance", out / "importance.png", "Layer importance of the base model")
        return {"layers": len(frame)}


class Merge(Step):
    """θ_m = α·θ + (1−α)·(θ^t + DARE(θ_SFT − θ^t)) with the ORIGINAL base θ."""

    kind = "merge"
    code = ("actors.merging",)
    not_identity = ("workers",)  # the merged bytes are the same for any worker count (tested)

    base: ModelSource
    previous: ModelSource
    sft: FineTune
    method: str
    merge: MergeSection
    seed: int
    iteration: int
    importance: Importance | None = None
    workers: int

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.merging import merge_models
        from imm_ray.merge.options import MergeOptions

        importance = store.folder(self.importance.kind, self.importance.fingerprint) if self.importance else None
        record = merge_models(MergeOptions(
            base=model_path(self.base, store), finetuned=(model_path(self.sft, store),),
            previous=model_path(self.previous, store), out=str(out), method=self.method, alpha=self.merge.alpha,
            drop_rate=self.merge.drop_rate, seed=self.seed, iteration=self.iteration, exclude=self.merge.exclude,
            dtype=self.merge.dtype, importance=str(importance / "importance.csv") if importance else None,
            workers=self.workers,
        ), progress=current_progress())
        return {"record": record.model_dump(mode="json")}


# ------------------------------------------------------------------------------------------ evaluation, analysis


class Evaluate(Step):
    """pass@k of ``model`` on every evaluation set, with the graded samples kept."""

    kind = "eval"
    code = ("actors.evaluation",)
    not_identity = ("pool",)  # as for Generate: samples do not depend on the pool's size

    model: ModelSource
    sets: tuple[tuple[str, tuple[Problem, ...]], ...]
    prompts: tuple[tuple[str, tuple[str, ...]], ...]
    engine: EngineSpec
    plan: SamplingPlan
    ks: tuple[int, ...]
    pool: PoolSpec

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.evaluation import evaluate_model

        samples, metrics = evaluate_model(
            {name: list(problems) for name, problems in self.sets},
            {name: list(prompts) for name, prompts in self.prompts},
            _engine_for(self.engine, self.model, store), self.plan, self.pool, self.ks, current_progress(),
        )
        out.mkdir(parents=True)
        samples.to_parquet(out / "samples.parquet", index=False)
        metrics.to_csv(out / "metrics.csv", index=False)
        metrics.to_json(out / "metrics.json", orient="records", indent=2)
        return {"metrics": metrics.to_dict(orient="records")}


class Analyze(Step):
    """The paper's layer analysis of one model: ΔW^n against the ORIGINAL base and importance I^n, in one Ray task
    with its own resources (actors/analysis.py); the driver writes the two small tables and their plots."""

    kind = "analysis"
    code = ("imm_ray.analysis", "actors.analysis")

    base: ModelSource
    model: ModelSource
    pairs: tuple[tuple[str, str], ...]
    resources: AnalysisResources = AnalysisResources()

    def run(self, out: Path, store: StageStore) -> dict[str, Any]:
        from actors.analysis import analyze_model
        from imm_ray.analysis import plot_layers, write_layer_csv

        change, importance = analyze_model(model_path(self.base, store), model_path(self.model, store), self.pairs,
                                           self.resources)
        out.mkdir(parents=True)
        write_layer_csv(change, out / "weight_change.csv")
        plot_layers(change, "weight_change", out / "weight_change.png", "Weight change vs the base, per layer")
        write_layer_csv(importance, out / "importance.csv")
        plot_layers(importance, "importance", out / "importance.png", "Layer importance")
        return {"layers": len(change)}


for _step in (FineTune, Merge, Analyze, Generate, Evaluate, Importance):
    _step.model_rebuild()


def run_step(store: StageStore, step: Step, link: Path | None = None) -> Path:
    """Run ``step`` unless its stage is done; link ``link`` to the stage folder; return the folder."""
    return store.run(step.kind, step.fingerprint, lambda out: step.run(out, store), link=link,
                     inputs=step.identity)


__all__ = [
    "Analyze", "Evaluate", "ExternalModel", "FineTune", "Generate", "Importance", "Merge", "ModelSource",
    "NoCorrectSamplesError", "SelectPairs", "model_path", "run_step", "sample_summary",
]

