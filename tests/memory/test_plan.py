"""The memory plan against node types: the paper configs fit cluster.yaml; what cannot fit is refused naming the
stage and the shortfall."""

from __future__ import annotations

from pathlib import Path

import pytest

from imm_ray.config import load_config
from imm_ray.memory.nodes import cluster_yaml_node_types, heap_bytes
from imm_ray.memory.plan import MemoryPlanError, check_plan, gpu_memory_of, memory_plan

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
               if p.name.startswith(("qwen2.5-", "llama2-7b-", "distill-")))


def plan_of(config: str, overrides: list[str], cluster: Path):
    nodes = cluster_yaml_node_types(cluster)
    cfg = load_config(ROOT / "configs" / config, overrides)
    return memory_plan(cfg, gpu_memory_of(nodes)), nodes


def cluster_file(tmp_path: Path, instance: str, count: int = 1) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "max_workers: 4\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 0}, node_config: {InstanceType: m5.2xlarge}}\n"
        f"  gpu: {{max_workers: {count}, resources: {{}}, node_config: {{InstanceType: {instance}}}}}\n"
    )
    return path


def test_cluster_yaml_node_types():
    head, gpu = cluster_yaml_node_types(ROOT / "cluster.yaml")
    assert (head.cpus, head.gpus, head.count) == (0, 0, 1)
    assert (gpu.cpus, gpu.gpus, gpu.count, gpu.gpu_memory_bytes) == (96, 8, 2, 40 * 2**30)
    assert gpu.memory_bytes == heap_bytes(1152 * 2**30)  # less Ray's object store (capped at 200 GB)


@pytest.mark.parametrize("config", PAPER)
def test_every_paper_config_fits_cluster_yaml(config):
    plan, nodes = plan_of(config, [], ROOT / "cluster.yaml")
    check_plan(plan, nodes)
    assert {s.kind for s in plan.stages} >= {"generate", "sft", "merge", "eval", "analysis"}


def test_distillation_generates_with_the_teacher():
    plan, _ = plan_of("distill-qwen2.5-7b-to-1.5b.yaml", [], ROOT / "cluster.yaml")
    assert plan.row("generate", "teacher").model == "Qwen2.5-7B-Instruct"
    assert plan.row("generate", "student").model == "Qwen2.5-1.5B-Instruct"
    assert plan.row("eval").model == "Qwen2.5-1.5B-Instruct"


def test_a_7b_vllm_shard_on_a_24gb_gpu_is_refused_naming_stage_and_shortfall(tmp_path):
    """13.5 GB of weights, vLLM's profiling activations and one 4,096-token sequence of KV cache (2 GiB) need
    more than 0.6 x 24 GiB."""
    plan, nodes = plan_of("llama2-7b-gsm8k.yaml", ["generation.tensor_parallel_size=1",
                                                     "resources.gpus_per_generation_actor=1",
                                                     "generation.gpu_memory_utilization=0.6"],
                          cluster_file(tmp_path, "g5.12xlarge"))
    with pytest.raises(MemoryPlanError) as error:
        check_plan(plan, nodes)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("memory plan: stage generate (Llama-2-7b-hf)")
    assert "GPU memory short by" in message and "24.0 GiB there" in message


def test_too_few_gpus_for_the_sft_workers_is_refused(tmp_path):
    plan, nodes = plan_of("qwen2.5-0.5b-gsm8k.yaml", ["resources.sft_workers=32"], ROOT / "cluster.yaml")
    with pytest.raises(MemoryPlanError, match=r"stage sft \(Qwen2.5-0.5B-Instruct\).* needs 32 processes at once, "
                                              r"the node types hold at most 16: short by 16"):
        check_plan(plan, nodes)


def test_zero3_fits_where_zero1_does_not(tmp_path):
    """Llama-2-7B's 16 bytes per parameter: ZeRO-1 keeps 4 of them whole on each worker (27 GB) plus activations,
    more than an A100 40 GB; ZeRO-3 divides all 16 by the 8 workers."""
    cluster = ROOT / "cluster.yaml"
    plan, nodes = plan_of("llama2-7b-gsm8k.yaml", ["sft.zero_stage=1"], cluster)
    with pytest.raises(MemoryPlanError, match=r"stage sft \(Llama-2-7b-hf\).*GPU memory short by"):
        check_plan(plan, nodes)
    plan, nodes = plan_of("llama2-7b-gsm8k.yaml", [], cluster)
    check_plan(plan, nodes)
