"""What both GPU smoke paths share (scripts/gpu_smoke.py on the cluster stack, scripts/gpu_smoke_bare.py without it):
the checks, the synthetic arithmetic pairs, the small random Qwen2 they train, and its held-out loss."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # actors/ and imm_ray/ without an install


class SmokeFailure(RuntimeError):
    """A check of the smoke test did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def arithmetic_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """Synthetic (prompt, response) pairs: two-number sums with a one-line rationale."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pairs.append((f"Question: What is {a} + {b}?\nAnswer: ", f"{a} + {b} = {a + b}. The answer is {a + b}"))
    return pairs


def build_model(folder: Path, layers: int, hidden: int, corpus: list[str]) -> int:
    """A random bf16 Qwen2 with a byte-level BPE tokenizer trained on ``corpus``; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def held_out_loss(folder: Path, pairs: list[tuple[str, str]], device: str) -> float:
    """Mean response-token loss of a model on ``pairs`` (transformers, bf16), with the SFT stage's tokenisation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imm_ray.tokens import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    losses = []
    with torch.no_grad():
        for prompt, response in pairs:
            ids, labels = encode_pair(tokenizer, prompt, response, max_length=128)
            out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
            losses.append(out.loss.float().item())
    check(all(math.isfinite(x) for x in losses), f"{folder.name}: non-finite loss")
    return sum(losses) / len(losses)
