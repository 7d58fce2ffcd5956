"""The toy tokenizer: byte-level BPE trained locally with Hugging Face ``tokenizers``, digits one per token.

Single-digit tokens give the tiny model one embedding per digit and a fixed number of tokens per number,
which is what lets it learn column arithmetic at all. The trained tokenizer is wrapped as a transformers
``PreTrainedTokenizerFast`` so every stage loads it with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it; left padding, as batched generation needs."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # ByteLevel first (GPT-2 word split, bytes to printable characters), then every digit on its own: BPE
    # merges never cross a pre-token boundary, so no token can hold two digits or a digit and a letter.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left",
        model_max_length=256, clean_up_tokenization_spaces=False,
    )
