import json
import os
from pathlib import Path

import pytest

from actors.sft.job import SFTJob, decide_checkpoints, deepspeed_config, step_file, storage_uri
from imm_ray.config import SFTSection


def _sft_job(**fields) -> SFTJob:
    return SFTJob(**({"model_path": "m", "data_path": "d", "output_dir": "o", "storage_path": "s"} | fields))


def test_deepspeed_config_has_no_optimizer_section():
    config = deepspeed_config(_sft_job(zero_stage=3, precision="bf16"))
    assert "optimizer" not in config and config["bf16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3


def test_the_paper_settings_make_the_checked_in_zero3_json():
    """configs/deepspeed/zero3.json is what the code builds for the config's default (paper) SFT settings."""
    paper = SFTSection()
    job = _sft_job(**paper.model_dump())
    expected = json.loads((Path(__file__).parents[2] / "configs" / "deepspeed" / "zero3.json").read_text())
    assert deepspeed_config(job) == expected
    assert (paper.epochs, paper.per_device_batch_size, paper.gradient_accumulation_steps) == (3, 4, 4)
    assert (paper.learning_rate, paper.warmup_ratio, paper.lr_scheduler) == (2e-5, 0.03, "cosine")


def test_the_global_batch_is_fixed_by_the_job_not_by_the_workers_a_run_gets():
    paper = _sft_job(per_device_batch_size=4, gradient_accumulation_steps=4, num_workers=8, min_workers=2)
    assert paper.global_batch == 128  # the paper's 4 x 4 x 8 GPUs, also when only 2 workers are free
    assert _sft_job(global_batch_size=96, num_workers=8).global_batch == 96
    # on the workers a group got, the accumulation follows: 2 workers run 16 micro-batches of 4 per step
    assert deepspeed_config(paper, 16)["gradient_accumulation_steps"] == 16


def test_job_errors_name_the_field():
    with pytest.raises(ValueError, match=r"min_workers \(5\) must not exceed num_workers \(4\)"):
        _sft_job(min_workers=5, num_workers=4)
    with pytest.raises(ValueError, match="checkpoints with bf16 need zero_stage >= 1"):
        _sft_job(zero_stage=0, precision="bf16", checkpoints=True)
    with pytest.raises(ValueError, match="global_batch_size"):
        _sft_job(global_batch_size=0)
    assert _sft_job(zero_stage=0, precision="bf16", checkpoints=False).zero_stage == 0
    assert not _sft_job(zero_stage=0, precision="bf16", max_failures=1).may_checkpoint()  # auto: off there


def test_auto_checkpoints_only_runs_long_enough_to_pay_for_them():
    short, long = (0.1, 100), (1.0, 100)  # (first step seconds, optimizer steps): 10 s and 100 s estimated
    # a rerun after the driver died reads one too (the run is named by its stage), so no restart budget is needed
    assert decide_checkpoints(_sft_job(), *long)
    assert not decide_checkpoints(_sft_job(), *short)
    assert not decide_checkpoints(_sft_job(max_failures=1), *short)
    assert decide_checkpoints(_sft_job(max_failures=1), *long)
    assert decide_checkpoints(_sft_job(min_workers=1), *long)  # elastic resizes restart the worker group
    assert decide_checkpoints(_sft_job(max_failures=1, checkpoint_min_seconds=5), *short)
    assert decide_checkpoints(_sft_job(checkpoints=True), *short)
    assert not decide_checkpoints(_sft_job(checkpoints=False, max_failures=-1), *long)
    assert _sft_job().may_checkpoint() and not _sft_job(checkpoints=False).may_checkpoint()


def test_storage_uri_keeps_urls_and_makes_local_paths_absolute():
    assert storage_uri("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert storage_uri("runs/x") == os.path.join(os.getcwd(), "runs/x")
    assert step_file(_sft_job(storage_path="s3://bucket/x")) is None  # the driver cannot follow a remote file
    assert step_file(_sft_job(storage_path="runs", name="sft-1")) == Path(os.getcwd(), "runs", "sft-1", "steps.jsonl")
