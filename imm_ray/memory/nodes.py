"""The node types a plan is checked against: a cluster.yaml's ``available_node_types``, or a live Ray cluster.

A cluster.yaml names instance types and, for most of them, leaves CPUs and GPUs to be detected (``resources:
{}``); :data:`INSTANCES` holds what the memory plan needs of the instance types used here (vCPUs, memory, GPUs
and the memory of one GPU, from the AWS instance type pages, https://aws.amazon.com/ec2/instance-types/). A
node type's own ``resources`` override the table (the head's ``CPU: 0``). A live cluster's nodes come from
``ray.nodes()``: CPUs, GPUs and Ray's ``memory`` resource (the heap Ray schedules, object store excluded); the
memory of one GPU from Ray's accelerator type (``A100-40G`` ...), unknown for a type not in :data:`GPU_MEMORY`.

Ray 2.60 has no public API for the autoscaler's node types: ``ray._private.state.state
.get_max_resources_from_cluster_config()`` (what Ray Train v2 and Ray Data call) and ``ray.autoscaler.v2.sdk``
(GCS-address based, not annotated public) are internal; ``ray.autoscaler.sdk`` (DeveloperAPI) only requests
resources. The public source is the cluster config itself: the cluster.yaml a user passes, or, on the head node
of a ``ray up`` cluster, the file the autoscaler was started with (cluster.yaml's ``--autoscaling-config=
~/ray_bootstrap_config.yaml``), which :func:`autoscaler_node_types` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from imm_ray.config import ConfigError

GIB = 2**30
# Ray's object store takes this share of a node's memory by default, at most OBJECT_STORE_CAP bytes
# (ray._private.ray_constants DEFAULT_OBJECT_STORE_MEMORY_PROPORTION 0.3, DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES
# 200e9); what is left is the heap the stages' processes share.
OBJECT_STORE_SHARE = 0.3
OBJECT_STORE_CAP = 200 * 10**9
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"
CLUSTER_CONFIG_ENV = "IMM_RAY_CLUSTER_CONFIG"


class Instance(BaseModel):
    model_config = ConfigDict(frozen=True)

    cpus: int
    memory_gib: float
    gpus: int = 0
    gpu_memory_gib: float = 0


INSTANCES: dict[str, Instance] = {
    "m5.2xlarge": Instance(cpus=8, memory_gib=32),
    "m5.4xlarge": Instance(cpus=16, memory_gib=64),
    "p4d.24xlarge": Instance(cpus=96, memory_gib=1152, gpus=8, gpu_memory_gib=40),  # 8x A100-SXM4-40GB
    "p4de.24xlarge": Instance(cpus=96, memory_gib=1152, gpus=8, gpu_memory_gib=80),  # 8x A100 80GB
    "p5.48xlarge": Instance(cpus=192, memory_gib=2048, gpus=8, gpu_memory_gib=80),  # 8x H100 80GB
    "g5.12xlarge": Instance(cpus=48, memory_gib=192, gpus=4, gpu_memory_gib=24),  # 4x A10G
    "g5.48xlarge": Instance(cpus=192, memory_gib=768, gpus=8, gpu_memory_gib=24),
    "g6e.12xlarge": Instance(cpus=48, memory_gib=384, gpus=4, gpu_memory_gib=48),  # 4x L40S
}
# Memory of one GPU by Ray's accelerator type (ray.util.accelerators names, as ray.nodes() reports them).
GPU_MEMORY_GIB = {"A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "A10G": 24, "L4": 24, "L40S": 48,
                  "T4": 16, "V100": 16}


class NodeType(BaseModel):
    """What one node of a type offers, and how many of it the cluster may have."""

    model_config = ConfigDict(frozen=True)

    name: str
    cpus: float
    gpus: float
    memory_bytes: int  # the heap Ray's processes share (object store excluded)
    gpu_memory_bytes: int | None  # of one GPU; None: unknown
    count: int  # the most nodes of this type


def heap_bytes(memory_bytes: float) -> int:
    """A node's memory less Ray's default object store."""
    return int(memory_bytes - min(OBJECT_STORE_SHARE * memory_bytes, OBJECT_STORE_CAP))


def cluster_yaml_node_types(path: str | Path) -> list[NodeType]:
    """The node types of a Ray cluster-launcher YAML, with the most nodes of each (the head: one)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--cluster: {file} not found")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--cluster: {file} is not valid YAML ({error})") from None
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"--cluster: {file} has no available_node_types")
    head = config.get("head_node_type")
    return [_node_type(name, spec or {}, name == head, config.get("max_workers"), file)
            for name, spec in types.items()]


def _node_type(name: str, spec: dict[str, Any], is_head: bool, cluster_max: int | None, file: Path) -> NodeType:
    resources = spec.get("resources") or {}
    instance_type = (spec.get("node_config") or {}).get("InstanceType")
    instance = INSTANCES.get(instance_type) if instance_type else None
    if instance is None and ("CPU" not in resources or "memory" not in resources):
        raise ConfigError(
            f"--cluster: {file}: node type {name} uses instance type {instance_type!r}, which the memory plan does not "
            f"know (imm_ray/memory/nodes.py INSTANCES: {', '.join(sorted(INSTANCES))}); give its resources "
            "(CPU, GPU, memory in bytes) in the node type"
        )
    count = 1 if is_head else int(spec.get("max_workers", cluster_max or 0))
    gpus = float(resources.get("GPU", instance.gpus if instance else 0))
    memory = float(resources["memory"]) if "memory" in resources else heap_bytes(instance.memory_gib * GIB)
    gpu_memory = int(instance.gpu_memory_gib * GIB) if instance and instance.gpus else None
    label = f"{name} ({instance_type})" if instance_type else name
    return NodeType(name=label, cpus=float(resources.get("CPU", instance.cpus if instance else 0)), gpus=gpus,
                    memory_bytes=int(memory), gpu_memory_bytes=gpu_memory if gpus else None, count=count)


def live_node_types() -> list[NodeType]:
    """The alive nodes of the Ray cluster this process is connected to, grouped by what they offer."""
    import ray

    groups: dict[tuple, int] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        accelerator = next((key.split(":", 1)[1] for key in res if key.startswith("accelerator_type:")), None)
        key = (res.get("CPU", 0.0), res.get("GPU", 0.0), int(res.get("memory", 0)), accelerator)
        groups[key] = groups.get(key, 0) + 1
    types = []
    for (cpus, gpus, memory, accelerator), count in sorted(groups.items(), key=lambda item: str(item[0])):
        gib = GPU_MEMORY_GIB.get(accelerator or "")
        name = f"live: {cpus:g} CPU, {gpus:g} GPU" + (f" ({accelerator})" if accelerator else "")
        types.append(NodeType(name=name, cpus=cpus, gpus=gpus, memory_bytes=memory,
                              gpu_memory_bytes=int(gib * GIB) if gib and gpus else None, count=count))
    return types


def autoscaler_node_types() -> list[NodeType]:
    """The node types the autoscaler may start: the cluster config named by IMM_RAY_CLUSTER_CONFIG, or the one
    ``ray up`` left on the head node; none where neither exists (a cluster without an autoscaler)."""
    named = os.environ.get(CLUSTER_CONFIG_ENV)
    path = Path(named) if named else BOOTSTRAP_CONFIG
    return cluster_yaml_node_types(path) if path.is_file() else []
