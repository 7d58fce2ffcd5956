"""A tiny Qwen2 model and a locally trained tokenizer, built in seconds for tests (no download)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "Instruction: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Response: Let's think step by step. 3 + 4 = 7 The answer is 7",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request",
    "Question: A: Let's think step by step. The answer is 12",
] * 20


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random tiny Qwen2 model + tokenizer as an HF folder (safetensors)."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# SFT pairs the resilience and elastic tests train on: 10 additions, 200 pairs (25 steps of 8 per epoch)
ADDITION_PAIRS = [(f"Instruction: {a} + 4?\nResponse: ", f"{a} + 4 = {a + 4} The answer is {a + 4}")
                  for a in range(10)] * 20


def write_addition_pairs(folder: Path) -> Path:
    """``folder/pairs.parquet`` holding :data:`ADDITION_PAIRS` (written once; later calls reuse it)."""
    import pandas as pd

    data = folder / "pairs.parquet"
    if not data.exists():
        pd.DataFrame(ADDITION_PAIRS, columns=["prompt", "response"]).to_parquet(data)
    return data
