"""Shared fixtures: one local Ray cluster for the whole session, and a tiny random model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_model.py

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by every test that needs one (starting Ray costs ~3 s)."""
    import ray

    from actors.cluster import WORKER_ENV  # the production workers' environment (DeepSpeed's prebuilt ops too)

    if not ray.is_initialized():
        env = {**WORKER_ENV, "HF_HUB_OFFLINE": "1"}
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
    yield ray
    # left running for later tests; pytest's exit shuts it down


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
