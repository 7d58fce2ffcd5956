"""Memory of one process of each kind of stage, from the model's shape and the config (no weights, no GPU).

Every figure is bytes per process, split into named parts so the plan can show where it goes. The formulas:

- Weights: parameters × bytes of the stage's dtype.
- vLLM (one process per tensor-parallel shard): vLLM claims ``gpu_memory_utilization`` × the GPU's memory; of that,
  the weights' shard (parameters / TP), the activation peak of its profiling run (:func:`vllm_activation_bytes`)
  and the CUDA context are taken first and the rest is KV cache, which must hold at least one sequence of
  ``max_model_len`` tokens (vLLM refuses to start otherwise). KV bytes per token per shard:
  2 (K and V) × layers × kv_heads/TP × head_dim × dtype bytes.
- SFT under ZeRO stage s on W workers, after Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054), Sec. 3.1 and
  Fig. 1: mixed-precision AdamW holds 2 bytes of 16-bit parameters, 2 of gradients and K = 12 of optimizer state
  (fp32 master copy, first and second moment, 4 each) per parameter (fp32 training: 4, 4 and 8). Stage 1
  partitions the optimizer state over W, stage 2 the gradients too, stage 3 the parameters too; ZeRO-3 also
  gathers one module's 16-bit parameters at a time (:data:`ZERO3_LIVE_MODULES`: the one in use and the one
  prefetched) and, when rank 0 writes the consolidated model, every rank gathers all 16-bit parameters
  (``GatheredParameters``, actors/training.py). Every worker first loads the whole model in the training dtype on
  the host (``from_pretrained`` without ``zero.Init``).
- Activations kept for the backward pass, per decoder layer, for b sequences of s tokens (16-bit), after
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198),
  Sec. 4.1, which counts 34·s·b·h + 5·a·s²·b bytes for a GPT layer. Adapted to the Qwen2/Llama layer as
  transformers runs it: SDPA keeps no s×s attention matrix (the 5·a·s²·b term goes), there is no dropout (its masks
  go), the MLP is gated (SwiGLU with intermediate size i) and the attention grouped (kv_dim = kv_heads × head_dim):
  attention: its input, Q, output and o_proj input 2·s·b·h each (8) + K and V 2·s·b·kv_dim each (4·kv_dim);
  MLP: its input 2·s·b·h + gate output, SiLU output, up output and down input 2·s·b·i each (8·i);
  two RMSNorms, which upcast to float32: 6·s·b·h each (12).
  Per layer: s·b·(:data:`ACT_HIDDEN_BYTES`·h + :data:`ACT_KV_BYTES`·kv_dim + :data:`ACT_MLP_BYTES`·i), doubled for
  float32 activations. The logits add s·b·vocab × :data:`LOGIT_BYTES`. No activation checkpointing is used.
- The merge: a worker holds about ten float32 buffers of ``chunk_elements`` (imm_ray/merge/options.py).
- Layer analysis: importance loads the model in float32 and keeps float32 gradients of the layer matrices only
  (imm_ray/analysis.py), with float32 activations of one batch; weight change streams row blocks.

These are estimates for a planning check, not measurements: the margin between them and what a run peaks at is
what a GPU run measures (scripts/gpu_smoke.py prints peak GPU memory).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from imm_ray.memory.shapes import DTYPE_BYTES, ModelShape

GIB = 2**30
MIB = 2**20
# A Python process with torch and transformers imported (and a Ray worker's own runtime): the host memory it
# takes before any model. Measured here (CPU build of torch 2.13): `import torch, transformers` and the engine
# module, 331 MiB peak RSS; a CUDA process adds the host side of the CUDA runtime and kernels (not measured here,
# no GPU). 1.5 GiB is an allowance for both, not a measurement.
PROCESS_HOST_BYTES = int(1.5 * GIB)
# The CUDA context and cuBLAS/cuDNN workspaces of a GPU process (commonly 0.3-0.6 GiB on A100/H100 with CUDA 12).
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ACT_HIDDEN_BYTES = 20  # see the module docstring: 8 (attention) + 12 (two float32-upcasting RMSNorms)
ACT_KV_BYTES = 4  # K and V, 16-bit
ACT_MLP_BYTES = 8  # gate out, SiLU out, up out, down in, 16-bit
# bf16 logits (2) + their float32 copy for the loss (4) + the saved log-softmax (4) + the gradient formed at the
# start of the backward pass (float32 4 + bf16 2): transformers' ForCausalLMLoss upcasts the logits.
LOGIT_BYTES = 16
ZERO3_LIVE_MODULES = 2
# vLLM's defaults for its profiling pass on a GPU (vllm EngineArgs: max_num_batched_tokens with chunked prefill,
# max_num_seqs); the activation peak is one layer's widest intermediate for that many tokens plus the sampler's
# float32 logits for that many sequences.
VLLM_PROFILE_TOKENS = 8192
VLLM_MAX_SEQS = 256
MERGE_BUFFERS = 10  # imm_ray/merge/options.py: "about ten float32 buffers of chunk_elements"
WEIGHT_CHANGE_BLOCK_BYTES = 2 * 8 * (1 << 22)  # two float64 row blocks of imm_ray.analysis.BLOCK_ELEMENTS


class Need(BaseModel):
    """The memory of one process: total bytes on its GPU (0 on CPU) and on the host, with named parts."""

    model_config = ConfigDict(frozen=True)

    gpu_bytes: int
    host_bytes: int
    parts: tuple[tuple[str, int], ...]  # (what, bytes) of the device the process computes on
    note: str = ""


def weight_bytes(shape: ModelShape, dtype: str) -> int:
    return shape.parameters() * DTYPE_BYTES[dtype]


def kv_bytes_per_token(shape: ModelShape, dtype: str, tensor_parallel: int = 1) -> int:
    """K and V of every layer for one token on one tensor-parallel shard (kv heads split, or replicated when
    there are fewer kv heads than shards, as vLLM does)."""
    heads = max(1, shape.kv_heads // tensor_parallel)
    return 2 * shape.layers * heads * shape.head_dim * DTYPE_BYTES[dtype]


def activation_bytes(shape: ModelShape, batch: int, tokens: int, dtype: str) -> int:
    """Activations saved for the backward pass of ``batch`` sequences of ``tokens`` (module docstring)."""
    per_token = ACT_HIDDEN_BYTES * shape.hidden + ACT_KV_BYTES * shape.kv_dim + ACT_MLP_BYTES * shape.intermediate
    scale = DTYPE_BYTES[dtype] / 2  # the constants count 16-bit activations
    return int(batch * tokens * shape.layers * per_token * scale)


def logit_bytes(shape: ModelShape, batch: int, tokens: int) -> int:
    return batch * tokens * shape.vocab * LOGIT_BYTES


def zero_state_bytes(shape: ModelShape, stage: int, workers: int, precision: str) -> dict[str, int]:
    """Parameters, gradients and AdamW state per worker under ZeRO ``stage`` on ``workers`` (ZeRO paper, 3.1)."""
    n = shape.parameters()
    param, grad, optim = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    share = {  # which of the three are divided over the workers at each stage
        0: (1, 1, 1), 1: (1, 1, workers), 2: (1, workers, workers), 3: (workers, workers, workers),
    }[stage]
    return {
        f"parameters ({param} B, /{share[0]})": -(-n * param // share[0]),
        f"gradients ({grad} B, /{share[1]})": -(-n * grad // share[1]),
        f"AdamW fp32 master + 2 moments ({optim} B, /{share[2]})": -(-n * optim // share[2]),
    }


def sft_need(shape: ModelShape, *, stage: int, workers: int, precision: str, batch: int, max_length: int,
             on_gpu: bool) -> Need:
    """One SFT worker: ZeRO-partitioned states, ZeRO-3's gathered modules, activations, logits; the larger of the
    training step and the consolidated save."""
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    states = zero_state_bytes(shape, stage, workers, precision)
    parts = dict(states)
    if stage == 3:
        largest = max(shape.layer_parameters(), shape.embedding_parameters())
        parts["ZeRO-3 gathered modules"] = ZERO3_LIVE_MODULES * largest * DTYPE_BYTES[dtype]
    parts[f"activations (b={batch}, s={max_length})"] = activation_bytes(shape, batch, max_length, dtype)
    parts["logits and loss"] = logit_bytes(shape, batch, max_length)
    if on_gpu:
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    train = sum(parts.values())
    # saving: every rank gathers the whole 16-bit model (ZeRO-3) next to its partitions; activations are gone
    save = sum(states.values()) + (weight_bytes(shape, dtype) if stage == 3 else 0) + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    note = ""
    if save > train:
        parts = {**states, "whole model gathered to save it": weight_bytes(shape, dtype)}
        note = "peak while the consolidated model is saved"
    device = max(train, save)
    host = PROCESS_HOST_BYTES + weight_bytes(shape, dtype)  # from_pretrained of the whole model on every worker
    if not on_gpu:
        host = max(host, PROCESS_HOST_BYTES + device)
    return Need(gpu_bytes=device if on_gpu else 0, host_bytes=host, parts=tuple(parts.items()), note=note)


def vllm_activation_bytes(shape: ModelShape, tensor_parallel: int, dtype: str) -> int:
    widest = shape.hidden + 2 * shape.intermediate // tensor_parallel
    return VLLM_PROFILE_TOKENS * widest * DTYPE_BYTES[dtype] * 2 + VLLM_MAX_SEQS * shape.vocab * 4


def vllm_need(shape: ModelShape, *, gpu_memory: int, utilization: float, tensor_parallel: int, dtype: str,
              max_model_len: int) -> Need:
    """One vLLM shard process: its claim is utilization × the GPU; the KV cache is what is left of it."""
    claim = int(utilization * gpu_memory)
    weights = -(-weight_bytes(shape, dtype) // tensor_parallel)
    activations = vllm_activation_bytes(shape, tensor_parallel, dtype)
    kv = claim - weights - activations - CUDA_CONTEXT_BYTES
    per_token = kv_bytes_per_token(shape, dtype, tensor_parallel)
    parts = (("weights (shard)", weights), ("profiling activations", activations), ("CUDA context", CUDA_CONTEXT_BYTES),
             ("KV cache", max(kv, 0)))
    tokens = max(kv, 0) // per_token
    note = f"KV cache holds {tokens:,} tokens ({tokens / max_model_len:.1f} sequences of max_model_len {max_model_len})"
    # the claim must hold one whole sequence of KV cache: the GPU must be at least need / utilization
    need = weights + activations + CUDA_CONTEXT_BYTES + per_token * max_model_len
    return Need(gpu_bytes=max(claim, int(need / utilization)), host_bytes=PROCESS_HOST_BYTES + weights, parts=parts,
                note=note)


def transformers_need(shape: ModelShape, *, dtype: str, sequences: int, context: int, on_gpu: bool,
                      prompts: int = 0) -> Need:
    """One transformers-engine actor: weights, a preallocated KV cache for one request group (all its prompts ×
    samples), the logits of one step in float32; with ``prompts`` (fewer than ``sequences``: the shared prefill),
    also the prompts' own cache, which lives until it has been repeated for their samples (counted at full
    context, an upper bound)."""
    weights = weight_bytes(shape, dtype)
    kv = sequences * context * kv_bytes_per_token(shape, dtype)
    logits = sequences * shape.vocab * 4
    parts = {"weights": weights, f"KV cache ({sequences} sequences × {context} tokens)": kv, "logits": logits}
    if 0 < prompts < sequences:
        parts[f"prompts' cache before it is repeated ({prompts} × {context} tokens)"] = \
            prompts * context * kv_bytes_per_token(shape, dtype)
    if on_gpu:
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    device = sum(parts.values())
    return Need(gpu_bytes=device if on_gpu else 0, host_bytes=PROCESS_HOST_BYTES + (0 if on_gpu else device),
                parts=tuple(parts.items()))


def merge_need(chunk_elements: int) -> Need:
    buffers = MERGE_BUFFERS * 4 * chunk_elements
    return Need(gpu_bytes=0, host_bytes=PROCESS_HOST_BYTES + buffers,
                parts=(("chunk buffers", buffers),), note=f"chunks of {chunk_elements:,} elements")


def importance_need(shape: ModelShape, *, batch: int, tokens: int, on_gpu: bool) -> Need:
    """The layer analysis: importance's float32 model, float32 gradients of the layer matrices, float32
    activations and logits of one batch; weight change's two float64 row blocks."""
    parts = {
        "weights (float32)": weight_bytes(shape, "float32"),
        "layer-matrix gradients (float32)": shape.layers * shape.layer_matrix_parameters() * 4,
        f"activations (b={batch}, s={tokens}, float32)": activation_bytes(shape, batch, tokens, "float32"),
        "logits and loss": logit_bytes(shape, batch, tokens),
        "weight-change row blocks": WEIGHT_CHANGE_BLOCK_BYTES,
    }
    if on_gpu:
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    device = sum(parts.values())
    return Need(gpu_bytes=device if on_gpu else 0, host_bytes=PROCESS_HOST_BYTES + (weight_bytes(shape, "float32")
                if on_gpu else device), parts=tuple(parts.items()))
