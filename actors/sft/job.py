"""What one SFT run needs: the job (plain data that travels to the Ray Train workers) and its DeepSpeed config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TRAINING_LOG = "training_log.json"
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
    gradient_accumulation_steps: int = Field(1, ge=1)  # at ``num_workers`` workers (see ``global_batch``)
    # examples per optimizer step whatever the worker count; None: per-device batch x accumulation x num_workers
    global_batch_size: int | None = Field(None, ge=1)
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
    checkpoints: bool | Literal["auto"] = "auto"  # False: a restart begins again from the base model; auto: below
    checkpoint_min_seconds: float = Field(60.0, ge=0)  # auto: checkpoint only runs estimated to train longer
    checkpoint_every_steps: int | None = Field(None, ge=1)  # besides each epoch end; None: epoch ends only
    keep_checkpoints: bool = False  # False: the run's Ray Train folder is deleted once the model is written
    resize_check_interval_s: float = Field(60.0, gt=0)  # elastic: how often Ray Train looks for more workers

    @model_validator(mode="after")
    def _consistent(self) -> SFTJob:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers ({self.num_workers})")
        if self.checkpoints is True and self.zero_stage == 0 and self.precision != "fp32":
            raise ValueError(f"checkpoints with {self.precision} need zero_stage >= 1: without ZeRO, DeepSpeed's "
                             "mixed-precision optimizer keeps the fp32 master weights out of reach")
        return self

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step: fixed by the job, not by how many workers an elastic run got."""
        return self.global_batch_size or self.per_device_batch_size * self.gradient_accumulation_steps * self.num_workers

    def may_checkpoint(self) -> bool:
        """False where no checkpoint will be written (so none is read either)."""
        if self.checkpoints == "auto":
            return not (self.zero_stage == 0 and self.precision != "fp32")
        return bool(self.checkpoints)


def decide_checkpoints(job: SFTJob, first_step_seconds: float, total_steps: int) -> bool:
    """The "auto" rule: checkpoint only where training is estimated (the first optimizer step's time x the run's
    steps) to take longer than ``checkpoint_min_seconds``; for a stage that trains in seconds, redoing it costs less
    than a checkpoint (a gather of the fp32 master weights and both AdamW moments, a write per rank, Ray Train's
    merge of the ranks' folders)."""
    if job.checkpoints != "auto":
        return bool(job.checkpoints)
    return job.may_checkpoint() and first_step_seconds * total_steps > job.checkpoint_min_seconds


def deepspeed_config(job: SFTJob, micro_batches_per_step: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for a job (no optimizer section: the torch optimizer comes from code).

    ``micro_batches_per_step`` is the accumulation at the world size a worker group actually got
    (:func:`actors.sft.batches.micro_batches_per_step`); the job's own accumulation where not given.
    ``configs/deepspeed/zero3.json`` is this dict for the paper's settings, written out for reading."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.per_device_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step or job.gradient_accumulation_steps,
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


STEPS_FILE = "steps.jsonl"  # rank 0: one line per optimizer step (step, total, loss), followed by the driver


def storage_uri(path: str) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://bucket/prefix``) as given, a local path made absolute."""
    import os

    return path if "://" in path else os.path.abspath(path)


def step_file(job: SFTJob) -> Path | None:
    """Where rank 0 writes its steps: in the run's Ray Train folder, where the storage is a local (or shared)
    path; None for remote storage (s3://), where the driver could not follow it."""
    return None if "://" in job.storage_path else Path(storage_uri(job.storage_path)) / job.name / STEPS_FILE
