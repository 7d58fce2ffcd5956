"""Supervised fine-tuning with Ray Train's TorchTrainer and DeepSpeed, resumable and elastic: the driver side.

:func:`run_sft` starts a Ray Train run of ``actors.sft.worker.train_worker`` on the running Ray cluster and
returns its training log. What runs where (``actors.sft``): ``job`` holds what a run needs, ``batches`` which
examples each rank trains on at each step, ``checkpoint`` the checkpoint format, ``worker`` the training loop.

Elastic: with ``min_workers`` set, Ray Train v2 starts the workers that fit and grows or shrinks the group when
nodes join or leave (``resize_check_interval_s``), restarting it from the last checkpoint. Checkpoints are
world-size independent and every optimizer step is the job's global batch whatever the worker count
(``actors.sft.batches``), so the result does not depend on how many workers a run happened to get.

When to checkpoint (``checkpoints``): True always, False never, "auto" (the default) only where a checkpoint pays
for itself (``actors.sft.job.decide_checkpoints``). A checkpoint is read by a restarted worker group
(``max_failures`` != 0, or an elastic resize) and by a rerun of the loop after the driver died (the loop names the
Ray Train run by the stage's fingerprint, so the same run is found again). The decision is the same on every rank
(the first step's time is all-reduced), as the save is collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actors.sft.job import TRAINING_LOG, SFTJob, step_file, storage_uri
from imm_ray.progress import ProgressFn, follow_steps

__all__ = ["SFTJob", "run_sft", "storage_uri"]

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and sees that
# training ended only at a poll: 3.9-4.8 s from the saved model to `fit` returning, in every toy SFT stage of about
# 25 s (docs/benchmarks.md). Ray Train passes the variable on to its controller when the driver sets it
# (ENV_VARS_TO_PROPAGATE in Ray 2.60's ray.train.v2 constants; read from the code, it is not in Ray's docs; a test
# fails if an upgrade renames it). A value the user set wins. Elastic runs keep Ray's default: polled every 0.25 s,
# an elastic group did not grow when a node joined (tests/integration/test_cluster_elastic.py, 2 of 2 takes; it
# grew at 2 s). One process's variable is shared by its threads, so an elastic fit started while a fixed one runs
# beside it (concurrent chains) would get 0.25 s too; a loop's SFT stages are all fixed or all elastic.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.25"
_poll_lock = threading.Lock()
_poll_fits = 0  # fits running now under this module's value (concurrent chains run fits in threads)


@contextlib.contextmanager
def controller_poll(job: SFTJob) -> Iterator[None]:
    """While a fixed-size run's ``fit`` lasts, poll every POLL_INTERVAL_S unless the user set the variable; an
    elastic run gets Ray's default. The variable is taken out again afterwards, so that processes started later
    from this one (a test's or a user's) do not inherit it as if a user had set it."""
    global _poll_fits
    with _poll_lock:
        ours = not job.min_workers and (_poll_fits > 0 or POLL_INTERVAL_ENV not in os.environ)
        if ours:
            os.environ[POLL_INTERVAL_ENV] = POLL_INTERVAL_S
            _poll_fits += 1
    try:
        yield
    finally:
        if ours:
            with _poll_lock:
                _poll_fits -= 1
                if _poll_fits == 0:
                    os.environ.pop(POLL_INTERVAL_ENV, None)


def run_sft(job: SFTJob, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Fine-tune with Ray Train on the running Ray cluster; return the training log: per-epoch loss, world size,
    optimizer steps, one entry per attempt that got as far as a checkpoint or the end, the last attempt's training
    time (from the model being ready to the consolidated save) and rank 0's peak GPU memory. ``progress``
    (optional) is told each optimizer step with its loss (the token mean over the global batch)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    called = time.time()
    if Path(job.output_dir).exists():
        raise FileExistsError(f"SFT output folder already exists: {job.output_dir}")
    from actors.sft.worker import train_worker  # the worker's imports (deepspeed, torch) stay out of the driver

    workers = (job.min_workers, job.num_workers) if job.min_workers else job.num_workers
    trainer = TorchTrainer(
        train_worker,
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
    with controller_poll(job), follow_steps(step_file(job), progress):
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
