"""The merge methods: one registry, each method a small typed function on float32 tensors.

Every method has the same outer form, Eq. 6 of the paper with α the weight of the ORIGINAL base (DESIGN.md):

    out = α·base + (1−α)·(previous + w·combine(sparsify(finetuned_i − previous) for each i))

and differs only in how each task delta τ_i = finetuned_i − previous is sparsified (DARE's random drop with a
literal 1/(1−p) rescale, TIES's magnitude trim, or nothing) and how the deltas are combined. ``w`` is IIMM's layer
scale N·I_n/Σ_m I_m (1 for every other method and for tensors outside ``model.layers.{n}.``). ``previous`` is θ^t,
the model that was fine-tuned (the base itself at iteration 0).

All functions work on flat float32 chunks of one tensor and use only elementwise torch operations, so a chunk's
result does not depend on how the tensor was cut into chunks. They call tensor methods only, so this module does not
import torch: the driver, which checks options against this registry, never loads it; the workers do.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from imm_ray.merge.errors import MergeError

if TYPE_CHECKING:
    from torch import Tensor

Sparsify = Literal["none", "dare", "magnitude"]
Combine = Callable[[Sequence["Tensor"]], "Tensor"]
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MergeMethod:
    """One entry of the registry: how deltas are sparsified and combined, and what inputs the method takes."""

    name: str
    summary: str
    sparsify: Sparsify
    combine: Combine
    min_models: int = 1
    max_models: int | None = None
    needs_importance: bool = False

    @property
    def uses_drop_rate(self) -> bool:
        return self.sparsify != "none"


def single(deltas: Sequence[Tensor]) -> Tensor:
    """The one model's delta."""
    (delta,) = deltas
    return delta


def total(deltas: Sequence[Tensor]) -> Tensor:
    """Task arithmetic: the sum of the task vectors."""
    out = deltas[0].clone()
    for delta in deltas[1:]:
        out.add_(delta)
    return out


def mean(deltas: Sequence[Tensor]) -> Tensor:
    """Linear: the mean delta, i.e. previous + mean(δ_i) = mean(finetuned_i)."""
    return total(deltas).div_(len(deltas))


def sign_elected_mean(deltas: Sequence[Tensor]) -> Tensor:
    """TIES: elect each entry's sign as the sign of the summed deltas, then average the nonzero deltas that agree.

    Written as a loop of elementwise operations (no reduction over a stacked dimension), so the result of an
    entry never depends on the chunk it was computed in.
    """
    elected = total(deltas).sign_()
    summed = elected.new_zeros(elected.shape)
    count = elected.new_zeros(elected.shape)
    for delta in deltas:
        agrees = (delta.sign() == elected).logical_and_(delta != 0).to(delta.dtype)
        summed.add_(delta * agrees)
        count.add_(agrees)
    return summed.div_(count.clamp_(min=1))


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod("imm", "IMM: α·base + (1−α)·(prev + DARE_p(ft − prev))", "dare", single, 1, 1),
        MergeMethod(
            "iimm", "IIMM: as imm, the delta of layer n scaled by N·I_n/Σ I", "dare", single, 1, 1,
            needs_importance=True,
        ),
        MergeMethod("linear", "α·base + (1−α)·mean(ft_i)", "none", mean, 1, None),
        MergeMethod("task-arithmetic", "α·base + (1−α)·(prev + Σ DARE_p(ft_i − prev))", "dare", total),
        MergeMethod("ties", "TIES: trim the p smallest |δ|, elect signs, disjoint mean", "magnitude",
                    sign_elected_mean, 2),
        MergeMethod("dare-ties", "DARE_p, sign election, disjoint mean", "dare", sign_elected_mean, 2),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None


def dare(delta: Tensor, keep: Tensor | None, drop_rate: float) -> Tensor:
    """DARE: zero the dropped entries, rescale the kept ones by exactly 1/(1−p). ``keep`` is 0/1 (uint8)."""
    if keep is None or drop_rate == 0:
        return delta
    return delta.mul_(keep).mul_(1.0 / (1.0 - drop_rate))


def magnitude_trim(delta: Tensor, floor: float | None) -> Tensor:
    """TIES trim: keep the entries whose magnitude reaches the tensor's floor, zero the rest (no rescale)."""
    if floor is None:
        return delta
    return delta.mul_(delta.abs() >= floor)


def interpolate(base: Tensor, previous: Tensor, delta: Tensor, alpha: float, weight: float = 1.0) -> Tensor:
    """Eq. 6 written literally, so that α = 1 returns the base's values exactly (0·x = 0 for finite x)."""
    if weight != 1.0:
        delta = delta.mul_(weight)
    return delta.add_(previous).mul_(1.0 - alpha).add_(base * alpha)


def merge_chunk(
    method: MergeMethod,
    base: Tensor,
    previous: Tensor,
    finetuned: Sequence[Tensor],
    *,
    alpha: float,
    drop_rate: float,
    keep: Sequence[Tensor | None] | None = None,
    floors: Sequence[float | None] | None = None,
    weight: float = 1.0,
) -> Tensor:
    """One chunk of one tensor merged by ``method``; all tensors flat float32 of the same length.

    ``keep`` holds one DARE keep-mask per fine-tuned model (``dare`` methods); ``floors`` one TIES magnitude
    floor per model (``magnitude`` methods). ``drop_rate`` is 0 for tensors excluded from sparsification.
    """
    deltas = []
    for index, model in enumerate(finetuned):
        delta = model - previous
        if method.sparsify == "dare":
            delta = dare(delta, keep[index] if keep else None, drop_rate)
        elif method.sparsify == "magnitude":
            delta = magnitude_trim(delta, floors[index] if floors else None)
        deltas.append(delta)
    return interpolate(base, previous, method.combine(deltas), alpha, weight)


def magnitude_floor(chunks: Callable[[], Iterable[Tensor]], drop_rate: float, numel: int) -> float | None:
    """TIES: the magnitude at or above which entries survive a trim of ``round(p·n)`` entries, or None (no trim).

    Exact, yet streaming: the k-th largest |x| is found by two histogram passes over the float32 bit patterns of
    the chunks (non-negative floats order like their bit patterns), high 16 bits first, then the low 16 bits
    inside the one bucket that holds it. Entries equal to the floor are all kept.
    """
    keep_count = numel - round(drop_rate * numel)
    if keep_count >= numel:
        return None
    if keep_count <= 0:
        return math.inf
    high = np.zeros(1 << 15, dtype=np.int64)
    for chunk in chunks():
        high += np.bincount(_magnitude_bits(chunk) >> 16, minlength=1 << 15)
    bucket, rank = _select_from_top(high, keep_count)
    low = np.zeros(1 << 16, dtype=np.int64)
    for chunk in chunks():
        bits = _magnitude_bits(chunk)
        low += np.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    offset, _ = _select_from_top(low, rank)
    return float(np.array([(bucket << 16) | offset], dtype=np.uint32).view(np.float32)[0])


def _magnitude_bits(chunk: Tensor) -> np.ndarray:
    return chunk.abs().numpy().view(np.uint32)


def _select_from_top(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest value (1-based), and that value's rank inside the bin."""
    from_top = np.cumsum(histogram[::-1])
    position = int(np.searchsorted(from_top, rank))
    above = int(from_top[position - 1]) if position else 0
    return len(histogram) - 1 - position, rank - above


def read_layer_importance(path: Path) -> dict[int, float]:
    """IIMM's layer importance I_n from a CSV with columns ``layer`` (integer n) and ``importance``."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise MergeError(f"importance file {path}: {error.strerror}") from None
    if not rows or not {"layer", "importance"} <= set(rows[0]):
        raise MergeError(f"importance file {path}: needs the columns 'layer' and 'importance'")
    importance: dict[int, float] = {}
    for line, row in enumerate(rows, start=2):
        try:
            layer, value = int(row["layer"]), float(row["importance"])
        except (TypeError, ValueError):
            raise MergeError(f"importance file {path}, line {line}: not an integer layer and a number") from None
        if layer in importance or not math.isfinite(value) or value < 0:
            raise MergeError(f"importance file {path}, line {line}: duplicate layer or negative/non-finite value")
        importance[layer] = value
    if sum(importance.values()) <= 0:
        raise MergeError(f"importance file {path}: the importances sum to 0")
    return importance


def layer_scales(importance: Mapping[int, float]) -> dict[int, float]:
    """N·I_n/Σ_m I_m for each layer n: the scales average to 1, so the total delta keeps its size."""
    layers, denominator = len(importance), math.fsum(importance.values())
    return {layer: layers * value / denominator for layer, value in importance.items()}


def layer_of(name: str) -> int | None:
    """The layer index n of a ``model.layers.{n}.`` tensor, None for embeddings, final norm and lm_head."""
    match = LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None
