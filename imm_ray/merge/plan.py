"""The merge plan, made by the driver from the inputs' headers alone (no torch, no tensor data).

``open_inputs`` validates every input model before any work starts. ``plan_merge`` fixes every output tensor's place
in the output shards and every tensor's own parameters (drop rate after --exclude, IIMM layer scale).
``work_batches`` cuts the work into element ranges of tensors, balanced by size, for the workers
(:func:`imm_ray.merge.engine.run_batch`). ``merge_record`` describes the finished merge.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import imm_ray
from imm_ray.merge import masks
from imm_ray.merge.errors import MergeError
from imm_ray.merge.methods import METHODS, layer_of, layer_scales, read_layer_importance
from imm_ray.merge.options import MergeOptions
from imm_ray.merge.record import InputRecord, MaskRecord, MergeRecord
from imm_ray.merge.tensors import (
    OUTPUT_DTYPES,
    ModelFiles,
    OutputTensor,
    ShardPlan,
    TensorInfo,
    check_compatible,
    fingerprint,
    open_model,
    plan_shards,
    tied_duplicates,
)

UNIT_ELEMENTS = 1 << 23  # the largest range one call to a worker handles (32 MiB of float32)
TARGET_BATCHES = 64  # enough calls to balance up to 16 workers; fewer calls would idle some at the end
MIN_UNIT_ELEMENTS = 1024  # below this, the cost of a call to an actor dominates
FINGERPRINT_KIND = "blake2b-256 of config.json, shard names, sizes and headers, first and last 4 KiB of each tensor"


@dataclass(frozen=True)
class InputModels:
    """The validated inputs, in the order every tensor job lists them: base, previous, finetuned..."""

    base: ModelFiles
    previous: ModelFiles
    finetuned: tuple[ModelFiles, ...]

    @property
    def all(self) -> tuple[ModelFiles, ...]:
        return (self.base, self.previous, *self.finetuned)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs (base, previous, finetuned...), where it goes, and its own parameters."""

    name: str
    inputs: tuple[TensorInfo, ...]
    output: OutputTensor
    drop_rate: float  # 0 when the name matches --exclude
    weight: float  # IIMM's layer scale; 1 otherwise
    merge: bool  # False for integer/bool buffers, which are copied from the base

    @property
    def numel(self) -> int:
        return self.output.numel


@dataclass(frozen=True)
class WorkUnit:
    """Elements ``start .. stop-1`` of one flattened output tensor."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class MergePlan:
    """Everything a worker needs; sent to each worker once."""

    method: str
    alpha: float
    seed: int
    iteration: int
    chunk_elements: int
    roles: tuple[str, ...]
    tensors: Mapping[str, TensorJob]
    shards: ShardPlan
    folder: Path


def open_inputs(options: MergeOptions) -> InputModels:
    """Open and cross-check every input model; fails on the first problem, naming it, before any work starts."""
    base = open_model(options.base.resolve(), "base")
    previous = base
    if options.previous is not None and options.previous.resolve() != base.root:
        previous = open_model(options.previous.resolve(), "previous")
    finetuned = tuple(
        open_model(path.resolve(), f"finetuned[{index}]") for index, path in enumerate(options.finetuned)
    )
    for other in (previous, *finetuned):
        check_compatible(base, other)
    return InputModels(base, previous, finetuned)


def plan_merge(options: MergeOptions, inputs: InputModels, folder: Path) -> MergePlan:
    """Fix the output layout and every tensor's parameters; cheap (headers only)."""
    method = METHODS[options.method]
    skip = tied_duplicates(inputs.base)
    names = [name for name in inputs.base.tensors if name not in skip]
    scales = _layer_scales(options, names) if method.needs_importance else {}
    out_dtypes = {name: _output_dtype(inputs.base.tensors[name], options.dtype) for name in names}
    shards = plan_shards([(name, out_dtypes[name], inputs.base.tensors[name].shape) for name in names])
    jobs = {}
    for name in names:
        infos = tuple(model.tensors[name] for model in inputs.all)
        merge = infos[0].is_float
        jobs[name] = TensorJob(
            name=name,
            inputs=infos,
            output=shards.tensors[name],
            drop_rate=0.0 if options.excludes(name) else options.drop_rate,
            weight=scales.get(layer_of(name), 1.0) if scales else 1.0,
            merge=merge,
        )
    roles = tuple(model.role for model in inputs.all)
    return MergePlan(options.method, options.alpha, options.seed, options.iteration, options.chunk_elements,
                     roles, jobs, shards, folder)


def _output_dtype(info: TensorInfo, requested: str) -> str:
    return OUTPUT_DTYPES[requested] if requested != "auto" and info.is_float else info.dtype


def _layer_scales(options: MergeOptions, names: list[str]) -> dict[int, float]:
    assert options.importance is not None
    importance = read_layer_importance(options.importance)
    layers = {layer for layer in map(layer_of, names) if layer is not None}
    if layers != set(importance):
        missing = sorted(layers - set(importance)) or sorted(set(importance) - layers)
        raise MergeError(f"importance file {options.importance}: its layers do not match the model's "
                         f"{len(layers)} layers (first mismatch: layer {missing[0]})")
    return layer_scales(importance)


def work_batches(plan: MergePlan, unit_elements: int | None = None) -> list[tuple[WorkUnit, ...]]:
    """Element ranges of at most ``unit_elements`` (whole tensors for TIES, whose trim needs the whole tensor),
    small neighbours packed together, largest batch first so that workers finish together.

    The default size aims at :data:`TARGET_BATCHES` batches. Batching never changes the output bytes."""
    if unit_elements is None:
        total = sum(job.numel for job in plan.tensors.values())
        unit_elements = min(UNIT_ELEMENTS, max(MIN_UNIT_ELEMENTS, -(-total // TARGET_BATCHES)))
    whole_tensor = METHODS[plan.method].sparsify == "magnitude"
    units = []
    for job in plan.tensors.values():
        step = max(job.numel, 1) if whole_tensor and job.merge else unit_elements
        starts = range(0, max(job.numel, 1), step)
        units += [WorkUnit(job.name, start, min(start + step, job.numel)) for start in starts]
    batches: list[list[WorkUnit]] = [[]]
    size = 0
    for unit in units:
        if batches[-1] and size + unit.stop - unit.start > unit_elements:
            batches.append([])
            size = 0
        batches[-1].append(unit)
        size += unit.stop - unit.start
    return sorted((tuple(batch) for batch in batches), key=lambda batch: -sum(u.stop - u.start for u in batch))


def merge_record(options: MergeOptions, inputs: InputModels, plan: MergePlan, workers: int,
                 fingerprints: Mapping[str, str], seconds: float) -> MergeRecord:
    """The record of a finished merge (fingerprints come from :func:`input_fingerprints`)."""
    method = METHODS[options.method]
    mask = None
    if method.sparsify == "dare" and options.drop_rate > 0:
        mask = MaskRecord(generator=masks.GENERATOR, seeding=masks.SEEDING, resolution_bits=masks.MASK_BITS,
                          drop_rate=options.drop_rate, effective_drop_rate=masks.effective_drop_rate(options.drop_rate),
                          rescale=1.0 / (1.0 - options.drop_rate))
    trim = None
    if method.sparsify == "magnitude" and options.drop_rate > 0:
        trim = "per tensor and model, the round(p·n) smallest |delta| are zeroed (entries equal to the floor are kept)"
    scales = {layer_of(name): job.weight for name, job in plan.tensors.items() if layer_of(name) is not None}
    return MergeRecord(
        version=imm_ray.__version__, method=options.method, alpha=options.alpha, drop_rate=options.drop_rate,
        seed=options.seed, iteration=options.iteration, exclude=options.exclude,
        excluded_tensors=tuple(name for name in plan.tensors if options.excludes(name)), dtype=options.dtype,
        mask=mask, magnitude_trim=trim, importance=str(options.importance) if options.importance else None,
        layer_scales=dict(sorted(scales.items())) if method.needs_importance else None,
        inputs=tuple(InputRecord(role=model.role, path=str(model.root), fingerprint=fingerprints[model.role])
                     for model in _distinct(inputs)),
        fingerprint_kind=FINGERPRINT_KIND,
        tensors=len(plan.tensors), shards=len(plan.shards.shards), bytes_written=plan.shards.total_bytes,
        chunk_elements=options.chunk_elements, workers=workers, seconds=round(seconds, 3),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def input_fingerprints(inputs: InputModels) -> dict[str, str]:
    return {model.role: fingerprint(model) for model in _distinct(inputs)}


def _distinct(inputs: InputModels) -> list[ModelFiles]:
    return list({id(model): model for model in inputs.all}.values())
