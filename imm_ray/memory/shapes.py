"""A decoder model's shape read from its ``config.json`` alone (no weights): what the memory plan sizes from.

The shape of a model named by a hub id is read from, in order: a local folder's ``config.json``, the Hugging Face
cache (``try_to_load_from_cache``, no network), the table of :data:`KNOWN_SHAPES` below, and last the hub itself
(``config.json`` only, a few KiB). A model in none of them is a :class:`ShapeError` naming the config field.

The parameter count follows the Qwen2 / Llama layout of transformers: per layer q, k, v, o projections (with a
bias on q, k, v where ``attention_bias`` says so; Qwen2 always has it), a gated MLP (gate, up, down), two RMSNorm
weights; an embedding, a final norm and an LM head unless it is tied to the embedding. Tested against the
published totals of the four paper models (tests/memory/test_shapes.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ShapeError(ValueError):
    """A model whose shape cannot be read; the message names the config field and what was tried."""


class ModelShape(BaseModel):
    """The sizes of a decoder-only transformer that decide its memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate: int = Field(ge=1)
    vocab: int = Field(ge=1)
    tied_embeddings: bool
    qkv_bias: bool
    max_positions: int | None = None  # max_position_embeddings: no sequence is longer
    dtype: str = "bfloat16"  # the checkpoint's own dtype (config.json's dtype / torch_dtype)
    source: str = ""  # where the shape was read

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matrix_parameters(self) -> int:
        """The 2-D weights of one decoder layer (q, k, v, o, gate, up, down): what the layer analysis scores."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_dim
        return attention + 3 * self.hidden * self.intermediate

    def layer_parameters(self) -> int:
        bias = (self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.layer_matrix_parameters() + bias + 2 * self.hidden

    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    def parameters(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_parameters()
        return self.layers * self.layer_parameters() + self.embedding_parameters() + head + self.hidden


def shape_from_config(config: dict[str, Any], source: str) -> ModelShape:
    """A :class:`ModelShape` from the fields of an HF ``config.json`` (Qwen2, Llama, Mistral naming)."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return ModelShape(
            hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=int(config["max_position_embeddings"]) if config.get("max_position_embeddings") else None,
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            dtype=dtype if dtype in DTYPE_BYTES else "float32", source=source,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ShapeError(f"{source}: not a decoder config.json the memory plan can read ({error})") from None


# The paper models' shapes, from each model's config.json on the Hugging Face hub
# (https://huggingface.co/<id>/blob/main/config.json) and, for Qwen2.5, Table 1 of the Qwen2.5 technical report
# (arXiv:2412.15115); for Llama 2, Table 1 of Touvron et al. 2023 (arXiv:2307.09288). Their parameter counts
# (494M, 1.54B, 7.62B, 6.74B) are the published ones (tested).
_QWEN25_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936,
                   tied_embeddings=True, qkv_bias=True)
_QWEN25_15B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936,
                   tied_embeddings=True, qkv_bias=True)
_QWEN25_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
                  tied_embeddings=False, qkv_bias=True)
_LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000,
                  tied_embeddings=False, qkv_bias=False, dtype="float16")
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B, "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B, "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
}


def model_shape(field: str, path: str) -> ModelShape:
    """The shape of the model at ``path`` (a folder or a hub id), reading ``config.json`` only."""
    folder = Path(path)
    if folder.is_dir():
        return _read(folder / "config.json", field)
    cached = _cached_config(path)
    if cached is not None:
        return _read(cached, field)
    if path in KNOWN_SHAPES:
        return ModelShape(**KNOWN_SHAPES[path], source=f"known shape of {path} (imm_ray/memory/shapes.py)")
    try:
        from huggingface_hub import hf_hub_download

        return _read(Path(hf_hub_download(path, "config.json")), field)
    except Exception as error:  # noqa: BLE001 - any hub failure means the same to the user
        raise ShapeError(
            f"{field}: {path} is not a local folder, not in the Hugging Face cache, not a known shape, and its "
            f"config.json could not be fetched ({type(error).__name__})"
        ) from None


def _read(file: Path, field: str) -> ModelShape:
    if not file.is_file():
        raise ShapeError(f"{field}: {file.parent} has no config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ShapeError(f"{field}: {file} is not valid JSON ({error})") from None
    return shape_from_config(config, str(file))


def _cached_config(repo_id: str) -> Path | None:
    """``config.json`` of a hub model already in the local Hugging Face cache (no network)."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id: not cached
        return None
    return Path(found) if isinstance(found, str) else None
