"""The merge actor pool: Ray actors share the merge of one model pair, balanced by bytes.

The driver (the caller of :func:`merge_models`) validates the inputs, plans the output shards and writes their
headers into a temporary folder next to ``--out``; each actor, holding the plan, takes batches of tensor element
ranges, merges them chunk by chunk and writes the bytes in place (``imm_ray.merge.engine``). The driver then writes
``model.safetensors.index.json``, copies config and tokenizer files, writes the merge record and renames the folder
to ``--out``. Any error removes the temporary folder and leaves an existing ``--out`` untouched. Across nodes the
actors need the inputs and ``--out`` on storage they all share (the same paths).

Where the batches run (``backend``): on Ray merge actors when Ray is running in this process or a cluster is
addressed (``RAY_ADDRESS``), as in the iteration loop and on a cluster; otherwise (``imm-ray merge`` on a machine
with no cluster) in plain local processes (``workers`` of them, one torch thread each; one worker runs in this
process), since a local Ray started only for one merge would run on the same CPUs and add its start and stop
(~8 s of a 0.5B merge's 11 s). Both run the same engine code (``imm_ray.merge.engine.run_batch``) on the same
plan and batches, and every range's bytes depend only on the plan, so the files are the same bytes whatever the
backend and the worker count.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Literal

import ray

from actors.cluster import ray_session
from imm_ray.merge import plan as planning
from imm_ray.merge.errors import MergeError
from imm_ray.merge.options import MergeOptions
from imm_ray.merge.record import MergeRecord
from imm_ray.progress import ProgressFn, Tick
from imm_ray.merge.tensors import (
    INDEX_NAME,
    OUTPUT_DTYPES,
    check_output,
    copy_aux_files,
    create_shards,
    staged_folder,
)

IN_FLIGHT_PER_WORKER = 2  # a second batch queued per actor hides the round trip to the driver


@ray.remote(num_cpus=1)
class MergeWorker:
    """One merge worker: a single torch thread per CPU it holds, the plan received once.

    torch is imported here, in the worker, and not at module level: the driver plans from headers alone and never
    needs it (it would cost the driver a second or more and a few hundred MiB).
    """

    def __init__(self, plan: planning.MergePlan) -> None:
        import torch

        from imm_ray.merge import engine

        torch.set_num_threads(1)
        self._plan = plan
        self._run_batch = engine.run_batch

    def run(self, batch: tuple[planning.WorkUnit, ...]) -> int:
        return self._run_batch(self._plan, batch)


Backend = Literal["auto", "ray", "local"]


def choose_backend(requested: Backend = "auto") -> Literal["ray", "local"]:
    """auto: Ray when it is initialised here or ``RAY_ADDRESS`` names a cluster, local processes otherwise."""
    if requested != "auto":
        return requested
    return "ray" if ray.is_initialized() or os.environ.get("RAY_ADDRESS") else "local"


def merge_models(options: MergeOptions, backend: Backend = "auto", progress: ProgressFn | None = None) -> MergeRecord:
    """Merge as ``options`` say and return the record; the finished HF model folder is at ``options.out``.

    ``backend`` (see the module docstring): "ray" reuses a running Ray (``ray.is_initialized()``), else starts
    one (``RAY_ADDRESS`` if set, else a local one); "local" runs the batches here or in local processes; "auto"
    takes Ray only where it is running or addressed. Raises :class:`MergeError` for bad inputs, before any output
    exists. ``progress`` (optional) is told the tensors finished so far.
    """
    started = time.perf_counter()
    check_output(options.out, options.overwrite)
    inputs = planning.open_inputs(options)
    where = choose_backend(backend)
    with ray_session() if where == "ray" else contextlib.nullcontext(), \
            staged_folder(options.out, options.overwrite) as folder:
        plan = planning.plan_merge(options, inputs, folder)
        batches = planning.work_batches(plan)
        fingerprints_of = lambda: planning.input_fingerprints(inputs)  # noqa: E731
        count = TensorCount(batches, progress)
        if where == "local":
            workers = max(1, min(options.workers or _local_cpus(), len(batches)))
            create_shards(plan.shards, folder)
            fingerprints = _run_local(plan, batches, workers, fingerprints_of, count)
        else:
            workers, cpus = _pool_size(options.workers, len(batches))
            pool = [MergeWorker.options(num_cpus=cpus).remote(plan) for _ in range(workers)]
            try:
                create_shards(plan.shards, folder)
                fingerprints = _run(pool, batches, fingerprints_of, count)
            finally:
                for actor in pool:
                    ray.kill(actor)
        (folder / INDEX_NAME).write_text(json.dumps(plan.shards.index(), indent=2) + "\n")
        copy_aux_files(inputs.base.root, folder, None if options.dtype == "auto" else OUTPUT_DTYPES[options.dtype])
        record = planning.merge_record(options, inputs, plan, workers, fingerprints, time.perf_counter() - started)
        record.write(folder)
    return record


class TensorCount:
    """Tells ``progress`` how many tensors are finished: a tensor is done when every range of it is written (a
    batch that a lost actor leaves unfinished counts once, when it is redone)."""

    def __init__(self, batches: list[tuple[planning.WorkUnit, ...]], progress: ProgressFn | None) -> None:
        self.left = Counter(unit.name for batch in batches for unit in batch)
        self.total, self.done, self.progress = len(self.left), 0, progress
        if progress is not None:
            progress(Tick(0, self.total, "tensors"))

    def finished(self, batch: tuple[planning.WorkUnit, ...]) -> None:
        for unit in batch:
            self.left[unit.name] -= 1
            if self.left[unit.name] == 0:
                self.done += 1
        if self.progress is not None:
            self.progress(Tick(self.done, self.total, "tensors"))


def _pool_size(requested: int | None, batches: int) -> tuple[int, float]:
    """Actors and CPUs per actor: one CPU each, unless more actors were asked for than the cluster has CPUs,
    in which case they share them (otherwise the extra actors would wait forever for a CPU)."""
    total = ray.cluster_resources().get("CPU", 1.0)
    workers = max(1, min(requested or int(total), batches))
    return workers, min(1.0, total / workers)


def _run(
    pool: list[ray.actor.ActorHandle],
    batches: list[tuple[planning.WorkUnit, ...]],
    meanwhile: Callable[[], dict[str, str]],
    count: TensorCount,
) -> dict[str, str]:
    """Feed batches to the actors as they free up; run ``meanwhile`` on the driver while they work.

    An actor that dies (its process or its node lost) leaves the pool and its batches go back to the queue for the
    others: a range's bytes depend only on the plan, so a range it half wrote is overwritten with the same bytes.
    The merge fails only when no actor is left."""
    queue = deque(batches)
    pending: dict[ray.ObjectRef, tuple[ray.actor.ActorHandle, tuple[planning.WorkUnit, ...]]] = {}
    alive = list(pool)

    def fill(actor: ray.actor.ActorHandle) -> None:
        while queue and sum(1 for a, _ in pending.values() if a == actor) < IN_FLIGHT_PER_WORKER:
            batch = queue.popleft()
            pending[actor.run.remote(batch)] = (actor, batch)

    for actor in pool:
        fill(actor)
    result = meanwhile()
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        actor, batch = pending.pop(done)
        try:
            ray.get(done)
        except ray.exceptions.RayActorError:
            if actor in alive:
                alive.remove(actor)
            if not alive:
                raise
            queue.appendleft(batch)
            for survivor in alive:
                fill(survivor)
            continue
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, MergeError):  # a user error found by a worker: its message, no Ray trace
                raise error.cause from None
            raise
        count.finished(batch)
        fill(actor)
    return result


# ------------------------------------------------------------------------------------------ local processes


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_LOCAL_PLAN: planning.MergePlan | None = None


def _local_init(plan: planning.MergePlan) -> None:
    """A local worker process: one torch thread, the plan received once (as a Ray merge actor does)."""
    global _LOCAL_PLAN
    import torch

    torch.set_num_threads(1)
    _LOCAL_PLAN = plan


def _local_batch(batch: tuple[planning.WorkUnit, ...]) -> int:
    from imm_ray.merge import engine

    assert _LOCAL_PLAN is not None
    return engine.run_batch(_LOCAL_PLAN, batch)


def _run_local(
    plan: planning.MergePlan,
    batches: list[tuple[planning.WorkUnit, ...]],
    workers: int,
    meanwhile: Callable[[], dict[str, str]],
    count: TensorCount,
) -> dict[str, str]:
    """Run every batch with ``workers`` processes (one: in this process, after ``meanwhile``).

    Processes are forked where this process has not loaded torch (the CLI: it plans from headers alone), so they
    start without re-importing the project; a process that has loaded torch (and maybe its OpenMP pool, which does
    not survive a fork) spawns them instead."""
    if workers == 1:
        result = meanwhile()
        from imm_ray.merge import engine

        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for batch in batches:
                engine.run_batch(plan, batch)
                count.finished(batch)
        finally:
            torch.set_num_threads(threads)
        return result
    import multiprocessing

    method = "spawn" if "torch" in sys.modules or sys.platform != "linux" else "fork"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_local_init, initargs=(plan,)) as pool:
        pending = {pool.submit(_local_batch, batch): batch for batch in batches}
        result = meanwhile()
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a worker's MergeError arrives here as itself
                    count.finished(pending.pop(future))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return result
