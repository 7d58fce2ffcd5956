"""The layer analysis as Ray tasks: a model is loaded in the task's own process, on the resources it asks for,
never in the driver, which schedules the task and reads back two small per-layer tables.

One task per analysed model computes both of the paper's figures: ΔW^n against the base (streamed row block by
row block through ``safe_open``, no model in memory) and the importance I^n (the model once, float32, with the
gradients of its layer matrices). The task runs the same functions as ``imm-ray analyze``
(:mod:`imm_ray.analysis`) with the same arguments, so its tables equal the in-process ones (tested on the toy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pandas as pd

from imm_ray.analysis_resources import AnalysisResources


def _task_options(resources: AnalysisResources) -> dict[str, float]:
    return {"num_cpus": resources.cpus, "num_gpus": 1 if resources.device == "cuda" else 0}


@contextlib.contextmanager
def _threads(resources: AnalysisResources) -> Iterator[None]:
    """torch threads for the CPUs Ray gave the task, no more; restored after, as the task's worker process is kept
    and runs the next stages' generation tasks on their own thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(resources.cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _analyze(base: str, model: str, pairs: Sequence[tuple[str, str]],
             resources: AnalysisResources) -> tuple[pd.DataFrame, pd.DataFrame]:
    from imm_ray.analysis import weight_change

    with _threads(resources):
        return weight_change(base, model), _importance(model, pairs, resources)


def _importance(model: str, pairs: Sequence[tuple[str, str]], resources: AnalysisResources) -> pd.DataFrame:
    from imm_ray.analysis import layer_importance

    with _threads(resources):
        return layer_importance(model, list(pairs), batch_size=resources.batch_size, device=resources.device,
                                progress=False)


def analyze_model(base: str, model: str, pairs: Sequence[tuple[str, str]],
                  resources: AnalysisResources) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(weight change vs ``base``, importance) of ``model``, computed in one Ray task."""
    return _remote(_analyze, resources, base, model, tuple(pairs), resources)


def model_importance(model: str, pairs: Sequence[tuple[str, str]], resources: AnalysisResources) -> pd.DataFrame:
    """The layer importance of ``model``, computed in a Ray task."""
    return _remote(_importance, resources, model, tuple(pairs), resources)


def _remote(function, resources: AnalysisResources, *args):
    """Run ``function(*args)`` as a Ray task with ``resources`` on the running Ray (or a local one started for it);
    an analysis error raised in the task reaches the caller as itself."""
    import ray

    from actors.cluster import ray_session
    from imm_ray.analysis import AnalysisError

    with ray_session():
        # retried on a lost node (the task only reads), never on an analysis error
        task = ray.remote(function).options(**_task_options(resources))
        try:
            return ray.get(task.remote(*args))
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, AnalysisError):
                raise error.cause from None
            raise
