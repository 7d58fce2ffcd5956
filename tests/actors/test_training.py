import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from imm_ray.tokens import encode_pair
from actors.training import (
    IGNORE_INDEX,
    PROGRESS_FILE,
    Progress,
    decide_checkpoints,
    SFTJob,
    deepspeed_config,
    epoch_batches,
    optimizer_steps,
    run_sft,
    storage_uri,
)
from imm_ray.config import SFTSection
from tiny_model import build_tokenizer


def test_labels_mask_the_prompt_and_end_with_eos():
    tokenizer = build_tokenizer()
    ids, labels = encode_pair(tokenizer, "Instruction: 3 + 4?\nResponse: ", "3 + 4 = 7", max_length=512)
    prompt_len = len(tokenizer("Instruction: 3 + 4?\nResponse: ", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id
    short_ids, short_labels = encode_pair(tokenizer, "Instruction: 3 + 4?", "3 + 4 = 7", max_length=5)
    assert len(short_ids) == len(short_labels) == 5


def test_deepspeed_config_has_no_optimizer_section():
    job = SFTJob(model_path="m", data_path="d", output_dir="o", storage_path="s", zero_stage=3, precision="bf16")
    config = deepspeed_config(job)
    assert "optimizer" not in config and config["bf16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3


def _sft_job(**fields) -> SFTJob:
    return SFTJob(**({"model_path": "m", "data_path": "d", "output_dir": "o", "storage_path": "s"} | fields))


def test_the_paper_settings_make_the_checked_in_zero3_json():
    """configs/deepspeed/zero3.json is what the code builds for the config's default (paper) SFT settings."""
    paper = SFTSection()
    job = _sft_job(**paper.model_dump())
    expected = json.loads((Path(__file__).parents[2] / "configs" / "deepspeed" / "zero3.json").read_text())
    assert deepspeed_config(job) == expected
    assert (paper.epochs, paper.per_device_batch_size, paper.gradient_accumulation_steps) == (3, 4, 4)
    assert (paper.learning_rate, paper.warmup_ratio, paper.lr_scheduler) == (2e-5, 0.03, "cosine")


def test_job_errors_name_the_field():
    with pytest.raises(ValueError, match=r"min_workers \(5\) must not exceed num_workers \(4\)"):
        _sft_job(min_workers=5, num_workers=4)
    with pytest.raises(ValueError, match="checkpoints with bf16 need zero_stage >= 1"):
        _sft_job(zero_stage=0, precision="bf16", checkpoints=True)
    assert _sft_job(zero_stage=0, precision="bf16", checkpoints=False).zero_stage == 0
    assert not _sft_job(zero_stage=0, precision="bf16", max_failures=1).may_checkpoint()  # auto: off there
    with pytest.raises(ValueError, match=r"fail_once_after_epoch \(3\) is past the last epoch \(2\)"):
        _sft_job(epochs=2, fail_once_after_epoch=3)


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


def test_epoch_order_matches_distributed_sampler_and_resumes_on_another_world_size():
    from torch.utils.data import DistributedSampler

    size, seed, epoch = 23, 5, 2
    for rank in range(3):
        sampler = DistributedSampler(range(size), num_replicas=3, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        mine = epoch_batches(size, seed=seed, epoch=epoch, start=0, rank=rank, world=3, batch_size=2)
        assert [i for batch in mine for i in batch] == list(sampler)
    # Two workers take 2 micro-batches of 3 (12 positions), then 3 workers go on from position 12: every example
    # is trained on exactly once, plus the padding that makes the rest a multiple of 3.
    before = [i for r in range(2) for b in epoch_batches(size, seed=seed, epoch=epoch, start=0, rank=r, world=2,
                                                         batch_size=3)[:2] for i in b]
    after = [i for r in range(3) for b in epoch_batches(size, seed=seed, epoch=epoch, start=12, rank=r, world=3,
                                                        batch_size=3) for i in b]
    assert len(before) == 12 and len(after) == 12  # 11 left, padded with the epoch's first example
    assert sorted(set(before + after)) == list(range(size))
    assert set(before) & set(after) == {before[0]}


def test_optimizer_steps_count_the_epoch_tail_and_a_resume():
    job = _sft_job(epochs=3, per_device_batch_size=4, gradient_accumulation_steps=4)
    # 100 examples on 2 workers: 50 each, 13 micro-batches, so 4 optimizer steps per epoch (the last takes one).
    assert optimizer_steps(job, 100, 2, Progress()) == 12
    # After 8 micro-batches of epoch 2 (64 positions) on 2 workers, 2 steps of it are done; 4 workers go on:
    # 36 positions left, 9 each, 3 micro-batches, 1 step; then one more epoch of 25 each, 7 micro-batches, 2 steps.
    resumed = Progress(epoch=1, consumed=64, optimizer_steps=6)
    assert optimizer_steps(job, 100, 4, resumed) == 6 + 1 + 2
    assert optimizer_steps(job, 100, 2, resumed) == 12  # on the same workers the schedule is unchanged


def test_ray_train_deepspeed_sft_learns_the_response(ray_cluster, tiny_model, tmp_path):
    """ZeRO-2, fp32, 2 workers, with a checkpoint every 2 optimizer steps kept for inspection."""
    data = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["Instruction: 3 + 4?\nResponse: "] * 16, "response": ["3 + 4 = 7 The answer is 7"] * 16}
                 ).to_parquet(data)
    job = SFTJob(model_path=str(tiny_model), data_path=str(data), output_dir=str(tmp_path / "out"),
                 storage_path=str(tmp_path / "ray"), epochs=3, learning_rate=3e-3, per_device_batch_size=4,
                 precision="fp32", zero_stage=2, num_workers=2, checkpoint_every_steps=1, keep_checkpoints=True,
                 checkpoints=True)
    log = run_sft(job)
    losses = [epoch["loss"] for epoch in log["epochs"]]
    assert log["world_size"] == 2 and losses[-1] < losses[0]
    assert log["checkpointed"] and log["tokens"] > 0 and log["train_seconds"] > 0
    timeline = log["timeline"]
    assert 0 < timeline["worker_start"] <= timeline["model_ready"] <= timeline["trained"] <= timeline["cleaned_up"]
    assert log["optimizer_steps"] == 3 * math.ceil(16 / 2 / 4)

    # Ray Train kept only the last checkpoint (the one at the end), merged from both ranks' files.
    [checkpoint] = [p for p in (tmp_path / "ray" / job.name).iterdir() if p.is_dir()]
    assert checkpoint.name == f"checkpoint_epoch003_step{log['optimizer_steps']:07d}"
    assert sorted(p.name for p in checkpoint.glob("state-rank*")) == [
        "state-rank00000-000.safetensors", "state-rank00001-000.safetensors"]
    progress = Progress.model_validate_json((checkpoint / PROGRESS_FILE).read_text())
    assert (progress.epoch, progress.consumed, progress.history) == (3, 0, log["epochs"])
    state = {**load_file(checkpoint / "state-rank00000-000.safetensors"),
             **load_file(checkpoint / "state-rank00001-000.safetensors")}
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(state[name], saved[name]) for name in saved)  # fp32 master = the consolidated model
    assert state["model.norm.weight::exp_avg_sq"].abs().sum() > 0
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
