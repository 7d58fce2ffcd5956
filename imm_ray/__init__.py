"""imm-ray: Iterative Model Merging for self-improving LLM reasoners, on Ray."""

__version__ = "0.1.0"
