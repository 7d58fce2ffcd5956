"""The generation actor's Ray resources: one GPU engine holds its GPU; a tensor-parallel engine gets a placement
group of one GPU bundle per rank on one node, capturing the TP workers vLLM starts (as ray.data.llm does).

No GPU here: the placement group is created and inspected, never scheduled (it stays pending on a CPU cluster)."""

from __future__ import annotations

import pytest
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generation import PoolSpec, actor_remote_args


def test_cpu_and_single_gpu_actors_hold_their_own_resources():
    assert actor_remote_args(PoolSpec(cpus_per_actor=2)) == {"num_cpus": 2}
    assert actor_remote_args(PoolSpec(cpus_per_actor=4, gpus_per_actor=1)) == {"num_cpus": 4, "num_gpus": 1}
    assert actor_remote_args(PoolSpec(cpus_per_actor=2), tensor_parallel=2) == {"num_cpus": 2}  # CPU: no TP


def test_tensor_parallel_two_gets_a_strict_pack_group_of_two_gpu_bundles(ray_cluster):
    args = actor_remote_args(PoolSpec(cpus_per_actor=4, gpus_per_actor=2), tensor_parallel=2)
    assert args["num_gpus"] == 0 and args["num_cpus"] == 2  # the actor sits in bundle 0's CPUs, vLLM's ranks on GPUs
    first, second = args["ray_remote_args_fn"](), args["ray_remote_args_fn"]()  # one group per actor started
    try:
        strategy = first["scheduling_strategy"]
        assert isinstance(strategy, PlacementGroupSchedulingStrategy)
        assert strategy.placement_group_capture_child_tasks
        assert strategy.placement_group.bundle_specs == [{"CPU": 2.0, "GPU": 1.0}] * 2
        table = ray.util.placement_group_table(strategy.placement_group)
        assert table["strategy"] == "STRICT_PACK"
        assert second["scheduling_strategy"].placement_group.id != strategy.placement_group.id
    finally:
        for made in (first, second):
            ray.util.remove_placement_group(made["scheduling_strategy"].placement_group)


def test_gpus_per_actor_must_match_the_tensor_parallel_size():
    message = r"gpus_per_generation_actor \(1\) must equal generation.tensor_parallel_size \(2\)"
    with pytest.raises(ValueError, match=message):
        actor_remote_args(PoolSpec(gpus_per_actor=1), tensor_parallel=2)
