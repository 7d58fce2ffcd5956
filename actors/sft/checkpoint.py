"""The world-size-independent SFT checkpoint: safetensors files, never pickle, loadable at any data-parallel degree.

DeepSpeed's own ``save_checkpoint`` writes per-rank ZeRO partitions (pickled) that only load at the same
data-parallel degree. Instead every rank takes part in gathering each parameter's fp32 master weight and AdamW
moments (DeepSpeed's ``safe_get_full_*`` API, the same for ZeRO 1, 2 and 3), and rank ``i % world`` writes
parameter ``i`` to its own safetensors file; rank 0 adds ``progress.json`` (epoch, position in the epoch's sample
order, optimizer steps, losses, attempts). All ranks report the same checkpoint directory name, and Ray Train
merges the ranks' files into one checkpoint folder in its ``storage_path`` (local or ``s3://``).

On a restart ``ray.train.get_checkpoint()`` gives that folder; each rank loads the master weights into the model
before DeepSpeed partitions it, then sets its own slice of the fp32 master and moments, the AdamW step and the
learning-rate schedule (:func:`restore_optimizer`, :func:`restore_schedule`).
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

PROGRESS_FILE = "progress.json"
STATE_PREFIX = "state-rank"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides its step count
KEY_SEPARATOR = "::"  # "<parameter name>::exp_avg" in the checkpoint's safetensors files
STATE_FILE_BYTES = 2 << 30  # a rank starts a new state file past 2 GiB, bounding its memory while saving


class Progress(BaseModel):
    """Where a run stands; saved as ``progress.json`` in each checkpoint."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = 0  # the epoch in progress (0-based)
    consumed: int = 0  # positions of that epoch's sample order trained on: whole steps of the global batch
    optimizer_steps: int = 0
    adam_step: float = 0.0  # torch AdamW's own step count (DeepSpeed's set-up may add one)
    loss_sum: float = 0.0  # summed token losses of the epoch in progress, all ranks
    loss_count: int = 0  # the response tokens they were taken over
    history: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []


def _full_tensor(param, optimizer, key: str | None):
    """The whole fp32 master weight (``key`` None) or AdamW moment of ``param``, on every rank, on its device.

    A collective under ZeRO: every rank must ask for the same tensors in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO and no mixed precision: the torch optimizer works on the module's own tensors
        value = param.detach() if key is None else optimizer.state[param][key]
    return value


def write_state(module, optimizer, folder: Path, rank: int, world: int) -> None:
    """This rank's share of the checkpoint: parameters ``i % world == rank``, in files of at most ~2 GiB.

    Every rank gathers every tensor (the gather is collective); only the owner copies it to the CPU."""
    import torch
    from safetensors.torch import save_file

    shard: dict[str, Any] = {}
    size, part = 0, 0
    for index, (name, param) in enumerate(module.named_parameters()):
        for key in (None, *MOMENTS):
            value = _full_tensor(param, optimizer, key)
            if index % world == rank:
                shard[name if key is None else f"{name}{KEY_SEPARATOR}{key}"] = value.detach().to(
                    "cpu", torch.float32, copy=True).contiguous()
                size += value.numel() * 4
        if size >= STATE_FILE_BYTES:
            save_file(shard, folder / f"{STATE_PREFIX}{rank:05d}-{part:03d}.safetensors")
            shard, size, part = {}, 0, part + 1
    if shard:
        save_file(shard, folder / f"{STATE_PREFIX}{rank:05d}-{part:03d}.safetensors")


class StateReader:
    """Reads tensors by name from a checkpoint's state files (safetensors, opened lazily, never unpickled)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for path in sorted(folder.glob(f"{STATE_PREFIX}*.safetensors")):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            self._where |= {key: handle for key in handle.keys()}

    def get(self, key: str):
        if key not in self._where:
            raise RuntimeError(f"checkpoint has no tensor {key!r}; it was written for another model")
        return self._where[key].get_tensor(key)


def load_master_weights(model, folder: Path) -> None:
    """Put the checkpoint's fp32 master weights into the (not yet partitioned) model, cast to its dtype, so the
    low-precision copy DeepSpeed trains is exactly what it was when the checkpoint was taken."""
    import torch

    with ExitStack() as stack, torch.no_grad():
        reader = StateReader(folder, stack)
        for name, param in model.named_parameters():
            param.copy_(reader.get(name).to(param.dtype))


def _local_slice(param, value):
    """This rank's ZeRO-3 partition of ``value`` (padded with zeros past the end, as ZeRO-3 pads)."""
    import torch
    import torch.distributed as dist

    part = param.ds_tensor.numel()
    start = dist.get_rank(group=param.ds_process_group) * part
    flat = value.flatten()
    local = torch.zeros(part, dtype=torch.float32)
    count = max(0, min(part, flat.numel() - start))
    local[:count] = flat[start : start + count]
    return local


def _set_tensor(param, optimizer, value, key: str | None) -> None:
    """Set this rank's part of ``param``'s fp32 master weight (``key`` None) or AdamW moment."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if hasattr(param, "ds_id"):  # ZeRO-3; DeepSpeed's full setter cannot fill a padded last partition
        local = _local_slice(param, value)
        safe_set_local_fp32_param(param, local) if key is None else safe_set_local_optimizer_state(param, local, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2
        safe_set_full_fp32_param(param, value) if key is None else safe_set_full_optimizer_state(param, value, key)
    elif key is None:
        param.data.copy_(value)
    else:
        optimizer.state[param][key] = value.to(param.device)


def adam_step(optimizer) -> float:
    steps = {float(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW step counts differ between parameter groups: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _init_adam_state(engine, optimizer) -> None:
    """Create AdamW's state before any step, so that a restore can set it.

    Torch creates it lazily at the first step, and so does DeepSpeed; this mirrors DeepSpeed's own
    universal-checkpoint loader: zero moments for each flat fp32 partition the torch optimizer steps (ZeRO-3 keeps
    them in ``fp32_partitioned_groups_flat`` and hands them to the optimizer only while stepping; ZeRO-1/2 leaves
    them in its param groups, and without ZeRO they are the module's own fp32 parameters), then each parameter's
    fragment view of them is linked (ZeRO-1/2)."""
    import torch

    wrapper = engine.optimizer
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = [param for group in optimizer.param_groups for param in group["params"]]
    for flat in flats:
        state = optimizer.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state |= {key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in MOMENTS}
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def restore_optimizer(engine, optimizer, folder: Path, adam_step: float) -> None:
    """Set the fp32 master weights, the AdamW moments and step count from a checkpoint, on this rank."""
    import torch

    _init_adam_state(engine, optimizer)
    with ExitStack() as stack:
        reader = StateReader(folder, stack)
        for name, param in engine.module.named_parameters():
            _set_tensor(param, optimizer, reader.get(name), None)
            for key in MOMENTS:
                _set_tensor(param, optimizer, reader.get(f"{name}{KEY_SEPARATOR}{key}"), key)
    for state in optimizer.state.values():
        old = state.get("step")
        like = old if isinstance(old, torch.Tensor) else torch.tensor(0.0)
        state["step"] = torch.tensor(adam_step, dtype=like.dtype, device=like.device)


def restore_schedule(scheduler, steps: int) -> None:
    """Move a freshly built learning-rate schedule to ``steps`` optimizer steps, and the optimizer's rates too."""
    rates = [base * factor(steps) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": steps, "_step_count": steps + 1,
                               "_last_lr": rates})
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate


def save_checkpoint(engine, optimizer, progress: Progress, metrics: dict[str, Any], rank: int, world: int) -> None:
    """Write this rank's share into a temporary folder and report it; Ray Train merges the ranks' folders."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="imm-sft-checkpoint-") as tmp:
        write_state(engine.module, optimizer, Path(tmp), rank, world)
        if rank == 0:
            Path(tmp, PROGRESS_FILE).write_text(progress.model_dump_json(indent=2))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:03d}_step{progress.optimizer_steps:07d}",
            delete_local_checkpoint_after_upload=False,
        )
