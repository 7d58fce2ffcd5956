"""The toy model: a tiny Qwen2 (transformers ``Qwen2Config``), the same code path as the paper's models.

Eight layers so that per-layer importance and weight-change plots have a shape; head_dim 32 because vLLM's
CPU attention kernels need it; tied embeddings to keep the ~2M parameters in the transformer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast, Qwen2Config


@dataclass(frozen=True)
class ToyModelSpec:
    """Shape of the toy model; the defaults are the shipped one (~2.2M parameters)."""

    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 256
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def qwen2_config(spec: ToyModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The ``Qwen2Config`` for ``spec``, with the tokenizer's vocabulary and special tokens."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
