"""The memory plan of a run: each kind of stage it will run, its processes and what each needs, checked against
the node types of a cluster, before any work.

Stages of one kind on one model ask for the same resources and memory (every generation of the student, every
SFT), so the plan has one row per (kind, model); ``imm-ray plan`` lists every declared stage under its row.
:func:`check_plan` raises :class:`MemoryPlanError` naming the first stage that cannot be placed and by how much.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from imm_ray.analysis_resources import analysis_resources
from imm_ray.config import ConfigError, ExperimentConfig
from imm_ray.memory import estimate
from imm_ray.memory.nodes import GIB, NodeType
from imm_ray.memory.shapes import ModelShape, model_shape
from imm_ray.strategies import STRATEGIES

Role = Literal["student", "teacher"]
# prompt tokens assumed when generation.max_model_len is not set (the model's max_position_embeddings still bounds
# the sequence): a 10-shot GSM8K prompt is about 1,000 tokens, a zero-shot one under 200.
DEFAULT_PROMPT_TOKENS = 512


class MemoryPlanError(ConfigError):
    """A config whose stages cannot fit the cluster's node types; the message names the stage and the shortfall."""


class StagePlan(BaseModel):
    """One kind of stage on one model: how many processes, what each asks Ray for and what memory it needs."""

    model_config = ConfigDict(frozen=True)

    kind: str  # the stage kind (imm_ray/steps.py): generate, eval, sft, merge, analysis, importance
    role: Role
    model: str
    what: str
    processes: int  # that must run at once
    cpus: float  # per process
    gpus: float  # per process
    need: estimate.Need  # of one process; gpu_bytes are per GPU

    @property
    def label(self) -> str:
        return f"{self.kind} ({self.model})"


class MemoryPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    stages: tuple[StagePlan, ...]
    shapes: tuple[tuple[str, ModelShape], ...]

    def row(self, kind: str, role: Role = "student") -> StagePlan | None:
        found = [s for s in self.stages if s.kind == kind]
        return next((s for s in found if s.role == role), found[0] if found else None)


def memory_plan(config: ExperimentConfig, gpu_memory: int | None) -> MemoryPlan:
    """The plan of ``config``; ``gpu_memory`` (bytes of one GPU of the node type GPU stages land on) sizes vLLM's
    claim, None where the cluster has no GPU of known size."""
    student = model_shape("model.path", config.model.resolved_path())
    shapes = [(_short(config.model.path), student)]
    teacher = None
    if config.model.teacher is not None and any(STRATEGIES[s].teacher_generates for s in config.experiment.strategies):
        teacher = model_shape("model.teacher", config.model.resolved_teacher())
        shapes.append((_short(config.model.teacher), teacher))
    stages = []
    if teacher is not None:
        stages.append(_generation(config, teacher, "teacher", "generate", gpu_memory))
    if any(not STRATEGIES[s].teacher_generates for s in config.experiment.strategies):
        stages.append(_generation(config, student, "student", "generate", gpu_memory))
    stages.append(_sft(config, student))
    if any(STRATEGIES[s].merge_method for s in config.experiment.strategies):
        stages.append(_merge(config))
    stages.append(_generation(config, student, "student", "eval", gpu_memory))
    if config.eval.layer_analysis:
        stages.append(_analysis(config, student, "analysis"))
    if "iimm" in config.experiment.strategies:
        stages.append(_analysis(config, student, "importance"))
    return MemoryPlan(stages=tuple(stages), shapes=tuple(shapes))


def _short(path: str) -> str:
    return Path(path).name if Path(path).is_dir() else path.split("/")[-1]


def _generation_dtype(config: ExperimentConfig, on_gpu: bool) -> str:
    dtype = config.generation.dtype
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu else "float32"  # engines/base.py resolve_dtype; float32: the CPU's worst case


def _generation(config: ExperimentConfig, shape: ModelShape, role: Role, kind: str,
                gpu_memory: int | None) -> StagePlan:
    gen, res = config.generation, config.resources
    on_gpu = res.gpus_per_generation_actor > 0
    dtype = _generation_dtype(config, on_gpu)
    new_tokens = gen.max_new_tokens if kind == "generate" else (config.eval.max_new_tokens or gen.max_new_tokens)
    context = gen.max_model_len or new_tokens + (1024 if gen.num_shots and kind == "generate" else DEFAULT_PROMPT_TOKENS)
    context = min(context, shape.max_positions or context)
    engine = "vllm" if gen.engine == "vllm" or (gen.engine == "auto" and on_gpu) else "transformers"
    model = _short(config.model.teacher if role == "teacher" else config.model.path)
    if engine == "vllm" and on_gpu:
        tp = gen.tensor_parallel_size
        need = estimate.vllm_need(shape, gpu_memory=gpu_memory or 0, utilization=gen.gpu_memory_utilization,
                                  tensor_parallel=tp, dtype=dtype, max_model_len=context)
        what = f"vLLM, TP {tp}, {dtype}, gpu_memory_utilization {gen.gpu_memory_utilization}"
    else:
        samples = gen.samples_per_question if kind == "generate" else config.eval.samples
        need = estimate.transformers_need(shape, dtype=dtype, sequences=gen.questions_per_batch * samples,
                                          context=context, on_gpu=on_gpu, prompts=gen.questions_per_batch)
        what = f"transformers, {dtype}"
    return StagePlan(kind=kind, role=role, model=model, what=what, processes=res.generation_actors,
                     cpus=res.cpus_per_generation_actor, gpus=res.gpus_per_generation_actor, need=need)


def _sft(config: ExperimentConfig, shape: ModelShape) -> StagePlan:
    sft, res = config.sft, config.resources
    workers = res.sft_min_workers or res.sft_workers  # the fewest workers hold the largest ZeRO partitions
    need = estimate.sft_need(shape, stage=sft.zero_stage, workers=workers, precision=sft.precision,
                             batch=sft.per_device_batch_size, max_length=sft.max_length, on_gpu=res.use_gpu)
    return StagePlan(kind="sft", role="student", model=_short(config.model.path),
                     what=f"DeepSpeed ZeRO-{sft.zero_stage}, {sft.precision}, {workers} workers", processes=workers,
                     cpus=res.cpus_per_sft_worker, gpus=1 if res.use_gpu else 0, need=need)


def _merge(config: ExperimentConfig) -> StagePlan:
    from imm_ray.merge.options import DEFAULT_CHUNK_ELEMENTS

    # the pool shrinks to the CPUs there are (actors/merging.py _pool_size): one worker is the minimum
    return StagePlan(kind="merge", role="student", model=_short(config.model.path),
                     what=f"up to {config.resources.merge_workers} merge actors, streamed chunks", processes=1, cpus=1,
                     gpus=0, need=estimate.merge_need(DEFAULT_CHUNK_ELEMENTS))


def _analysis(config: ExperimentConfig, shape: ModelShape, kind: str) -> StagePlan:
    resources = analysis_resources(config)
    on_gpu = resources.device == "cuda"
    need = estimate.importance_need(shape, batch=resources.batch_size, tokens=config.sft.max_length, on_gpu=on_gpu)
    what = (f"Ray task on the {'GPU' if on_gpu else 'CPU'}, float32, batch {resources.batch_size} of up to "
            "sft.max_length tokens")
    return StagePlan(kind=kind, role="student", model=_short(config.model.path), what=what, processes=1,
                     cpus=resources.cpus, gpus=1 if on_gpu else 0, need=need)


# ------------------------------------------------------------------------------------------------ the check


def gib(value: float) -> str:
    """Bytes for a reader: GiB with one decimal, MiB below one GiB."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"


def shortfalls(stage: StagePlan, node: NodeType) -> list[str]:
    """What one process of ``stage`` lacks on one node of ``node`` (empty: it fits)."""
    lacks = []
    if node.cpus < stage.cpus:
        lacks.append(f"{stage.cpus:g} CPUs asked, {node.cpus:g} there")
    if node.gpus < stage.gpus:
        lacks.append(f"{stage.gpus:g} GPUs asked, {node.gpus:g} there")
    if stage.need.host_bytes > node.memory_bytes:
        lacks.append(f"host memory short by {gib(stage.need.host_bytes - node.memory_bytes)} "
                     f"(needs {gib(stage.need.host_bytes)}, {gib(node.memory_bytes)} there)")
    if stage.gpus and node.gpus >= stage.gpus and node.gpu_memory_bytes is not None \
            and stage.need.gpu_bytes > node.gpu_memory_bytes:
        lacks.append(f"GPU memory short by {gib(stage.need.gpu_bytes - node.gpu_memory_bytes)} "
                     f"(needs {gib(stage.need.gpu_bytes)} of one GPU, {gib(node.gpu_memory_bytes)} there)")
    return lacks


def per_node(stage: StagePlan, node: NodeType) -> int:
    """How many processes of ``stage`` one node holds (CPUs, GPUs and host memory shared)."""
    if shortfalls(stage, node):
        return 0
    limits = [node.memory_bytes // max(stage.need.host_bytes, 1)]
    if stage.cpus:
        limits.append(math.floor(node.cpus / stage.cpus + 1e-9))
    if stage.gpus:
        limits.append(math.floor(node.gpus / stage.gpus + 1e-9))
    return int(min(limits))


def check_plan(plan: MemoryPlan, nodes: list[NodeType]) -> None:
    """Raise :class:`MemoryPlanError` for the first stage whose processes the node types cannot hold."""
    if not nodes:
        raise MemoryPlanError("memory plan: no node types to check against")
    for stage in plan.stages:
        if stage.gpus and stage.need.gpu_bytes and not any(n.gpus and n.gpu_memory_bytes for n in nodes) \
                and any(n.gpus for n in nodes):
            continue  # GPUs of unknown size: the GPU memory cannot be checked (the CLI says so)
        capacity = sum(node.count * per_node(stage, node) for node in nodes)
        if capacity >= stage.processes:
            continue
        if capacity == 0:
            best = _closest(stage, nodes)
            raise MemoryPlanError(
                f"memory plan: stage {stage.label} ({stage.what}) cannot fit: on {best.name}: "
                + "; ".join(shortfalls(stage, best) or ["host memory for even one process"])
            )
        raise MemoryPlanError(
            f"memory plan: stage {stage.label} ({stage.what}) needs {stage.processes} processes at once, the node "
            f"types hold at most {capacity}: short by {stage.processes - capacity} process(es) of {stage.cpus:g} CPU, "
            f"{stage.gpus:g} GPU, {gib(stage.need.host_bytes)} host memory"
        )


def _closest(stage: StagePlan, nodes: list[NodeType]) -> NodeType:
    """The node type a user would expect the stage on: the one with the most GPU memory (GPU stages) or heap."""
    def key(node: NodeType) -> tuple:
        return (bool(node.gpus) == bool(stage.gpus), node.gpu_memory_bytes or 0, node.memory_bytes, node.cpus)

    return max(nodes, key=key)


def gpu_memory_of(nodes: list[NodeType]) -> int | None:
    """The per-GPU memory the GPU stages are sized with: the largest GPU of any node type (None: unknown)."""
    sizes = [n.gpu_memory_bytes for n in nodes if n.gpus and n.gpu_memory_bytes]
    return max(sizes) if sizes else None
