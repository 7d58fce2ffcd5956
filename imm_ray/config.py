"""Typed, frozen experiment configuration: one object drives the CLI, the loop and Tune.

A YAML file is read into :class:`ExperimentConfig`; ``--set section.field=value`` overrides are applied to the
raw mapping before validation, so an override is checked exactly like a value in the file. Unknown keys and bad
values raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

StrategyName = Literal["vanilla", "imm", "iimm", "mixture", "accumulation", "distillation"]
PACKAGE_ROOT = Path(__file__).resolve().parent
TOY_MODEL_DIR = PACKAGE_ROOT / "assets" / "toy"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExperimentSection(_Section):
    """``seeds`` are replicates: the experiment runs once per seed, and a seed fixes the sampling of training
    answers, the SFT data order and every DARE mask. What is measured (the evaluation questions, their
    sampling seed ``eval.seed``, the training questions ``data.seed`` picks) is the same for every seed, so the
    base model's evaluation is shared and replicates compare on the same questions. ``seed: S`` means
    ``seeds: [S]``."""

    name: str = Field("toy", pattern=r"^[A-Za-z0-9_.\-]+$")
    seeds: tuple[int, ...] = (0,)
    output_dir: str = "runs"
    iterations: int = Field(3, ge=1, le=100)
    strategies: tuple[StrategyName, ...] = ("imm", "vanilla")

    @model_validator(mode="before")
    @classmethod
    def _single_seed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "seed" in raw:
            if "seeds" in raw:
                raise ValueError("give experiment.seeds or experiment.seed, not both")
            raw = {**raw, "seeds": [raw["seed"]]}
            del raw["seed"]
        return raw

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("seeds must be a non-empty list without repeats")
        return value

    @property
    def seed(self) -> int:
        """The first seed (what seeds a search algorithm; a single-seed run's seed)."""
        return self.seeds[0]

    @field_validator("strategies")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("strategies must be a non-empty list without repeats")
        return value


class ModelSection(_Section):
    """The ORIGINAL base model θ: a local HF folder or a hub id. ``toy`` is the embedded default."""

    path: str = "toy"
    trust_remote_code: bool = False
    teacher: str | None = None  # distillation: the model that generates the data

    def resolved_path(self) -> str:
        return str(TOY_MODEL_DIR) if self.path == "toy" else self.path

    def resolved_teacher(self) -> str | None:
        if self.teacher is None:
            return None
        return str(TOY_MODEL_DIR) if self.teacher == "toy" else self.teacher


class DataSection(_Section):
    train_set: str = "toy_id"
    train_split: str = "train"
    train_path: str | None = None  # a local file instead of the registry's default source
    train_limit: int | None = Field(240, ge=1)
    eval_sets: tuple[str, ...] = ("toy_id", "toy_ood_compare", "toy_ood_distractor")
    eval_split: str = "test"
    eval_limit: int | None = Field(48, ge=1)
    data_dir: str | None = None
    chat_template: bool = False  # prompts (sampling, SFT and evaluation alike) go through the model's chat template
    seed: int = 0  # which questions train_limit / eval_limit pick, and which few-shot exemplars are drawn
    mixture_share: float = Field(0.5, ge=0, le=1)  # data mixture: share of the previous iteration's kept pairs


class GenerationSection(_Section):
    """Sampling the training answers. ``num_shots`` exemplars steer sampling only (the paper uses 10); the kept
    answers are trained on the zero-shot prompt, the format evaluation uses by default."""

    engine: Literal["auto", "transformers", "vllm"] = "auto"
    num_shots: int = Field(0, ge=0, le=20)
    # auto: bfloat16 where the device has it natively (a bf16 CPU, a GPU), else float32; sdpa attention
    # (actors.engines.base.resolve_attention says why). Resolved into the engine spec before anything runs, so
    # the stage fingerprints hold the concrete values.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    samples_per_question: int = Field(4, ge=1, le=256)
    temperatures: tuple[float, ...] = (0.2, 0.4, 0.6)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    questions_per_batch: int = Field(32, ge=1)
    # vLLM only
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = None
    enforce_eager: bool = True

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(t < 0 or t > 2 for t in value):
            raise ValueError("temperatures must be a non-empty list of values in [0, 2]")
        return value


class SFTSection(_Section):
    """Paper: 3 epochs, batch 4 per device, accumulation 4, lr 2e-5, warm-up 0.03, cosine, bf16, ZeRO-3."""

    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)  # at resources.sft_workers workers
    # examples per optimizer step, whatever the worker count an elastic run gets (accumulation follows the
    # workers); None: per_device_batch_size x gradient_accumulation_steps x resources.sft_workers
    global_batch_size: int | None = Field(None, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 3
    # Ray Train checkpoints (read after a worker failure, an elastic resize, or a rerun after the driver died):
    # "auto" writes them only where training is estimated to take over a minute (actors/training.py)
    checkpoints: bool | Literal["auto"] = "auto"
    checkpoint_every_steps: int | None = Field(None, ge=1)  # besides each epoch end


class MergeSection(_Section):
    """α is the weight of the ORIGINAL base (Eq. 6): α = 1 gives the base, α = 0 the DARE'd SFT model."""

    alpha: float = Field(0.5, ge=0, le=1)
    drop_rate: float = Field(0.2, ge=0, lt=1)
    exclude: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    importance_set: str | None = None  # IIMM: the data set the layer importance is computed on (default: train set)
    importance_limit: int = Field(64, ge=1)


class EvalSection(_Section):
    """pass@k over ``samples`` answers per question. ``num_shots`` defaults to 0: the zero-shot prompt the
    fine-tuned models are trained on (the paper's own evaluation is zero-shot CoT). ``seed`` fixes the
    evaluation's sampling, the same for every experiment seed."""

    samples: int = Field(4, ge=1, le=1000)
    num_shots: int = Field(0, ge=0, le=20)
    seed: int = 0
    temperature: float = Field(0.6, ge=0, le=2)
    k: tuple[int, ...] = (1, 4)
    max_new_tokens: int | None = None  # default: generation.max_new_tokens
    # per-layer weight change (vs the base) and importance of every SFT and merged model, in the report
    layer_analysis: bool = True
    # where the layer analysis (and IIMM's importance) runs, as a Ray task: auto = a GPU when resources.use_gpu.
    # It holds the model and its layer gradients in float32 (imm-ray plan shows the memory; a 7B model needs more
    # than one 40 GB GPU, so the Llama-2-7B configs say cpu).
    analysis_device: Literal["auto", "cpu", "cuda"] = "auto"
    # the CPUs the analysis task asks Ray for and computes with (torch threads); None: those of one SFT worker.
    # The memory plan refuses more than a node has (the task would wait for a node that never comes).
    analysis_cpus: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvalSection:
        if not self.k or any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"every k must be between 1 and samples={self.samples}, got {list(self.k)}")
        return self


class ResourcesSection(_Section):
    generation_actors: int = Field(2, ge=1)
    cpus_per_generation_actor: float = Field(1, gt=0)
    gpus_per_generation_actor: float = Field(0, ge=0)
    sft_workers: int = Field(2, ge=1)
    sft_min_workers: int | None = Field(None, ge=1)  # elastic training: (min, sft_workers)
    cpus_per_sft_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    merge_workers: int = Field(2, ge=1)
    sft_max_failures: int = Field(0, ge=-1)
    # (seed, strategy) chains the loop runs at once; their stages share the cluster and Ray queues what does not
    # fit. No stage reads it, so no result depends on it (imm_ray/loop.py).
    concurrent_chains: int = Field(1, ge=1)


class SweepSection(_Section):
    """Ray Tune search space over the merge α, the DARE drop rate and the number of iterations.

    ``grid``: every combination of the listed values. ``random``: ``num_samples`` trials, α and drop rate drawn
    uniformly between the smallest and largest listed value, iterations drawn from the list; seeded.
    """

    strategy: StrategyName = "imm"
    search: Literal["grid", "random"] = "grid"
    alpha: tuple[float, ...] = (0.5,)
    drop_rate: tuple[float, ...] = (0.2,)
    iterations: tuple[int, ...] = (1,)
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = "OOD mean"  # a data set name or "OOD mean"; the sweep's best trial maximises it

    @field_validator("alpha")
    @classmethod
    def _alphas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 <= a <= 1 for a in value):
            raise ValueError("alpha values must lie in [0, 1]")
        return value

    @field_validator("drop_rate")
    @classmethod
    def _drop_rates(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 <= p < 1 for p in value):
            raise ValueError("drop_rate values must lie in [0, 1)")
        return value

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(t < 1 for t in value):
            raise ValueError("iterations values must be >= 1")
        return value


class ExperimentConfig(_Section):
    experiment: ExperimentSection = ExperimentSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    generation: GenerationSection = GenerationSection()
    sft: SFTSection = SFTSection()
    merge: MergeSection = MergeSection()
    eval: EvalSection = EvalSection()
    resources: ResourcesSection = ResourcesSection()
    sweep: SweepSection = SweepSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if "distillation" in self.experiment.strategies and self.model.teacher is None:
            raise ValueError("strategy 'distillation' needs model.teacher")
        if self.data.train_set not in self.data.eval_sets:
            raise ValueError(f"data.eval_sets must include the in-domain data.train_set ({self.data.train_set})")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.experiment.output_dir) / self.experiment.name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` → (["section", "field"], value parsed as YAML, so 0.3 is a float, [a,b] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has no field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None
    return parts, value


def seeds_override(seeds: str | None) -> list[str]:
    """The ``--seeds 0,1,2`` option of ``imm-ray run`` and ``imm-ray sweep`` as a ``--set`` override."""
    return [] if seeds is None else [f"experiment.seeds=[{seeds}]"]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each override set; intermediate mappings are created as needed."""
    result = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def validate(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping; errors name every bad field as ``section.field``."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(top level)"
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"  {where}: {message}")
        raise ConfigError(f"{source} is not valid:\n" + "\n".join(problems)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
        raw = loaded or {}
        source = str(path)
    return validate(apply_overrides(raw, list(overrides)), source)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    data = config.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
