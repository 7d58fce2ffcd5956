import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from imm_ray.tokens import encode_pair
from actors.sft.checkpoint import PROGRESS_FILE, Progress
from actors.training import POLL_INTERVAL_ENV, SFTJob, run_sft
from imm_ray.tokens import IGNORE_INDEX
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


def test_the_poll_interval_is_the_variable_ray_train_reads_and_passes_on_to_its_controller():
    """run_sft shortens Ray Train's controller poll through an environment variable read from Ray's code (not its
    docs): an upgrade that renames it or stops passing it on must fail here, not slow every SFT stage silently."""
    from ray.train.v2._internal import constants

    assert POLL_INTERVAL_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert POLL_INTERVAL_ENV in constants.ENV_VARS_TO_PROPAGATE


def test_fixed_runs_poll_quickly_elastic_runs_keep_rays_default_and_a_users_value_wins(monkeypatch, tmp_path):
    """Set only while a fixed-size run's fit lasts: a process started afterwards (the elastic cluster test's driver)
    must not inherit it as if a user had set it."""
    from actors.training import POLL_INTERVAL_S, controller_poll

    monkeypatch.delenv(POLL_INTERVAL_ENV, raising=False)
    fixed = SFTJob(model_path="m", data_path="d", output_dir=str(tmp_path / "o"), storage_path=str(tmp_path))
    elastic = fixed.model_copy(update={"min_workers": 1})
    with controller_poll(fixed):
        with controller_poll(fixed):  # two chains' fits at once
            assert os.environ[POLL_INTERVAL_ENV] == POLL_INTERVAL_S
        assert os.environ[POLL_INTERVAL_ENV] == POLL_INTERVAL_S
    assert POLL_INTERVAL_ENV not in os.environ
    with controller_poll(elastic):
        assert POLL_INTERVAL_ENV not in os.environ
    monkeypatch.setenv(POLL_INTERVAL_ENV, "1.5")
    with controller_poll(fixed):
        assert os.environ[POLL_INTERVAL_ENV] == "1.5"
    assert os.environ[POLL_INTERVAL_ENV] == "1.5"


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
    assert log["optimizer_steps"] == 3 * math.ceil(16 / job.global_batch)  # 8 = 4 per device x 2 workers

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
