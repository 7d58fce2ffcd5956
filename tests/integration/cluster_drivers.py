"""Drivers the multi-node tests run as their own processes (`python tests/integration/cluster_drivers.py KIND ARGS`),
connected to a test cluster by RAY_ADDRESS as any driver on a cluster is: the pytest process may already hold a
Ray of its own (the session's local cluster), and a driver process is what a job's entrypoint is.

    merge   OPTIONS_JSON RECORD_JSON    actors.merging.merge_models on the Ray backend; writes the merge record
    generate SPEC_JSON SAMPLES_PARQUET  actors.generation.generate_samples through Ray Data
    sft     JOB_JSON LOG_JSON           actors.training.run_sft; writes the training log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def merge(options_json: str, record_json: str) -> None:
    from actors.merging import merge_models
    from imm_ray.merge.options import MergeOptions

    record = merge_models(MergeOptions.model_validate_json(Path(options_json).read_text()), backend="ray")
    Path(record_json).write_text(record.model_dump_json())


def generate(spec_json: str, samples_parquet: str) -> None:
    from actors.engines import EngineSpec
    from actors.generation import PoolSpec, SamplingPlan, generate_samples
    from imm_ray.data.records import Problem

    spec = json.loads(Path(spec_json).read_text())
    problems = [Problem.model_validate(p) for p in spec["problems"]]
    frame = generate_samples(problems, spec["prompts"], EngineSpec.model_validate(spec["engine"]),
                             SamplingPlan(**spec["plan"]), PoolSpec(**spec["pool"]))
    frame.to_parquet(samples_parquet)


def sft(job_json: str, log_json: str) -> None:
    from actors.training import SFTJob, run_sft

    log = run_sft(SFTJob.model_validate_json(Path(job_json).read_text()))
    Path(log_json).write_text(json.dumps(log))


if __name__ == "__main__":
    from actors.cluster import ray_session

    kind, *args = sys.argv[1:]
    with ray_session():
        {"merge": merge, "generate": generate, "sft": sft}[kind](*args)
