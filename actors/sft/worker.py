"""The training loop each Ray Train worker runs: DeepSpeed over a torch AdamW, the loss on response tokens only.

Each worker reads the kept (prompt, response) pairs from parquet, tokenises them with the one tokenising helper
(``imm_ray.tokens.encode_pair``), and trains under a DeepSpeed engine (ZeRO stage from the job; gloo on CPU, NCCL
on GPUs). The optimizer is a torch AdamW passed from code, so DeepSpeed never compiles its fused Adam op. The
steps follow ``actors.sft.batches``: each optimizer step is the job's global batch whatever the world size, and a
micro-batch's loss is its summed token losses over the step's response tokens (``num_items_in_batch``, the
model's own loss function), times the world size with DeepSpeed's division by the accumulation turned off,
because DeepSpeed averages gradients over the ranks. At the end rank 0 writes a consolidated Hugging Face folder
(safetensors) in the base model's dtype.

The training log has a ``timeline`` (seconds from the ``run_sft`` call, rank 0's view): worker start, imports
done, process group up, data and model ready, DeepSpeed initialised, training done, model saved; plus
``train_seconds`` (the step loop alone, checkpoints excluded), ``checkpoint_seconds`` and ``tokens``
(non-padding tokens trained on, all ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from actors.sft.batches import (
    collate, epoch_order, micro_batches_per_step, rank_micro_batches, response_tokens, step_members, steps_per_epoch,
    total_optimizer_steps,
)
from actors.sft.checkpoint import (
    PROGRESS_FILE, Progress, adam_step, load_master_weights, restore_optimizer, restore_schedule, save_checkpoint,
)
from actors.sft.job import PRECISION_DTYPES, TRAINING_LOG, SFTJob, decide_checkpoints, deepspeed_config, step_file
from actors.sft.shm_op import load_shm_op
from imm_ray.progress import append_step


def load_examples(job: SFTJob, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The pairs as ids and labels, tokenised as generation and layer importance tokenise them (imm_ray.tokens)."""
    import pandas as pd

    from imm_ray.tokens import encode_pair

    frame = pd.read_parquet(job.data_path, columns=["prompt", "response"])
    return [encode_pair(tokenizer, p, r, job.max_length) for p, r in zip(frame["prompt"], frame["response"])]


def load_model(job: SFTJob, resume_dir: Path | None):
    """The model in the training dtype (half the memory of fp32 for bf16: DeepSpeed would cast to it anyway),
    with the checkpoint's weights when resuming."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        job.model_path, trust_remote_code=job.trust_remote_code, use_safetensors=True,
        dtype=getattr(torch, PRECISION_DTYPES[job.precision]),
    )
    if resume_dir is not None:
        load_master_weights(model, resume_dir)
    return model


def base_dtype(job: SFTJob):
    """The dtype the consolidated model is written in: the base model's own (float32 when it names none)."""
    import torch
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# torch.compile (torch._dynamo.optimize) reads this variable at every call and returns a no-op decorator when it is
# "1"; it is torch's switch for turning TorchDynamo off.
DYNAMO_DISABLE_ENV = "TORCHDYNAMO_DISABLE"


@contextlib.contextmanager
def compile_decorators_off() -> Iterator[None]:
    """While DeepSpeed initialises, ``torch.compile`` decorators are no-ops.

    Under ZeRO, ``deepspeed.initialize`` checks the optimizer against its supported list and, to complete the list,
    imports its Muon optimizer module, whose ``@torch.compile`` decorators import TorchInductor: 0.73-0.77 s of CPU
    in every worker of every SFT stage (DeepSpeed 0.19's ``runtime.zero.utils.is_zero_supported_optimizer``;
    docs/benchmarks.md) for an optimizer the job never uses (it trains with torch's AdamW). The worker compiles
    nothing itself; the variable is restored afterwards."""
    before = os.environ.get(DYNAMO_DISABLE_ENV)
    os.environ[DYNAMO_DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DYNAMO_DISABLE_ENV, None)
        else:
            os.environ[DYNAMO_DISABLE_ENV] = before


def train_worker(config: dict[str, Any]) -> None:
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
    load_shm_op()  # first, under a lock that dies with its holder: a killed worker's leftover cannot hang this one
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
        examples = load_examples(job, tokenizer)
        model = load_model(job, resume_dir)
        timeline["model_ready"] = time.time()
        total = total_optimizer_steps(len(examples), job.global_batch, job.epochs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay)
        scheduler = get_scheduler(job.lr_scheduler, optimizer, num_warmup_steps=int(job.warmup_ratio * total),
                                  num_training_steps=total)
        accumulation = micro_batches_per_step(job.global_batch, world, job.per_device_batch_size)
        with compile_decorators_off():
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(job, accumulation))
        if resume_dir is not None:
            restore_optimizer(engine, optimizer, resume_dir, progress.adam_step)
            restore_schedule(scheduler, progress.optimizer_steps)
    timeline["deepspeed_ready"] = time.time()

    started = time.perf_counter()
    stats = train_epochs(job, engine, optimizer, examples, tokenizer.pad_token_id, progress, rank, world, total)
    timeline["trained"] = time.time()
    save_consolidated(engine, job, tokenizer, base_dtype(job), rank)
    timeline["saved"] = time.time()
    if rank == 0:
        log = {"epochs": progress.history, "world_size": world, "global_batch": job.global_batch,
               "micro_batches_per_step": accumulation, "optimizer_steps": progress.optimizer_steps,
               "step_losses": stats.pop("step_losses"), "attempts": progress.attempts,
               "last_attempt_seconds": round(time.perf_counter() - started, 2),
               "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(engine.device) if job.use_gpu else None,
               **stats, "worker_timeline": timeline}
        Path(job.output_dir, TRAINING_LOG).write_text(json.dumps(log, indent=2))


def train_step(engine, examples, members: list[int], pad_id: int, rank: int, world: int,
               batch_size: int) -> tuple[float, int, int]:
    """One optimizer step over ``members`` (all ranks' examples of the step); returns this rank's summed token
    losses, the step's response tokens (all ranks) and this rank's non-padding tokens."""
    step_tokens = sum(response_tokens(examples[i]) for i in members)
    batches = rank_micro_batches(members, rank=rank, world=world, batch_size=batch_size)
    loss_sum, tokens = 0.0, 0
    for index, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(index + 1 == len(batches))
        weight = 1.0 if batch else 0.0  # a filler micro-batch keeps the collectives in step and adds nothing
        tensors = {k: v.to(engine.device) for k, v in collate([examples[i] for i in batch or members[:1]],
                                                               pad_id).items()}
        loss = engine(**tensors, num_items_in_batch=max(step_tokens, 1)).loss * weight
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()
        if batch:
            loss_sum += float(loss) * step_tokens
            tokens += int(tensors["attention_mask"].sum())
    return loss_sum, step_tokens, tokens


def train_epochs(job: SFTJob, engine, optimizer, examples, pad_id: int, progress: Progress, rank: int,
                 world: int, total_steps: int) -> dict[str, Any]:
    """Train from ``progress`` to the last epoch, checkpointing as the job says; updates ``progress``.

    Returns the time in the step loop (``train_seconds``), in checkpoints, the tokens trained on (all ranks),
    whether checkpoints were written, and every step's loss (the token mean over the whole global batch)."""
    import ray.train
    import torch
    import torch.distributed as dist

    checkpoints = job.checkpoints is True  # "auto" decides after the first optimizer step
    decided = job.checkpoints != "auto"
    loop_started = time.perf_counter()
    checkpoint_seconds, tokens, step_losses = 0.0, 0, []

    def save(metrics: dict[str, Any]) -> None:
        nonlocal checkpoint_seconds
        began = time.perf_counter()
        progress.adam_step = adam_step(optimizer)
        save_checkpoint(engine, optimizer, progress, metrics, rank, world)
        checkpoint_seconds += time.perf_counter() - began

    steps = steps_per_epoch(len(examples), job.global_batch)
    while progress.epoch < job.epochs:
        order = epoch_order(len(examples), seed=job.seed, epoch=progress.epoch)
        for step in range(progress.consumed // job.global_batch, steps):
            members = step_members(order, step, job.global_batch)
            mine, step_tokens, trained = train_step(engine, examples, members, pad_id, rank, world,
                                                    job.per_device_batch_size)
            summed = torch.tensor([mine], dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(summed)
            tokens += trained
            progress.loss_sum, progress.loss_count = progress.loss_sum + float(summed), progress.loss_count + step_tokens
            progress.consumed = min(len(examples), (step + 1) * job.global_batch)
            progress.optimizer_steps += 1
            step_losses.append(round(float(summed) / max(step_tokens, 1), 6))
            if rank == 0 and (steps_file := step_file(job)) is not None:
                append_step(steps_file, progress.optimizer_steps, total_steps, step_losses[-1])
            if not decided:
                first = torch.tensor([time.perf_counter() - loop_started], dtype=torch.float64)
                if dist.is_initialized():
                    dist.all_reduce(first, op=dist.ReduceOp.MAX)
                checkpoints, decided = decide_checkpoints(job, float(first), total_steps), True
            every = job.checkpoint_every_steps
            if checkpoints and every and progress.optimizer_steps % every == 0 and step + 1 < steps:
                save({"epoch": progress.epoch, "optimizer_steps": progress.optimizer_steps})
        done = {"epoch": progress.epoch + 1, "loss": progress.loss_sum / max(progress.loss_count, 1),
                "examples": len(examples), "optimizer_steps": progress.optimizer_steps}
        progress.history.append(done)
        progress.epoch, progress.consumed, progress.loss_sum, progress.loss_count = progress.epoch + 1, 0, 0.0, 0
        if checkpoints:
            save(done)
        else:
            ray.train.report(done)
    counted = torch.tensor([tokens], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(counted)
    return {"train_seconds": round(time.perf_counter() - loop_started - checkpoint_seconds, 3),
            "checkpoint_seconds": round(checkpoint_seconds, 3), "tokens": int(counted), "checkpointed": checkpoints,
            "step_losses": step_losses}


def save_consolidated(engine, job: SFTJob, tokenizer, save_dtype, rank: int) -> None:
    """Rank 0 writes the whole model as an HF folder; under ZeRO-3 the shards are gathered first."""
    import deepspeed
    import torch

    module = engine.module
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if job.zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            state = unique_tensors(module.state_dict(), save_dtype)
            module.config.dtype = save_dtype  # the model was loaded in the training dtype
            module.save_pretrained(job.output_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(job.output_dir)
    torch.distributed.barrier()


def unique_tensors(state: dict[str, Any], dtype) -> dict[str, Any]:
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
