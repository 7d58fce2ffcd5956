"""The shipped base model (imm_ray/assets/toy): loads as an HF model, has the promised shape, and its build
record holds accuracies inside the bands the self-improvement loop needs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from imm_ray.data.toy import ID_SET, TOY_SETS, load_toy
from imm_ray.grading import grade
from imm_ray.toy import TOY_MODEL_DIR, TOY_TEACHER_DIR
from imm_ray.toy.check import SamplingSpec, sample_completions
from imm_ray.toy.pretrain import RECORD_NAME


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((TOY_MODEL_DIR / RECORD_NAME).read_text())


def test_config_shape() -> None:
    config = json.loads((TOY_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_hidden_layers"] >= 8
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] >= 32
    generation = json.loads((TOY_MODEL_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] != config["pad_token_id"]


def test_weights_are_float32_safetensors_of_the_recorded_size(record: dict) -> None:
    with safe_open(TOY_MODEL_DIR / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert sum(t.numel() for t in tensors.values()) == record["parameters"]
    assert 1_000_000 < record["parameters"] < 5_000_000


def test_tokenizer_loads_fast_with_specials_and_single_digits() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "left"
    assert [t for t in tokenizer.tokenize("Leo has 405 + 17 = 422 cards.") if t.isdigit()] == list("40517422")


def test_record_is_a_partly_competent_base(record: dict) -> None:
    """ID pass@1 in [15%, 70%] (room to gain), ID train coverage at k=4 at least 30% (STaR has data), every OOD
    family measurably solved (something to lose), pretrained on a mixture where the ID form is the rarest."""
    accuracies = {a["set_name"]: a for a in record["accuracies"]}
    assert list(accuracies) == list(TOY_SETS)
    identity = accuracies[ID_SET]
    assert (identity["samples"], identity["temperature"], identity["questions"]) == (4, 0.6, 200)
    assert 0.15 <= identity["pass_at_1"] <= 0.7
    coverage = record["id_train_coverage"]
    assert coverage["samples"] == 4 and coverage["coverage"] >= 0.3
    assert all(a["pass_at_1"] > 0.05 for a in accuracies.values())  # OOD is measurable, not zero
    assert record["spec"]["seed"] == 0 and record["tokens_seen"] > 1_000_000
    shares = dict(record["spec"]["mixture"]["weights"])
    assert shares[ID_SET] < min(v for k, v in shares.items() if k != ID_SET)


def test_model_answers_in_the_trained_format() -> None:
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
    problems = load_toy(ID_SET, "test", 8, 0)
    greedy = SamplingSpec(samples=1, temperature=0.0, max_new_tokens=48)
    completions = [group[0] for group in sample_completions(model, tokenizer, [p.question for p in problems], greedy)]
    grades = [grade(p, c) for p, c in zip(problems, completions, strict=True)]
    assert all(g.extracted is not None for g in grades)  # every completion ends with "The answer is N"
    assert any(g.correct for g in grades)


@pytest.mark.skipif(not (TOY_TEACHER_DIR / "config.json").exists(), reason="no toy teacher shipped")
def test_teacher_is_a_stronger_model_of_the_same_kind(record: dict) -> None:
    """The distillation teacher: built by the same command (its own tokenizer: distillation passes text), a
    toy of the same family, stronger in-domain than the base."""
    teacher = json.loads((TOY_TEACHER_DIR / RECORD_NAME).read_text())
    assert AutoTokenizer.from_pretrained(TOY_TEACHER_DIR).eos_token == "<|endoftext|>"
    ours = {a["set_name"]: a["pass_at_1"] for a in record["accuracies"]}
    theirs = {a["set_name"]: a["pass_at_1"] for a in teacher["accuracies"]}
    assert theirs[ID_SET] > ours[ID_SET] + 0.1
    assert AutoModelForCausalLM.from_pretrained(TOY_TEACHER_DIR).config.model_type == "qwen2"
    assert (TOY_TEACHER_DIR / "model.safetensors").stat().st_size < 15_000_000
