import json

import pandas as pd
import torch
from safetensors.torch import load_file

from actors.training import IGNORE_INDEX, SFTJob, deepspeed_config, run_sft, tokenize_pair
from tiny_model import build_tokenizer


def test_labels_mask_the_prompt_and_end_with_eos():
    tokenizer = build_tokenizer()
    ids, labels = tokenize_pair(tokenizer, "Instruction: 3 + 4?\nResponse: ", "3 + 4 = 7", max_length=512)
    prompt_len = len(tokenizer("Instruction: 3 + 4?\nResponse: ", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id
    short_ids, short_labels = tokenize_pair(tokenizer, "Instruction: 3 + 4?", "3 + 4 = 7", max_length=5)
    assert len(short_ids) == len(short_labels) == 5


def test_deepspeed_config_has_no_optimizer_section():
    job = SFTJob(model_path="m", data_path="d", output_dir="o", storage_path="s", zero_stage=3, precision="bf16")
    config = deepspeed_config(job)
    assert "optimizer" not in config and config["bf16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3


def test_ray_train_deepspeed_sft_learns_the_response(ray_cluster, tiny_model, tmp_path):
    data = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["Instruction: 3 + 4?\nResponse: "] * 16, "response": ["3 + 4 = 7 The answer is 7"] * 16}
                 ).to_parquet(data)
    job = SFTJob(model_path=str(tiny_model), data_path=str(data), output_dir=str(tmp_path / "out"),
                 storage_path=str(tmp_path / "ray"), epochs=3, learning_rate=3e-3, per_device_batch_size=4,
                 precision="fp32", zero_stage=2, num_workers=2)
    log = run_sft(job)
    losses = [epoch["loss"] for epoch in log["epochs"]]
    assert log["world_size"] == 2 and losses[-1] < losses[0]
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
