"""Supervised fine-tuning with Ray Train's TorchTrainer and DeepSpeed.

Each Ray Train worker reads the kept (prompt, response) pairs from parquet, tokenises them with the loss on the
response tokens only, and trains under a DeepSpeed engine (ZeRO stage from the config; gloo on CPU, NCCL on GPUs).
The optimizer is a torch AdamW passed from code, so DeepSpeed never compiles its fused Adam op. At the end rank 0
writes a consolidated Hugging Face folder (safetensors) in the base model's dtype.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IGNORE_INDEX = -100
TRAINING_LOG = "training_log.json"


class SFTJob(BaseModel):
    """Everything one SFT run needs; plain data so it travels to the Ray Train workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str
    data_path: str  # parquet with columns prompt, response
    output_dir: str  # must not exist yet; rank 0 creates it
    storage_path: str  # Ray Train's run storage (checkpoints, results)
    name: str = "sft"
    seed: int = 0
    epochs: int = 1
    learning_rate: float = 1e-4
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    trust_remote_code: bool = False
    num_workers: int = Field(2, ge=1)
    min_workers: int | None = None
    cpus_per_worker: float = 1
    use_gpu: bool = False
    max_failures: int = 0


def deepspeed_config(job: SFTJob) -> dict[str, Any]:
    """The DeepSpeed JSON for a job (no optimizer section: the torch optimizer comes from code)."""
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


def tokenize_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked out; prompt and response are tokenised apart so the boundary
    is exact, and the response ends with the end-of-sequence token so the model learns to stop."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return input_ids, labels


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
    import pandas as pd

    frame = pd.read_parquet(job.data_path, columns=["prompt", "response"])
    return [tokenize_pair(tokenizer, p, r, job.max_length) for p, r in zip(frame["prompt"], frame["response"])]


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker training loop (runs inside a Ray Train worker process)."""
    import deepspeed
    import ray.train
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    job = SFTJob.model_validate(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    torch.manual_seed(job.seed)
    deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")

    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        job.model_path, trust_remote_code=job.trust_remote_code, use_safetensors=True, dtype=torch.float32
    )
    save_dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32

    examples = _load_examples(job, tokenizer)
    sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=True, seed=job.seed)
    loader = DataLoader(
        examples, batch_size=job.per_device_batch_size, sampler=sampler,
        collate_fn=lambda batch: _collate(batch, tokenizer.pad_token_id),
    )
    steps = job.epochs * math.ceil(len(loader) / job.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay)
    scheduler = get_scheduler(
        job.lr_scheduler, optimizer, num_warmup_steps=int(job.warmup_ratio * steps), num_training_steps=steps
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job)
    )

    history = []
    for epoch in range(job.epochs):
        sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            total, count = total + loss.item(), count + 1
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "examples": len(examples)})
        ray.train.report(history[-1])

    _save_consolidated(engine, job, tokenizer, save_dtype, rank)
    if rank == 0:
        Path(job.output_dir, TRAINING_LOG).write_text(json.dumps({"epochs": history, "world_size": world}, indent=2))


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


def run_sft(job: SFTJob) -> dict[str, Any]:
    """Fine-tune with Ray Train on the running Ray cluster; return the last reported metrics."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if Path(job.output_dir).exists():
        raise FileExistsError(f"SFT output folder already exists: {job.output_dir}")
    workers = (job.min_workers, job.num_workers) if job.min_workers else job.num_workers
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": job.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=os.path.abspath(job.storage_path),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    trainer.fit()
    log = Path(job.output_dir) / TRAINING_LOG
    if not (Path(job.output_dir) / "config.json").is_file() or not log.is_file():
        raise RuntimeError(f"SFT finished but wrote no model to {job.output_dir}")
    return json.loads(log.read_text())
