"""Everything checked and loaded before the first expensive stage: models, data, resources, engine.

A bad model path, an empty data set or a config asking for more CPUs than the cluster has fails here, with the
config field named, before any sampling or training starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imm_ray.config import ExperimentConfig
from imm_ray.data.records import Problem
from imm_ray.data.registry import hub_unreachable
from imm_ray.stages import model_fingerprint

if TYPE_CHECKING:
    from actors.engines import EngineSpec
    from actors.generation import PoolSpec, SamplingPlan


class PreflightError(ValueError):
    """A problem with the run's inputs found before any expensive work; the message names the field."""


@dataclass(frozen=True)
class ModelRef:
    """A model the preflight resolved: its local folder and its content fingerprint."""

    path: str
    fingerprint: str


def resolve_model(field: str, path: str, trust_remote_code: bool) -> str:
    """A local HF folder with safetensors weights, or a hub id fetched into the local cache."""
    folder = Path(path)
    if folder.is_dir():
        check_model_folder(field, folder)
        return str(folder.resolve())  # absolute: Ray workers run in their own working directories
    if folder.exists() or path.startswith((".", "/")) or path.count("/") != 1:
        raise PreflightError(f"{field}: {path} is not a model folder (no such directory)")
    unreachable = hub_unreachable()  # then only the local hub cache: no five retries of a failed connection
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                                  local_files_only=unreachable is not None)
    except Exception as error:  # noqa: BLE001 - any hub failure means the same thing to the user
        why = f"{unreachable}; not in the local hub cache" if unreachable else type(error).__name__
        raise PreflightError(
            f"{field}: {path} is neither a local folder nor reachable on the Hugging Face hub ({why})"
        ) from None
    check_model_folder(field, Path(local))
    return local


def check_model_folder(field: str, folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise PreflightError(f"{field}: {folder} has no config.json, so it is not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (
            f" It holds pickle checkpoints ({', '.join(pickles)}), which imm-ray never loads: convert them with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
            if pickles else ""
        )
        raise PreflightError(f"{field}: {folder} has no .safetensors weights.{hint}")


@dataclass
class PreparedRun:
    """The checked inputs of a run: models, questions, and the prompts in each of the run's three uses.

    ``train_prompts`` steer the sampling of training answers (``generation.num_shots`` exemplars);
    ``sft_prompts`` are what SFT trains on and what evaluation asks by default (zero-shot, through the chat
    template where ``data.chat_template`` is on); ``eval_prompts`` are the evaluation's (``eval.num_shots``).
    """

    config: ExperimentConfig
    base: ModelRef
    teacher: ModelRef | None
    train_problems: list[Problem]
    train_prompts: list[str]
    sft_prompts: dict[str, str]  # question id -> the prompt its kept answers are trained on
    eval_sets: dict[str, list[Problem]]
    eval_prompts: dict[str, list[str]]
    engine_kind: str
    _importance_pairs: list[tuple[str, str]] | None = field(default=None, init=False, repr=False)

    def engine_spec(self, model_path: str) -> EngineSpec:
        from actors.engines import EngineSpec

        gen, res = self.config.generation, self.config.resources
        return EngineSpec(
            kind=self.engine_kind, model_path=model_path, trust_remote_code=self.config.model.trust_remote_code,
            threads=max(1, int(res.cpus_per_generation_actor)), tensor_parallel_size=gen.tensor_parallel_size,
            gpu_memory_utilization=gen.gpu_memory_utilization, max_model_len=gen.max_model_len,
            enforce_eager=gen.enforce_eager, dtype=gen.dtype, attention=gen.attention,
        )

    def sampling_plan(self, seed: int) -> SamplingPlan:
        from actors.generation import SamplingPlan

        gen = self.config.generation
        return SamplingPlan(
            samples_per_question=gen.samples_per_question, temperatures=gen.temperatures,
            max_new_tokens=gen.max_new_tokens, top_p=gen.top_p, questions_per_batch=gen.questions_per_batch, seed=seed,
        )

    def eval_plan(self) -> SamplingPlan:
        from actors.generation import SamplingPlan

        ev, gen = self.config.eval, self.config.generation
        return SamplingPlan(
            samples_per_question=ev.samples, temperatures=(ev.temperature,),
            max_new_tokens=ev.max_new_tokens or gen.max_new_tokens, top_p=gen.top_p,
            questions_per_batch=gen.questions_per_batch, seed=ev.seed,
        )

    @property
    def generation_pool(self) -> PoolSpec:
        from actors.generation import PoolSpec

        res = self.config.resources
        return PoolSpec(
            min_actors=res.generation_actors, max_actors=res.generation_actors,
            cpus_per_actor=res.cpus_per_generation_actor, gpus_per_actor=res.gpus_per_generation_actor,
        )

    def importance_pairs(self) -> list[tuple[str, str]]:
        """(prompt, reference response) pairs the layer importance is computed on, in the SFT prompt format;
        loaded once (every analysed model of the run declares the same pairs)."""
        if self._importance_pairs is None:
            self._importance_pairs = self._load_importance_pairs()
        return self._importance_pairs

    def _load_importance_pairs(self) -> list[tuple[str, str]]:
        from imm_ray.data.prompts import reference_response

        cfg = self.config
        name = cfg.merge.importance_set or cfg.data.train_set
        problems = _load(
            "merge.importance_set", name, cfg.data.train_split, cfg.data.data_dir, cfg.merge.importance_limit,
            cfg.data.seed, cfg.data.train_path if name == cfg.data.train_set else None,
        )
        prompt = _prompter(cfg, name, 0, self.base.path)
        pairs = [(prompt(p), reference_response(p)) for p in problems]
        pairs = [(q, r) for q, r in pairs if r]
        if not pairs:
            raise PreflightError(f"merge.importance_set: {name} has no reference solutions to compute importance on")
        return pairs


def _load(field: str, name: str, split: str, data_dir: str | None, limit: int | None, seed: int,
          path: str | None = None) -> list[Problem]:
    from imm_ray.data.registry import load_set

    try:
        problems = load_set(name, split, path=path, data_dir=data_dir, limit=limit, seed=seed)
    except (ValueError, OSError) as error:
        raise PreflightError(f"{field}: {error}") from None
    if not problems:
        raise PreflightError(f"{field}: data set {name} ({split} split) has no questions")
    return problems


def _prompter(config: ExperimentConfig, set_name: str, num_shots: int, model_path: str):
    """The prompt of each problem of a set: ``num_shots`` exemplars drawn with ``data.seed``, in the chat template
    of the base model's tokenizer when ``data.chat_template`` is on."""
    from imm_ray.data.prompts import make_prompter

    tokenizer = _chat_tokenizer(model_path, config.model.trust_remote_code) if config.data.chat_template else None
    return make_prompter(
        set_name, num_shots=num_shots, seed=config.data.seed, data_dir=config.data.data_dir,
        chat_template_tokenizer=tokenizer,
    )


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(model_path: str, trust_remote_code: bool):
    """The base model's tokenizer, loaded once for every set's prompts (sampling, SFT, evaluation, importance)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _prompts(config: ExperimentConfig, set_name: str, problems: list[Problem], model_path: str,
             num_shots: int) -> list[str]:
    prompter = _prompter(config, set_name, num_shots, model_path)
    return [prompter(problem) for problem in problems]


def cluster_capacity() -> dict[str, float]:
    """The most the cluster can offer: what its nodes hold now, or, on an autoscaling cluster (``ray up``),
    what the autoscaler may start, whichever is larger. A job submitted to a fresh cluster sees only the
    head node, with no GPUs, until the first stage asks for them.

    The autoscaler's node types come from its cluster config (imm_ray/memory/nodes.py: Ray 2.60 has no public API
    for them, so the file the head node's autoscaler was started with is read)."""
    import ray

    from imm_ray.memory.nodes import autoscaler_node_types

    current = ray.cluster_resources()
    limits: dict[str, float] = {}
    for node in autoscaler_node_types():
        limits["CPU"] = limits.get("CPU", 0) + node.count * node.cpus
        limits["GPU"] = limits.get("GPU", 0) + node.count * node.gpus
    return {key: max(current.get(key, 0), limits.get(key, 0)) for key in {*current, *limits}}


def check_memory(config: ExperimentConfig) -> None:
    """The memory plan (``imm-ray plan``) against the live cluster's nodes and the autoscaler's node types: a stage
    that cannot fit is refused here, from the models' config.json alone, before any model is fetched."""
    from imm_ray.memory.nodes import autoscaler_node_types, live_node_types
    from imm_ray.memory.plan import MemoryPlanError, check_plan, gpu_memory_of, memory_plan
    from imm_ray.memory.shapes import ShapeError

    nodes = live_node_types() + autoscaler_node_types()
    try:
        check_plan(memory_plan(config, gpu_memory_of(nodes)), nodes)
    except (MemoryPlanError, ShapeError) as error:
        raise PreflightError(f"{error} (imm-ray plan CONFIG --cluster live shows the whole plan)") from None


def check_resources(config: ExperimentConfig) -> None:
    """The cluster must hold the largest single request of any stage (Ray queues what does not fit beside the
    stages of other chains running at once, but a request larger than the cluster would wait forever)."""
    available = cluster_capacity()
    res = config.resources
    cpus = available.get("CPU", 0)
    gpus = available.get("GPU", 0)
    needs = {
        "resources.generation_actors × cpus_per_generation_actor": res.generation_actors * res.cpus_per_generation_actor,
        "resources.sft_workers × cpus_per_sft_worker": (res.sft_min_workers or res.sft_workers) * res.cpus_per_sft_worker,
        "resources.merge_workers": res.merge_workers,
    }
    for field, need in needs.items():
        if need > cpus:
            raise PreflightError(f"{field} asks for {need:g} CPUs but the Ray cluster has {cpus:g}")
    gpu_need = max(res.generation_actors * res.gpus_per_generation_actor,
                   (res.sft_min_workers or res.sft_workers) if res.use_gpu else 0)
    if gpu_need > gpus:
        raise PreflightError(f"resources asks for {gpu_need:g} GPUs but the Ray cluster has {gpus:g}")


def prepare_eval(config: ExperimentConfig) -> PreparedRun:
    """What evaluating one model needs: the model, the eval sets, resources (no training data)."""
    return prepare_run(config, with_training_data=False)


def prepare_run(config: ExperimentConfig, *, with_training_data: bool = True, check_cluster: bool = True) -> PreparedRun:
    """Resolve models, load data and check resources; raise :class:`PreflightError` on the first problem.

    ``check_cluster=False`` skips the one check that needs a Ray cluster (``imm-ray status`` declares a run's
    stages without starting one)."""
    from actors.engines import resolve_engine_kind

    cfg, data = config, config.data
    if check_cluster:
        check_memory(cfg)
    base_path = resolve_model("model.path", cfg.model.resolved_path(), cfg.model.trust_remote_code)
    base = ModelRef(base_path, model_fingerprint(base_path))
    teacher = None
    if cfg.model.teacher is not None:
        teacher_path = resolve_model("model.teacher", cfg.model.resolved_teacher(), cfg.model.trust_remote_code)
        teacher = ModelRef(teacher_path, model_fingerprint(teacher_path))
    seed = data.seed
    train = (
        _load("data.train_set", data.train_set, data.train_split, data.data_dir, data.train_limit, seed, data.train_path)
        if with_training_data else []
    )
    eval_sets = {
        name: _load("data.eval_sets", name, data.eval_split, data.data_dir, data.eval_limit, seed)
        for name in data.eval_sets
    }
    if check_cluster:
        check_resources(cfg)
    try:
        engine_kind = resolve_engine_kind(cfg.generation.engine)
    except RuntimeError as error:
        raise PreflightError(f"generation.engine: {error}") from None
    train_prompts = _prompts(cfg, data.train_set, train, base_path, cfg.generation.num_shots) if train else []
    sft_prompts = dict(zip([p.id for p in train], _prompts(cfg, data.train_set, train, base_path, 0))) if train else {}
    eval_prompts = {name: _prompts(cfg, name, probs, base_path, cfg.eval.num_shots) for name, probs in eval_sets.items()}
    return PreparedRun(
        config=cfg, base=base, teacher=teacher, train_problems=train, train_prompts=train_prompts,
        sft_prompts=sft_prompts, eval_sets=eval_sets, eval_prompts=eval_prompts, engine_kind=engine_kind,
    )
