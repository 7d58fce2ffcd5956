"""Which examples each rank trains on at each optimizer step: the same steps whatever the number of workers.

An epoch's order is a permutation seeded by (seed, epoch). Optimizer step s of the epoch trains on the order's
positions [s·G, (s+1)·G), G the job's global batch (the epoch's last step may hold fewer), dealt round-robin to
the ranks; each rank cuts its share into micro-batches of the per-device size. Every rank runs the same number of
micro-batches in a step, because DeepSpeed reduces gradients collectively: a rank whose share is shorter runs
filler micro-batches that carry no weight. The worker weighs each micro-batch's summed token losses by the whole
step's response tokens (:func:`response_tokens`), so a step's gradient is the token mean over its G examples on 1
worker or 8, up to the order of float sums, and an elastic run that resumes on another world size goes on at the
next step with the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from imm_ray.tokens import IGNORE_INDEX

Example = tuple[list[int], list[int]]  # (input ids, labels with the prompt masked)


def steps_per_epoch(size: int, global_batch: int) -> int:
    return math.ceil(size / global_batch)


def total_optimizer_steps(size: int, global_batch: int, epochs: int) -> int:
    """The run's optimizer steps; the learning-rate schedule spans them whatever the world size."""
    return epochs * steps_per_epoch(size, global_batch)


def epoch_order(size: int, *, seed: int, epoch: int) -> list[int]:
    import torch

    return torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_members(order: Sequence[int], step: int, global_batch: int) -> list[int]:
    """The examples of optimizer step ``step`` of an epoch (all ranks together)."""
    return list(order[step * global_batch : (step + 1) * global_batch])


def micro_batches_per_step(members: int, world: int, batch_size: int) -> int:
    """Micro-batches every rank runs for a step of ``members`` examples: the longest share's count."""
    return max(1, math.ceil(math.ceil(members / world) / batch_size))


def rank_micro_batches(members: Sequence[int], *, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one step; an empty list is a filler micro-batch (no weight)."""
    share = list(members[rank::world])
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    return batches + [[]] * (micro_batches_per_step(len(members), world, batch_size) - len(batches))


def response_tokens(example: Example) -> int:
    """The tokens an example's loss is taken over: labels not masked, past the first position (a causal LM
    predicts position i + 1 from position i, so the first label is never a target)."""
    return sum(1 for label in example[1][1:] if label != IGNORE_INDEX)


def collate(batch: list[Example], pad_id: int):
    """Right-padded input ids, labels (padding masked) and attention mask of a micro-batch."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
