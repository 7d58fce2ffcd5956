"""Supervised fine-tuning with Ray Train's TorchTrainer and DeepSpeed, resumable and elastic.

Each Ray Train worker reads the kept (prompt, response) pairs from parquet, tokenises them with the loss on the
response tokens only, and trains under a DeepSpeed engine (ZeRO stage from the job; gloo on CPU, NCCL on GPUs).
The optimizer is a torch AdamW passed from code, so DeepSpeed never compiles its fused Adam op. At the end rank 0
writes a consolidated Hugging Face folder (safetensors) in the base model's dtype (16-bit for the paper's models).

Checkpoints (at each epoch end, and every ``checkpoint_every_steps`` optimizer steps if set) are world-size
independent, so a run can resume on a different number of workers, which Ray Train v2's elastic scaling does
when nodes join or leave: DeepSpeed's own ``save_checkpoint`` writes per-rank ZeRO partitions (pickled) that only
load at the same data-parallel degree. Instead every rank takes part in gathering each parameter's fp32 master
weight and AdamW moments (DeepSpeed's ``safe_get_full_*`` API, the same for ZeRO 1, 2 and 3), and rank
``i % world`` writes parameter ``i`` to its own safetensors file; rank 0 adds ``progress.json`` (epoch, position
in the epoch's sample order, optimizer steps, losses, attempts). All ranks report the same checkpoint directory
name, and Ray Train merges the ranks' files into one checkpoint folder in ``storage_path`` (local or ``s3://``).
On a restart, ``ray.train.get_checkpoint()`` gives that folder; each rank loads the master weights into the
model before DeepSpeed partitions it, then sets its own slice of the fp32 master and moments, the AdamW step and
the learning-rate schedule, and skips the samples already trained on. Nothing is unpickled.

When to checkpoint (``checkpoints``): True always, False never, "auto" (the default) only where a checkpoint pays
for itself: training is estimated, after the first optimizer step (the slowest rank's time × the run's optimizer
steps), to take longer than ``checkpoint_min_seconds`` (60 s). A checkpoint is read by a restarted worker group
(``max_failures`` != 0, or an elastic resize) and by a rerun of the loop after the driver died (the loop names the
Ray Train run by the stage's fingerprint, so the same run is found again); for a stage that trains in seconds,
redoing it costs less than checkpointing it: each checkpoint is a gather of the fp32 master weights and both AdamW
moments, a safetensors write per rank and Ray Train's merge of the ranks' folders. The decision is the same on
every rank (the first step's time is all-reduced), as the save is collective.

The training log has a ``timeline`` (seconds from the ``run_sft`` call, rank 0's view): worker start, imports
done, process group up, data and model ready, DeepSpeed initialised, training done, model saved, and the driver's
fit end and clean-up; plus ``train_seconds`` (the step loop alone, checkpoints excluded), ``checkpoint_seconds``
and ``tokens`` (non-padding tokens trained on, all ranks).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imm_ray.tokens import IGNORE_INDEX

TRAINING_LOG = "training_log.json"
PROGRESS_FILE = "progress.json"
STATE_PREFIX = "state-rank"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides its step count
KEY_SEPARATOR = "::"  # "<parameter name>::exp_avg" in the checkpoint's safetensors files
STATE_FILE_BYTES = 2 << 30  # a rank starts a new state file past 2 GiB, bounding its memory while saving
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class SFTJob(BaseModel):
    """Everything one SFT run needs; plain data so it travels to the Ray Train workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str
    data_path: str  # parquet with columns prompt, response
    output_dir: str  # must not exist yet; rank 0 creates it
    storage_path: str  # Ray Train's run storage (checkpoints, results): a local folder or an s3:// URI
    name: str = "sft"
    seed: int = 0
    epochs: int = Field(1, ge=1)
    learning_rate: float = 1e-4
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    trust_remote_code: bool = False
    num_workers: int = Field(2, ge=1)  # the most workers; with min_workers, Ray Train v2's elastic range
    min_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float = 1
    use_gpu: bool = False
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1: no limit
    checkpoints: bool | Literal["auto"] = "auto"  # False: a restart begins again from the base model; auto: see above
    checkpoint_min_seconds: float = Field(60.0, ge=0)  # auto: checkpoint only runs estimated to train longer
    checkpoint_every_steps: int | None = Field(None, ge=1)  # besides each epoch end; None: epoch ends only
    keep_checkpoints: bool = False  # False: the run's Ray Train folder is deleted once the model is written
    resize_check_interval_s: float = Field(60.0, gt=0)  # elastic: how often Ray Train looks for more workers
    # Testing only: the last rank exits once (a marker file next to output_dir) right after this epoch's report.
    fail_once_after_epoch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SFTJob:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers ({self.num_workers})")
        if self.checkpoints is True and self.zero_stage == 0 and self.precision != "fp32":
            raise ValueError(f"checkpoints with {self.precision} need zero_stage >= 1: without ZeRO, DeepSpeed's "
                             "mixed-precision optimizer keeps the fp32 master weights out of reach")
        if self.fail_once_after_epoch is not None and self.fail_once_after_epoch > self.epochs:
            raise ValueError(f"fail_once_after_epoch ({self.fail_once_after_epoch}) is past the last epoch "
                             f"({self.epochs})")
        return self

    def may_checkpoint(self) -> bool:
        """False where no checkpoint will be written (so none is read either)."""
        if self.checkpoints == "auto":
            return not (self.zero_stage == 0 and self.precision != "fp32")
        return bool(self.checkpoints)


def decide_checkpoints(job: SFTJob, first_step_seconds: float, total_steps: int) -> bool:
    """The "auto" rule (module docstring): estimated training time > ``checkpoint_min_seconds``."""
    if job.checkpoints != "auto":
        return bool(job.checkpoints)
    return job.may_checkpoint() and first_step_seconds * total_steps > job.checkpoint_min_seconds


class Progress(BaseModel):
    """Where a run stands; saved as ``progress.json`` in each checkpoint."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = 0  # the epoch in progress (0-based)
    consumed: int = 0  # positions of that epoch's sample order already trained on, all ranks together
    optimizer_steps: int = 0
    adam_step: float = 0.0  # torch AdamW's own step count (DeepSpeed's set-up may add one)
    loss_sum: float = 0.0  # rank 0's micro-batch losses in the epoch in progress
    loss_count: int = 0
    history: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []


def deepspeed_config(job: SFTJob) -> dict[str, Any]:
    """The DeepSpeed JSON for a job (no optimizer section: the torch optimizer comes from code).

    ``configs/deepspeed/zero3.json`` is this dict for the paper's settings, written out for reading."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.per_device_batch_size,
        "gradient_accumulation_steps": job.gradient_accumulation_steps,
        "gradient_clipping": job.max_grad_norm,
        "zero_optimization": {"stage": job.zero_stage},
        "bf16": {"enabled": job.precision == "bf16"},
        "fp16": {"enabled": job.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if job.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def epoch_batches(
    size: int, *, seed: int, epoch: int, start: int, rank: int, world: int, batch_size: int
) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch, from position ``start`` of its order on.

    The order is a permutation seeded by (seed, epoch) and does not depend on the number of workers, so a run
    that resumes on another world size goes on where it stopped. What is left is padded to a multiple of
    ``world`` with the order's first entries and dealt round-robin, as torch's ``DistributedSampler`` does
    (with ``start`` 0 the result is the same), so every rank takes the same number of steps.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    rest = order[start:]
    padding = -len(rest) % world
    rest += (order * math.ceil(padding / max(size, 1)))[:padding]
    mine = rest[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def optimizer_steps(job: SFTJob, size: int, world: int, progress: Progress) -> int:
    """Optimizer steps of the whole run as seen from ``progress``: those taken plus those left on ``world``
    workers (an epoch's last step may accumulate fewer micro-batches)."""

    def steps(start: int) -> int:
        batches = math.ceil(math.ceil((size - start) / world) / job.per_device_batch_size)
        return math.ceil(batches / job.gradient_accumulation_steps)

    left = job.epochs - progress.epoch - 1
    return progress.optimizer_steps + steps(progress.consumed) + left * steps(0)


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
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


def _load_examples(job: SFTJob, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The pairs as ids and labels, tokenised as generation and layer importance tokenise them (imm_ray.tokens)."""
    import pandas as pd

    from imm_ray.tokens import encode_pair

    frame = pd.read_parquet(job.data_path, columns=["prompt", "response"])
    return [encode_pair(tokenizer, p, r, job.max_length) for p, r in zip(frame["prompt"], frame["response"])]


# ---------------------------------------------------------------------------------------------- checkpoints


def _full_tensor(param, optimizer, key: str | None):
    """The whole fp32 master weight (``key`` None) or AdamW moment of ``param``, on every rank, on its device.

    A collective under ZeRO: every rank must ask for the same tensors in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO and no mixed precision: the torch optimizer works on the module's own tensors
        value = param.detach() if key is None else optimizer.state[param][key]
    return value


def _write_state(module, optimizer, folder: Path, rank: int, world: int) -> None:
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


class _StateReader:
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


def _load_master_weights(model, folder: Path) -> None:
    """Put the checkpoint's fp32 master weights into the (not yet partitioned) model, cast to its dtype, so the
    low-precision copy DeepSpeed trains is exactly what it was when the checkpoint was taken."""
    import torch

    with ExitStack() as stack, torch.no_grad():
        reader = _StateReader(folder, stack)
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


def _adam_step(optimizer) -> float:
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


def _restore_optimizer(engine, optimizer, folder: Path, adam_step: float) -> None:
    """Set the fp32 master weights, the AdamW moments and step count from a checkpoint, on this rank."""
    import torch

    _init_adam_state(engine, optimizer)
    with ExitStack() as stack:
        reader = _StateReader(folder, stack)
        for name, param in engine.module.named_parameters():
            _set_tensor(param, optimizer, reader.get(name), None)
            for key in MOMENTS:
                _set_tensor(param, optimizer, reader.get(f"{name}{KEY_SEPARATOR}{key}"), key)
    for state in optimizer.state.values():
        old = state.get("step")
        like = old if isinstance(old, torch.Tensor) else torch.tensor(0.0)
        state["step"] = torch.tensor(adam_step, dtype=like.dtype, device=like.device)


def _restore_schedule(scheduler, steps: int) -> None:
    """Move a freshly built learning-rate schedule to ``steps`` optimizer steps, and the optimizer's rates too."""
    rates = [base * factor(steps) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": steps, "_step_count": steps + 1,
                               "_last_lr": rates})
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate


def _save_checkpoint(engine, optimizer, progress: Progress, metrics: dict[str, Any], rank: int, world: int) -> None:
    """Write this rank's share into a temporary folder and report it; Ray Train merges the ranks' folders."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="imm-sft-checkpoint-") as tmp:
        _write_state(engine.module, optimizer, Path(tmp), rank, world)
        if rank == 0:
            Path(tmp, PROGRESS_FILE).write_text(progress.model_dump_json(indent=2))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:03d}_step{progress.optimizer_steps:07d}",
            delete_local_checkpoint_after_upload=False,
        )


# -------------------------------------------------------------------------------------------- the worker


def _load_model(job: SFTJob, resume_dir: Path | None):
    """The model in the training dtype (half the memory of fp32 for bf16: DeepSpeed would cast to it anyway),
    with the checkpoint's weights when resuming."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        job.model_path, trust_remote_code=job.trust_remote_code, use_safetensors=True,
        dtype=getattr(torch, PRECISION_DTYPES[job.precision]),
    )
    if resume_dir is not None:
        _load_master_weights(model, resume_dir)
    return model


def _base_dtype(job: SFTJob):
    """The dtype the consolidated model is written in: the base model's own (float32 when it names none)."""
    import torch
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _maybe_fail(job: SFTJob, epoch: int, rank: int, world: int) -> None:
    """The testing hook ``fail_once_after_epoch``: the last rank exits without cleaning up, as a crashed worker
    would, once the checkpoint of ``epoch`` is surely registered. A report returns before the controller has
    taken it, but the next report waits until it has; so every rank reports once more (metrics only) and meets
    at a barrier before the exit. A marker file in the run's (local) storage folder makes it happen once."""
    import ray.train
    import torch.distributed as dist

    marker = Path(storage_uri(job.storage_path)) / job.name / "failed-once"
    if job.fail_once_after_epoch != epoch or marker.exists():
        return
    ray.train.report({"epoch": epoch, "injected_failure": True})
    dist.barrier()
    if rank == world - 1:
        marker.touch()
        os._exit(1)


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker training loop (runs inside a Ray Train worker process)."""
    timeline = {"worker_start": time.time()}
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoTokenizer, get_scheduler

    timeline["imported"] = time.time()
    job = SFTJob.model_validate(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    torch.manual_seed(job.seed)
    deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")
    timeline["process_group"] = time.time()

    checkpoint = ray.train.get_checkpoint() if job.may_checkpoint() else None
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume:
        resume_dir = Path(resume) if resume else None
        progress = Progress.model_validate_json((resume_dir / PROGRESS_FILE).read_text()) if resume_dir else Progress()
        progress.attempts.append({"world_size": world, "start_epoch": progress.epoch, "start_position":
                                  progress.consumed, "start_step": progress.optimizer_steps,
                                  "resumed_from": Path(checkpoint.path).name if checkpoint else None})

        tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = _load_examples(job, tokenizer)
        model = _load_model(job, resume_dir)
        timeline["model_ready"] = time.time()
        total = optimizer_steps(job, len(examples), world, progress)
        optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay)
        scheduler = get_scheduler(job.lr_scheduler, optimizer, num_warmup_steps=int(job.warmup_ratio * total),
                                  num_training_steps=total)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(job))
        if resume_dir is not None:
            _restore_optimizer(engine, optimizer, resume_dir, progress.adam_step)
            _restore_schedule(scheduler, progress.optimizer_steps)
    timeline["deepspeed_ready"] = time.time()

    started = time.perf_counter()
    stats = _train_epochs(job, engine, optimizer, examples, tokenizer.pad_token_id, progress, rank, world, total)
    timeline["trained"] = time.time()
    _save_consolidated(engine, job, tokenizer, _base_dtype(job), rank)
    timeline["saved"] = time.time()
    if rank == 0:
        log = {"epochs": progress.history, "world_size": world, "optimizer_steps": progress.optimizer_steps,
               "attempts": progress.attempts, "last_attempt_seconds": round(time.perf_counter() - started, 2),
               "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(engine.device) if job.use_gpu else None,
               **stats, "worker_timeline": timeline}
        Path(job.output_dir, TRAINING_LOG).write_text(json.dumps(log, indent=2))


def _train_epochs(job: SFTJob, engine, optimizer, examples, pad_id: int, progress: Progress, rank: int,
                  world: int, total_steps: int) -> dict[str, Any]:
    """Train from ``progress`` to the last epoch, checkpointing as the job says; updates ``progress``.

    Returns the time in the step loop (``train_seconds``), in checkpoints, the tokens trained on (all ranks) and
    whether checkpoints were written."""
    import ray.train
    import torch
    import torch.distributed as dist

    accumulate = job.gradient_accumulation_steps
    checkpoints = job.checkpoints is True  # "auto" decides after the first optimizer step
    decided = job.checkpoints != "auto"
    loop_started = time.perf_counter()
    checkpoint_seconds, tokens = 0.0, 0

    def save(metrics: dict[str, Any]) -> None:
        nonlocal checkpoint_seconds
        began = time.perf_counter()
        progress.adam_step = _adam_step(optimizer)
        _save_checkpoint(engine, optimizer, progress, metrics, rank, world)
        checkpoint_seconds += time.perf_counter() - began

    while progress.epoch < job.epochs:
        batches = epoch_batches(len(examples), seed=job.seed, epoch=progress.epoch, start=progress.consumed,
                                rank=rank, world=world, batch_size=job.per_device_batch_size)
        for index, batch in enumerate(batches):
            boundary = (index + 1) % accumulate == 0 or index + 1 == len(batches)
            engine.set_gradient_accumulation_boundary(boundary)  # an epoch's last micro-batch always steps
            tensors = {k: v.to(engine.device) for k, v in _collate([examples[i] for i in batch], pad_id).items()}
            tokens += int(tensors["attention_mask"].sum())
            loss = engine(**tensors).loss
            engine.backward(loss)
            engine.step()
            progress.loss_sum, progress.loss_count = progress.loss_sum + loss.item(), progress.loss_count + 1
            progress.consumed += len(batch) * world
            if not boundary:
                continue
            progress.optimizer_steps += 1
            if not decided:
                first = torch.tensor([time.perf_counter() - loop_started], dtype=torch.float64)
                if dist.is_initialized():
                    dist.all_reduce(first, op=dist.ReduceOp.MAX)
                checkpoints, decided = decide_checkpoints(job, float(first), total_steps), True
            every = job.checkpoint_every_steps
            if checkpoints and every and progress.optimizer_steps % every == 0 and index + 1 < len(batches):
                save({"epoch": progress.epoch, "optimizer_steps": progress.optimizer_steps})
        done = {"epoch": progress.epoch + 1, "loss": progress.loss_sum / max(progress.loss_count, 1),
                "examples": len(examples), "optimizer_steps": progress.optimizer_steps}
        progress.history.append(done)
        progress.epoch, progress.consumed, progress.loss_sum, progress.loss_count = progress.epoch + 1, 0, 0.0, 0
        if checkpoints:
            save(done)
        else:
            ray.train.report(done)
        _maybe_fail(job, progress.epoch, rank, world)
    counted = torch.tensor([tokens], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(counted)
    return {"train_seconds": round(time.perf_counter() - loop_started - checkpoint_seconds, 3),
            "checkpoint_seconds": round(checkpoint_seconds, 3), "tokens": int(counted), "checkpointed": checkpoints}


def _save_consolidated(engine, job: SFTJob, tokenizer, save_dtype, rank: int) -> None:
    """Rank 0 writes the whole model as an HF folder; under ZeRO-3 the shards are gathered first."""
    import deepspeed
    import torch

    module = engine.module
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if job.zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            state = _unique_tensors(module.state_dict(), save_dtype)
            module.config.dtype = save_dtype  # the model was loaded in the training dtype
            module.save_pretrained(job.output_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(job.output_dir)
    torch.distributed.barrier()


def _unique_tensors(state: dict[str, Any], dtype) -> dict[str, Any]:
    """The state dict on CPU in ``dtype``, with each tied tensor (e.g. lm_head = embeddings) kept once, under
    its first name, as transformers' own save would do."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor.detach().to("cpu", dtype=dtype).clone()
    return unique


# -------------------------------------------------------------------------------------------- the driver


def storage_uri(path: str) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://bucket/prefix``) as given, a local path made absolute."""
    return path if "://" in path else os.path.abspath(path)


def run_sft(job: SFTJob) -> dict[str, Any]:
    """Fine-tune with Ray Train on the running Ray cluster; return the training log: per-epoch loss, world size,
    optimizer steps, one entry per attempt that got as far as a checkpoint or the end, the last attempt's training
    time (from the model being ready to the consolidated save) and rank 0's peak GPU memory."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    called = time.time()
    if Path(job.output_dir).exists():
        raise FileExistsError(f"SFT output folder already exists: {job.output_dir}")
    workers = (job.min_workers, job.num_workers) if job.min_workers else job.num_workers
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": job.cpus_per_worker},
            elastic_resize_monitor_interval_s=job.resize_check_interval_s,
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_uri(job.storage_path),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # registered only once every rank has uploaded
        ),
    )
    result = trainer.fit()
    log = Path(job.output_dir) / TRAINING_LOG
    if not (Path(job.output_dir) / "config.json").is_file() or not log.is_file():
        raise RuntimeError(f"SFT finished but wrote no model to {job.output_dir}")
    fitted = time.time()
    if not job.keep_checkpoints:
        result.filesystem.delete_dir(result.path)  # pyarrow's filesystem: a local folder or an S3 prefix
    data = json.loads(log.read_text())
    worker = data.pop("worker_timeline", {})
    data["timeline"] = {name: round(at - called, 3) for name, at in
                        {**worker, "fit_returned": fitted, "cleaned_up": time.time()}.items()}
    log.write_text(json.dumps(data, indent=2))
    return data
