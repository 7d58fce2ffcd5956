"""A tiny Qwen2 that has memorised a few lines, so its greedy path is sharp (test helper for both engines).

A model with random weights has top-2 logit gaps small enough that float rounding (vLLM's CPU kernels against
torch's) can flip a greedy token, which would make an engine-agreement test flaky or force it to compare less.
A few hundred Adam steps on four lines give next-token margins of several logits on those lines, so a mismatch
means an engine bug, not rounding. Built with transformers (``Qwen2Config``, ``Qwen2ForCausalLM``) and a byte-level
BPE tokenizer trained here with Hugging Face ``tokenizers``; saved as safetensors. head_dim is 32: vLLM's CPU
attention needs head_dim >= 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS = "<|endoftext|>"
PAD = "<|pad|>"
LINES = (
    "Question: Tom has 3 apples and buys 4 more. Answer: 3 + 4 = 7. The answer is 7.",
    "Question: A box holds 12 pens and 5 are taken. Answer: 12 - 5 = 7. The answer is 7.",
    "Question: Ann reads 6 pages a day for 2 days. Answer: 6 * 2 = 12. The answer is 12.",
    "Question: Bob splits 9 sweets among 3 kids. Answer: 9 / 3 = 3. The answer is 3.",
)
PROMPTS = tuple(line[: line.index("Answer:") + len("Answer:")] for line in LINES)
"""Each line up to ``Answer:``; the memorised rest is the greedy completion."""
OFF_CORPUS = ("Question: Sue has 5 cats", "Answer:", "Zed quips")
"""Prompts the model never saw: flat next-token distributions, so samples at temperature 1 vary."""


def memorised_rest(index: int) -> str:
    """The greedy completion of ``PROMPTS[index]``: the rest of its line (eos is a special token, not text)."""
    return LINES[index][len(PROMPTS[index]) :]


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with one token per digit; eos and pad are special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(LINES) * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, padding_side="left")


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """2 layers, hidden 64, 2 heads of 32: about 60k parameters."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def memorise(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int = 100) -> float:
    """Full-batch Adam on the lines, each followed by eos; returns the last loss."""
    ids = [tokenizer.encode(line, add_special_tokens=False) + [tokenizer.eos_token_id] for line in LINES]
    width = max(len(row) for row in ids)
    batch = torch.full((len(ids), width), tokenizer.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=batch, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def build_engine_test_model(folder: Path, seed: int = 0) -> Path:
    """Train and save the model + tokenizer as an HF folder; raises if it did not memorise the lines.

    Trains on one thread: on a loaded 2-core machine torch's thread pool makes the 100 steps 30x slower
    (124 s against 3.6 s measured), as the threads wait on each other.
    """
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    model = tiny_qwen2(tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = memorise(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    if loss > 0.05:
        raise RuntimeError(f"the engine test model did not memorise its lines (loss {loss:.3f})")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
