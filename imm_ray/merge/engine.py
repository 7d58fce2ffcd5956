"""The merge compute, run by the workers: any batch of a plan, in any process, in any order.

``run_batch`` reads each element range chunk by chunk (raw bytes through :class:`ChunkReader`), draws its DARE masks
from the tensor's own stream, merges in float32 with torch (the method registry), converts to the output dtype,
checks that every value is finite and writes the bytes in place. Nothing a range produces depends on the other
ranges, the worker, the chunk size or the order, so the output files are the same bytes for any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from imm_ray.merge import masks
from imm_ray.merge.errors import MergeError
from imm_ray.merge.methods import METHODS, magnitude_floor, merge_chunk
from imm_ray.merge.plan import MergePlan, TensorJob, WorkUnit
from imm_ray.merge.tensors import ChunkReader, ShardWriter, TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def run_batch(plan: MergePlan, batch: tuple[WorkUnit, ...]) -> int:
    """Compute and write every range of ``batch``; returns the number of elements written."""
    with ChunkReader() as reader, ShardWriter(plan.folder) as writer:
        for unit in batch:
            job = plan.tensors[unit.name]
            if job.merge:
                _merge_unit(plan, job, unit, reader, writer)
            else:
                _copy_unit(plan, job, unit, reader, writer)
    return sum(unit.stop - unit.start for unit in batch)


def _chunks(plan: MergePlan, unit: WorkUnit) -> Iterator[tuple[int, int]]:
    for start in range(unit.start, unit.stop, plan.chunk_elements):
        yield start, min(start + plan.chunk_elements, unit.stop)


def _copy_unit(plan: MergePlan, job: TensorJob, unit: WorkUnit, reader: ChunkReader, writer: ShardWriter) -> None:
    """Integer and bool buffers are not merged: the base's bytes are copied."""
    for start, stop in _chunks(plan, unit):
        writer.write(job.output, start, reader.read(job.inputs[0], start, stop))


def read_tensor(reader: ChunkReader, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Elements ``start .. stop-1`` of a stored tensor as a flat torch tensor of its stored dtype (no copy)."""
    return torch.from_numpy(reader.read(info, start, stop)).view(TORCH_DTYPES[info.dtype])


def _read_float(job: TensorJob, reader: ChunkReader, start: int, stop: int) -> list[torch.Tensor]:
    """Each input's chunk as float32; an input stored in the same place as another (previous = base) is read once."""
    seen: dict[tuple[Path, int], torch.Tensor] = {}
    chunks = []
    for info in job.inputs:
        key = (info.file, info.offset)
        if key not in seen:
            seen[key] = read_tensor(reader, info, start, stop).to(torch.float32)
        chunks.append(seen[key])
    return chunks


def _merge_unit(plan: MergePlan, job: TensorJob, unit: WorkUnit, reader: ChunkReader, writer: ShardWriter) -> None:
    method = METHODS[plan.method]
    models = len(job.inputs) - 2
    dropping = job.drop_rate > 0
    streams = []
    if method.sparsify == "dare" and dropping:
        streams = [masks.KeepMaskStream(masks.MaskKey(plan.seed, plan.iteration, job.name, index), job.drop_rate,
                                        unit.start) for index in range(models)]
    floors = None
    if method.sparsify == "magnitude" and dropping:
        floors = [_magnitude_floor(plan, job, unit, reader, index) for index in range(models)]
    out_dtype = TORCH_DTYPES[job.output.dtype]
    for start, stop in _chunks(plan, unit):
        base, previous, *finetuned = _read_float(job, reader, start, stop)
        keep = [torch.from_numpy(stream.take(stop - start)) for stream in streams] or None
        merged = merge_chunk(method, base, previous, finetuned, alpha=plan.alpha, drop_rate=job.drop_rate,
                             keep=keep, floors=floors, weight=job.weight)
        values = merged.to(out_dtype)
        _check_finite(plan, job, values, [base, previous, *finetuned], start)
        writer.write(job.output, start, values.view(torch.uint8).numpy())


def _magnitude_floor(plan: MergePlan, job: TensorJob, unit: WorkUnit, reader: ChunkReader, index: int) -> float | None:
    def deltas() -> Iterator[torch.Tensor]:
        for start, stop in _chunks(plan, unit):
            chunks = _read_float(job, reader, start, stop)
            yield chunks[2 + index] - chunks[1]

    return magnitude_floor(deltas, job.drop_rate, job.numel)


def _check_finite(
    plan: MergePlan, job: TensorJob, values: torch.Tensor, inputs: list[torch.Tensor], start: int
) -> None:
    """A NaN or Inf anywhere in the output is an error naming the tensor, and the input that carried it if any.

    ``aminmax`` is the cheapest full check measured (NaN and ±Inf both surface in min or max).
    """
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    for role, info, chunk in zip(plan.roles, job.inputs, inputs):
        if not bool(torch.isfinite(chunk).all()):
            raise MergeError(f"tensor {job.name!r}: {role} ({info.file}) contains NaN or Inf")
    where = start + int((~torch.isfinite(values)).nonzero()[0, 0])
    raise MergeError(f"tensor {job.name!r}: the merge produced NaN or Inf at element {where} "
                     f"(a value too large for {job.output.dtype}?)")
