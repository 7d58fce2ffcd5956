"""Where the layer analysis runs and with what: one Ray task per analysed model (actors/analysis.py).

The same rule sizes the task in the memory plan (imm_ray/memory/plan.py) and declares it in the loop's Analyze and
Importance stages (imm_ray/steps.py), whose fingerprints include it: the device and the batch change float sums.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imm_ray.config import ExperimentConfig

# The importance's batch: 8 pairs on the CPU (the analysis' default); 1 on a GPU, where float32 activations and
# logits of 8 long pairs of a 150k-vocabulary model would take more than the model itself (imm-ray plan).
CPU_BATCH = 8
GPU_BATCH = 1


class AnalysisResources(BaseModel):
    """What an analysis task asks Ray for and how it computes: ``device`` cuda takes one GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    cpus: float = Field(1, gt=0)
    batch_size: int = Field(CPU_BATCH, ge=1)


def analysis_resources(config: ExperimentConfig) -> AnalysisResources:
    """eval.analysis_device (auto: a GPU when resources.use_gpu), with eval.analysis_cpus CPUs (default: those of
    one SFT worker)."""
    device = config.eval.analysis_device
    on_gpu = device == "cuda" or (device == "auto" and config.resources.use_gpu)
    cpus = config.eval.analysis_cpus or config.resources.cpus_per_sft_worker
    return AnalysisResources(device="cuda" if on_gpu else "cpu", cpus=cpus,
                             batch_size=GPU_BATCH if on_gpu else CPU_BATCH)
