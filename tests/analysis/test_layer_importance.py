"""layer_importance against a brute-force computation on a tiny random Qwen2 model."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from imm_ray.analysis import AnalysisError, layer_importance
from imm_ray.tokens import encode_pair

PAIRS = [
    ("Question: Tom has 3 apples and buys 4 more.\nResponse: ", "3 + 4 = 7. The answer is 7"),
    ("Instruction: A box holds 12 pens; 5 are taken.", " 12 - 5 = 7\nThe answer is 7"),
    ("Below is an instruction that describes a task.", "The answer is 42"),
    ("Q: 2 + 2?", "2 + 2 = 4. The answer is 4"),
    ("How many are left?", "12 - 5 = 7. The answer is 7, since five of twelve pens are taken"),
]
# Named here, not derived from the module's own predicate: the linear weights of a Qwen2 decoder layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def brute_force(model_dir: Path, tokenizer, pairs, *, mask_prompt: bool = True) -> np.ndarray:
    """One pair at a time, no padding, transformers' own shifted loss: the definition written out directly.

    L(D) = Σ_i n_i · mean-loss_i / Σ_i n_i (the token mean over the whole set), then Σ|grad ⊙ W| per layer.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + response_ids])
        labels = ids.clone()
        if mask_prompt:
            labels[0, : len(prompt_ids)] = -100
        examples.append((ids, labels, int((labels[0, 1:] != -100).sum())))
    total = sum(n for _, _, n in examples)
    for ids, labels, n in examples:
        (model(input_ids=ids, labels=labels).loss * n / total).backward()
    layers = model.model.layers
    return np.array(
        [
            sum(
                float((m.weight.grad * m.weight.detach()).abs().sum())
                for block in (layer.self_attn, layer.mlp)
                for name, m in block.named_children()
                if name in PROJECTIONS
            )
            for layer in layers
        ]
    )


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_brute_force_whatever_the_batch_size(tiny_model_dir, tokenizer, batch_size):
    df = layer_importance(tiny_model_dir, PAIRS, batch_size=batch_size, progress=False)
    assert list(df.columns) == ["layer", "importance"]
    assert df["layer"].tolist() == [0, 1, 2] and df["layer"].dtype == np.int64
    np.testing.assert_allclose(df["importance"], brute_force(tiny_model_dir, tokenizer, PAIRS), rtol=1e-4)


def test_prompt_tokens_carry_no_loss(tiny_model_dir, tokenizer):
    """The result is the response-only score and measurably not the score with the prompt labelled too."""
    got = layer_importance(tiny_model_dir, PAIRS, batch_size=2, progress=False)["importance"].to_numpy()
    response_only = brute_force(tiny_model_dir, tokenizer, PAIRS, mask_prompt=True)
    with_prompt = brute_force(tiny_model_dir, tokenizer, PAIRS, mask_prompt=False)
    assert np.max(np.abs(with_prompt - response_only) / response_only) > 0.05  # the check can tell them apart
    np.testing.assert_allclose(got, response_only, rtol=1e-4)


def test_loss_is_a_token_mean_over_the_whole_set(tiny_model_dir):
    """Repeating every pair leaves L(D), hence I, unchanged: the loss is a mean, not a sum, over D."""
    once = layer_importance(tiny_model_dir, PAIRS, batch_size=4, progress=False)["importance"]
    twice = layer_importance(tiny_model_dir, PAIRS * 2, batch_size=4, progress=False)["importance"]
    np.testing.assert_allclose(twice, once, rtol=1e-4)


def test_prompt_and_response_are_tokenized_separately(tokenizer):
    """Joint tokenization would merge across the boundary; the labels must be exactly the response's tokens."""
    prompt, response = "The ans", "wer is 7"
    joint = tokenizer(prompt + response)["input_ids"]
    separate = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    assert joint != separate  # the boundary matters for this pair
    ids, labels = encode_pair(tokenizer, prompt, response, max_length=512)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert ids == separate + [tokenizer.eos_token_id]
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tokenizer.decode(labels[n_prompt:]) == response + tokenizer.eos_token


def test_truncation_cuts_the_response_tail(tokenizer):
    prompt_ids = tokenizer("Q: 2 + 2?")["input_ids"]
    ids, labels = encode_pair(tokenizer, "Q: 2 + 2?", "2 + 2 = 4. The answer is 4", max_length=len(prompt_ids) + 3)
    assert len(ids) == len(labels) == len(prompt_ids) + 3
    assert ids[: len(prompt_ids)] == prompt_ids
    response_ids = tokenizer("2 + 2 = 4. The answer is 4", add_special_tokens=False)["input_ids"]
    assert labels[len(prompt_ids) :] == response_ids[:3]


def test_a_prompt_filling_max_length_is_refused_naming_the_pair(tiny_model_dir):
    pairs = [PAIRS[3], ("word " * 40, "The answer is 4")]
    with pytest.raises(AnalysisError, match=r"pair 1: no response token .* max_length=16"):
        layer_importance(tiny_model_dir, pairs, max_length=16, progress=False)


def test_empty_data_set_is_refused(tiny_model_dir):
    with pytest.raises(AnalysisError, match="non-empty"):
        layer_importance(tiny_model_dir, [], progress=False)


def test_pickle_only_model_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(AnalysisError, match=r"pytorch_model\.bin.*never unpickles"):
        layer_importance(folder, PAIRS, progress=False)
    assert not sentinel.exists()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        layer_importance(tmp_path / "nowhere", PAIRS, progress=False)
