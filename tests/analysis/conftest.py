"""Tiny Qwen2 models with random weights and a byte-level BPE tokenizer trained here (no hub access)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Response: Let's think step by step. 3 + 4 = 7. The answer is 7",
    "Instruction: A box holds 12 pens; 5 are taken. How many are left? 12 - 5 = 7",
    "Below is an instruction that describes a task. The answer is 42",
]


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (so any text encodes) with <pad> and <eos>, trained on a few lines with `tokenizers`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def tiny_config(vocab_size: int, *, layers: int = 3, intermediate: int = 48) -> Qwen2Config:
    """A Qwen2 config small enough for a CPU test (a few tens of thousands of parameters)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def save_tiny_model(folder: Path, seed: int, *, max_shard_size: str = "50GB", **config) -> Path:
    """Random-weight tiny Qwen2 + the test tokenizer, saved as an HF safetensors folder."""
    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(len(tokenizer), **config))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """The tokenizer as the model folder ships it: AutoTokenizer may rebuild it (Qwen2Tokenizer here)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)
