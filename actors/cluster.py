"""Connecting to Ray: the cluster RAY_ADDRESS names, one already initialised, or a local one started here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Quiet the per-actor start-up chatter of transformers and tokenizers; Ray's own progress bars stay.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Use the running Ray (or the cluster at RAY_ADDRESS); start a local cluster otherwise and stop it after."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": WORKER_ENV}, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
