"""Per-process memory estimates against hand-computed references for the toy's shape, and ZeRO's partitions."""

from __future__ import annotations

import pytest

from imm_ray.memory import estimate
from imm_ray.memory.shapes import ModelShape

# the shipped toy (imm_ray/assets/toy/config.json): 2,165,376 parameters
TOY = ModelShape(hidden=128, layers=8, heads=4, kv_heads=4, head_dim=32, intermediate=512, vocab=492,
                 tied_embeddings=True, qkv_bias=True)
N = 2_165_376


def test_parameters_by_hand():
    layer = 4 * 128 * 128 + 3 * 128 * 512 + (128 + 128 + 128) + 2 * 128  # q k v o, gate up down, qkv bias, 2 norms
    assert TOY.parameters() == 8 * layer + 492 * 128 + 128 == N


def test_kv_cache_and_activations_by_hand():
    assert estimate.kv_bytes_per_token(TOY, "bfloat16") == 2 * 8 * 4 * 32 * 2  # K and V, layers, heads, dim, bytes
    assert estimate.kv_bytes_per_token(TOY, "bfloat16", tensor_parallel=2) == 2 * 8 * 2 * 32 * 2
    per_token_layer = 20 * 128 + 4 * 128 + 8 * 512  # 7,168 bytes (module docstring's constants)
    assert estimate.activation_bytes(TOY, 2, 16, "bfloat16") == 2 * 16 * 8 * per_token_layer == 1_835_008
    assert estimate.activation_bytes(TOY, 2, 16, "float32") == 2 * 1_835_008
    assert estimate.logit_bytes(TOY, 2, 16) == 2 * 16 * 492 * 16


def test_transformers_engine_counts_the_prompts_cache_of_the_shared_prefill():
    """128 prompts x 2 samples: the repeated cache of 256 sequences, plus the prompts' own until it is repeated."""
    per_token = estimate.kv_bytes_per_token(TOY, "bfloat16")
    shared = dict(estimate.transformers_need(TOY, dtype="bfloat16", sequences=256, context=200, on_gpu=False,
                                             prompts=128).parts)
    assert shared["KV cache (256 sequences × 200 tokens)"] == 256 * 200 * per_token
    assert shared["prompts' cache before it is repeated (128 × 200 tokens)"] == 128 * 200 * per_token
    one_each = estimate.transformers_need(TOY, dtype="bfloat16", sequences=128, context=200, on_gpu=False, prompts=128)
    assert not any(name.startswith("prompts'") for name, _ in one_each.parts)


@pytest.mark.parametrize(("stage", "expected"), [
    (0, (2 * N, 2 * N, 12 * N)),
    (1, (2 * N, 2 * N, 12 * N // 4)),
    (2, (2 * N, 2 * N // 4, 12 * N // 4)),
    (3, (2 * N // 4, 2 * N // 4, 12 * N // 4)),
])
def test_zero_partitions_mixed_precision(stage, expected):
    """ZeRO paper 3.1: 2 + 2 + 12 bytes per parameter; stage 1 divides the optimizer state, 2 the gradients too,
    3 the parameters too (N is divisible by 4, so no rounding)."""
    assert tuple(estimate.zero_state_bytes(TOY, stage, 4, "bf16").values()) == expected


def test_zero_fp32_has_no_separate_master_copy():
    assert tuple(estimate.zero_state_bytes(TOY, 3, 2, "fp32").values()) == (4 * N // 2, 4 * N // 2, 8 * N // 2)


def test_sft_worker_adds_zero3_gathered_modules_activations_and_logits():
    need = estimate.sft_need(TOY, stage=3, workers=4, precision="bf16", batch=8, max_length=512, on_gpu=True)
    parts = dict(need.parts)
    assert parts["ZeRO-3 gathered modules"] == 2 * max(TOY.layer_parameters(), 492 * 128) * 2
    activations = 8 * 512 * 8 * (20 * 128 + 4 * 128 + 8 * 512)
    assert parts["activations (b=8, s=512)"] == activations
    assert need.gpu_bytes == (16 * N // 4 + parts["ZeRO-3 gathered modules"] + activations + 8 * 512 * 492 * 16
                              + estimate.CUDA_CONTEXT_BYTES)
    assert need.host_bytes == estimate.PROCESS_HOST_BYTES + 2 * N  # the whole model loaded before partitioning


def test_sft_peak_can_be_the_consolidated_save():
    """Short sequences: every rank gathering the whole 16-bit model to save it outweighs the training step."""
    need = estimate.sft_need(TOY, stage=3, workers=4, precision="bf16", batch=1, max_length=8, on_gpu=True)
    assert need.gpu_bytes == 16 * N // 4 + 2 * N + estimate.CUDA_CONTEXT_BYTES
    assert need.note == "peak while the consolidated model is saved"


def test_vllm_kv_cache_is_what_the_claim_leaves():
    gpu = 16 * 2**30
    need = estimate.vllm_need(TOY, gpu_memory=gpu, utilization=0.5, tensor_parallel=1, dtype="bfloat16",
                              max_model_len=256)
    parts = dict(need.parts)
    assert parts["weights (shard)"] == 2 * N
    assert sum(parts.values()) == int(0.5 * gpu)
    assert need.gpu_bytes == int(0.5 * gpu)  # one sequence fits easily: the claim is the need


def test_vllm_without_room_for_one_sequence_needs_a_larger_gpu():
    big = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000,
                     tied_embeddings=False, qkv_bias=False)
    need = estimate.vllm_need(big, gpu_memory=16 * 2**30, utilization=0.9, tensor_parallel=1, dtype="bfloat16",
                              max_model_len=4096)
    assert need.gpu_bytes > 16 * 2**30  # 13.5 GB of weights + activations + 2 GiB of KV for 4,096 tokens


def test_merge_worker_holds_ten_float32_chunks():
    assert dict(estimate.merge_need(1 << 18).parts)["chunk buffers"] == 10 * 4 * (1 << 18)
