"""The one way prompts and (prompt, response) pairs become token ids: generation, SFT and layer importance.

The begin-of-sequence token is handled one way everywhere: a prompt starts with the BOS token exactly when the
tokenizer's own special-token handling would add one (Llama-2's does, Qwen2's and the toy's do not), and never
twice (a chat template may already have written it as text). So a prompt is the same ids whether it is sampled
from, trained on or scored, and a model pretrained with a BOS sees one.

A response is tokenised apart from its prompt and appended, so no token straddles the boundary and exactly the
response's tokens carry a label; it ends with the EOS token where the tokenizer has one, as SFT teaches the model
to stop.
"""

from __future__ import annotations

import functools
from typing import Any

IGNORE_INDEX = -100  # the label of a token the loss skips (torch's cross-entropy default)


@functools.lru_cache(maxsize=16)
def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text when asked for its special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's ids: its text's tokens, after one BOS where the tokenizer adds one (see the module docstring)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def encode_pair(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one pair, labels ``IGNORE_INDEX`` on the prompt; truncation cuts the tail at
    ``max_length`` (the prompt first, so a pair whose prompt fills ``max_length`` has no label left)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels
