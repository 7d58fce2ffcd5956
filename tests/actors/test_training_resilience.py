"""Ray Train v2 resilience of the SFT stage, on the local 2-CPU cluster (gloo, DeepSpeed).

One uninterrupted elastic run asks for (1, 4) workers and must start with the workers that fit; a second run of
the same job loses a worker process (killed from here, SIGKILL) once a checkpoint is registered and must finish
from that checkpoint with exactly the weights of the uninterrupted run. A third pair of runs shows that the global
batch, not the worker count, decides the result: one worker and two workers train the same model.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from actors.training import SFTJob, run_sft
from tiny_model import ADDITION_PAIRS, write_addition_pairs

pytestmark = pytest.mark.integration



def _job(tmp: Path, model: Path, name: str, **overrides) -> SFTJob:
    """The paper's SFT recipe shape (ZeRO-3, bf16, accumulation, cosine with warm-up) at toy size."""
    data = write_addition_pairs(tmp)
    settings = dict(
        model_path=str(model), data_path=str(data), output_dir=str(tmp / name / "model"),
        storage_path=str(tmp / "ray"), name=name, seed=7, epochs=3, learning_rate=3e-3, per_device_batch_size=2,
        gradient_accumulation_steps=2, global_batch_size=8, warmup_ratio=0.1, precision="bf16", zero_stage=3,
        checkpoints=True,
    )
    return SFTJob(**(settings | overrides))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model, tmp_path_factory):
    """An elastic run asking for 1 to 4 workers, 1 CPU each; returns (job, log, CPUs free at its start)."""
    tmp = tmp_path_factory.mktemp("resilience")
    free = int(ray_cluster.available_resources().get("CPU", 0))
    job = _job(tmp, tiny_model, "elastic", min_workers=1, num_workers=4)
    return job, run_sft(job), free


def test_elastic_run_starts_with_the_workers_that_fit(uninterrupted):
    job, log, free = uninterrupted
    assert log["world_size"] == min(4, free) >= 1
    assert log["global_batch"] == 8 and log["optimizer_steps"] == 3 * len(ADDITION_PAIRS) // 8
    assert [a["start_epoch"] for a in log["attempts"]] == [0]
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    assert log["epochs"][-1]["loss"] < log["epochs"][0]["loss"]
    assert not (Path(job.storage_path) / job.name).exists()  # checkpoints deleted once the model was written


@pytest.mark.parametrize("every_steps", [None, 3], ids=["epoch-checkpoints", "mid-epoch-checkpoints"])
def test_killed_worker_resumes_from_the_last_checkpoint_with_the_same_weights(uninterrupted, tiny_model, every_steps):
    """Bitwise the uninterrupted run's weights, whether the resume starts at an epoch boundary or inside an epoch
    (25 steps per epoch; a checkpoint every 3 steps lands inside one unless it is the last step's)."""
    reference_job, reference_log, _ = uninterrupted
    tmp = Path(reference_job.storage_path).parent
    job = _job(tmp, tiny_model, f"killed-{every_steps}", num_workers=reference_log["world_size"], max_failures=1,
               checkpoint_every_steps=every_steps)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(log=run_sft(job)), daemon=True)
    runner.start()
    killed = _kill_a_worker_once_a_checkpoint_is_registered(Path(job.storage_path) / job.name, runner)
    runner.join(timeout=600)
    assert killed, "the run finished before a worker could be killed"
    log = outcome["log"]

    first, second = log["attempts"]  # the first attempt lost a worker, the second resumed from a checkpoint
    assert first == {"world_size": job.num_workers, "start_epoch": 0, "start_position": 0, "start_step": 0,
                     "resumed_from": None}
    assert second["start_step"] > 0 and second["resumed_from"] == (
        f"checkpoint_epoch{second['start_epoch']:03d}_step{second['start_step']:07d}")
    if every_steps is not None and second["start_step"] < reference_log["optimizer_steps"]:
        assert second["start_position"] > 0  # resumed inside an epoch
    assert log["epochs"] == reference_log["epochs"]
    assert log["optimizer_steps"] == reference_log["optimizer_steps"]
    expected = load_file(Path(reference_job.output_dir) / "model.safetensors")
    actual = load_file(Path(job.output_dir) / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_one_and_two_workers_with_one_global_batch_train_the_same_model(ray_cluster, tiny_model, tmp_path):
    """fp32 ZeRO-2: the same steps, the same loss per step and the same weights, up to the order of float sums."""
    runs = {}
    for workers in (1, 2):
        job = _job(tmp_path, tiny_model, f"w{workers}", num_workers=workers, precision="fp32", zero_stage=2,
                   checkpoints=False, epochs=2, max_grad_norm=0.5)
        runs[workers] = (job, run_sft(job))
    (one_job, one), (two_job, two) = runs[1], runs[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["micro_batches_per_step"], two["micro_batches_per_step"]) == (4, 2)  # 8 = 4 x 2 x 1 = 2 x 2 x 2
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2 * len(ADDITION_PAIRS) // 8
    assert one["step_losses"] == pytest.approx(two["step_losses"], rel=1e-4)
    assert one["step_losses"][-1] < 0.5 * one["step_losses"][0]
    a = load_file(Path(one_job.output_dir) / "model.safetensors")
    b = load_file(Path(two_job.output_dir) / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    for name in a:
        moved = (a[name] - base[name]).abs().max()
        assert (a[name] - b[name]).abs().max() <= 1e-3 * max(float(moved), 1e-6) + 1e-6, name


def _kill_a_worker_once_a_checkpoint_is_registered(run_folder: Path, runner: threading.Thread) -> bool:
    """SIGKILL one Ray Train worker of this test's cluster once Ray Train has recorded a checkpoint in its run
    snapshot (what the restarted group reads). Only this process's descendants are candidates: other Ray clusters
    on the machine are not ours to kill."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    while runner.is_alive():
        if snapshot.is_file() and "checkpoint_epoch" in snapshot.read_text():
            workers = [p for p in psutil.Process(os.getpid()).children(recursive=True)
                       if "RayTrainWorker" in " ".join(_command_line(p))]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                return True
        time.sleep(0.05)
    return False


def _command_line(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline() or [process.name()]
    except psutil.Error:
        return []
