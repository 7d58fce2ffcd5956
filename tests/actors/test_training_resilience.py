"""Ray Train v2 resilience of the SFT stage, on the local 2-CPU cluster (gloo, DeepSpeed ZeRO-3, bf16).

One uninterrupted elastic run asks for (1, 4) workers and must start with the workers that fit; a second run of
the same job loses a worker process after its first epoch and must finish from that epoch's checkpoint with exactly
the weights of the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from actors.training import SFTJob, run_sft

pytestmark = pytest.mark.integration

PAIRS = [("Instruction: 3 + 4?\nResponse: ", "3 + 4 = 7 The answer is 7"),
         ("Instruction: 5 + 4?\nResponse: ", "5 + 4 = 9 The answer is 9")] * 12


def _job(tmp: Path, model: Path, name: str, **overrides) -> SFTJob:
    """The paper's SFT recipe shape (ZeRO-3, bf16, accumulation, cosine with warm-up) at toy size."""
    data = tmp / "pairs.parquet"
    if not data.exists():
        pd.DataFrame(PAIRS, columns=["prompt", "response"]).to_parquet(data)
    settings = dict(
        model_path=str(model), data_path=str(data), output_dir=str(tmp / name / "model"),
        storage_path=str(tmp / "ray"), name=name, seed=7, epochs=2, learning_rate=3e-3, per_device_batch_size=2,
        gradient_accumulation_steps=2, warmup_ratio=0.1, precision="bf16", zero_stage=3, checkpoints=True,
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
    assert [a["start_epoch"] for a in log["attempts"]] == [0]
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert log["epochs"][-1]["loss"] < log["epochs"][0]["loss"]
    assert not (Path(job.storage_path) / job.name).exists()  # checkpoints deleted once the model was written


def test_killed_worker_resumes_from_the_last_checkpoint_with_the_same_weights(uninterrupted, tiny_model):
    reference_job, reference_log, _ = uninterrupted
    tmp = Path(reference_job.storage_path).parent
    job = _job(tmp, tiny_model, "killed", num_workers=reference_log["world_size"], max_failures=1,
               fail_once_after_epoch=1)
    log = run_sft(job)

    first, second = log["attempts"]  # the first attempt lost a worker, the second began at epoch 2
    assert first == {"world_size": job.num_workers, "start_epoch": 0, "start_position": 0, "start_step": 0,
                     "resumed_from": None}
    assert second["start_epoch"] == 1 and second["start_position"] == 0
    assert second["start_step"] == log["epochs"][0]["optimizer_steps"] > 0
    assert second["resumed_from"] == f"checkpoint_epoch001_step{second['start_step']:07d}"
    assert log["epochs"] == reference_log["epochs"]
    assert log["optimizer_steps"] == reference_log["optimizer_steps"]
    expected = load_file(Path(reference_job.output_dir) / "model.safetensors")
    actual = load_file(Path(job.output_dir) / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
