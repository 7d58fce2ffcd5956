"""The paper's setups in configs/ and the AWS cluster they are sized for (cluster.yaml).

Each config must validate, carry the paper's values, build the SFT job and DeepSpeed JSON the loop would build, and
fit the GPU worker group of cluster.yaml (GPUs, CPUs and, roughly, GPU memory). Nothing is downloaded: model sizes
come from the models' cards, and cluster.yaml is checked with the Ray cluster launcher's own schema.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from actors.sft.job import SFTJob, deepspeed_config
from imm_ray.config import ExperimentConfig, SFTSection, load_config

ROOT = Path(__file__).resolve().parents[1]
OOD_SETS = ("mawps", "svamp", "asdiv", "sat_math", "mathqa", "mmlu_stem")
SHARED_MOUNT = "/mnt/efs"
GIB = 2**30


@dataclass(frozen=True)
class Setup:
    model: str
    train_set: str
    k: int
    chat_template: bool
    teacher: str | None = None


PAPER_CONFIGS = {
    "qwen2.5-0.5b-gsm8k.yaml": Setup("Qwen/Qwen2.5-0.5B-Instruct", "gsm8k", 3, True),
    "qwen2.5-0.5b-math.yaml": Setup("Qwen/Qwen2.5-0.5B-Instruct", "math", 6, True),
    "qwen2.5-1.5b-gsm8k.yaml": Setup("Qwen/Qwen2.5-1.5B-Instruct", "gsm8k", 3, True),
    "qwen2.5-1.5b-math.yaml": Setup("Qwen/Qwen2.5-1.5B-Instruct", "math", 6, True),
    "llama2-7b-gsm8k.yaml": Setup("meta-llama/Llama-2-7b-hf", "gsm8k", 3, False),
    "llama2-7b-math.yaml": Setup("meta-llama/Llama-2-7b-hf", "math", 6, False),
    "distill-qwen2.5-7b-to-1.5b.yaml": Setup("Qwen/Qwen2.5-1.5B-Instruct", "gsm8k", 3, True,
                                             teacher="Qwen/Qwen2.5-7B-Instruct"),
}
PARAMETERS = {  # from the model cards
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "meta-llama/Llama-2-7b-hf": 6.74e9,
}


@dataclass(frozen=True)
class Instance:
    gpus: int
    cpus: int
    gpu_memory_gib: float


INSTANCES = {"p4d.24xlarge": Instance(gpus=8, cpus=96, gpu_memory_gib=40)}  # 8x A100 40 GB


@pytest.fixture(scope="module")
def cluster() -> dict:
    """cluster.yaml as `ray up` sees it: filled out with the AWS defaults and checked against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    return config


def _worker_type(cluster: dict) -> dict:
    """cluster.yaml's one worker node type (every type but the head's)."""
    head = cluster["head_node_type"]
    [node] = [node for name, node in cluster["available_node_types"].items() if name != head]
    return node


def _gpu_group(cluster: dict) -> tuple[Instance, int]:
    """The GPU worker instance of cluster.yaml and the most nodes of it the autoscaler may start."""
    node = _worker_type(cluster)
    return INSTANCES[node["node_config"]["InstanceType"]], min(node["max_workers"], cluster["max_workers"])


def test_cluster_has_a_cpu_head_and_an_autoscaling_gpu_group(cluster):
    assert cluster["provider"]["type"] == "aws"
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["node_config"]["InstanceType"].startswith("m5.")
    assert "--num-cpus=0" in " ".join(cluster["head_start_ray_commands"])
    instance, nodes = _gpu_group(cluster)
    assert _worker_type(cluster)["min_workers"] == 0 and nodes >= 1 and instance.gpus == 8


def test_cluster_dashboard_is_reachable_only_through_ssh(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    # No inbound rule of our own: Ray's group lets in SSH and the cluster's own nodes, nothing else.
    assert cluster["provider"]["security_group"].get("IpPermissions", []) == []
    for node in cluster["available_node_types"].values():
        assert "SecurityGroupIds" not in node["node_config"]


def test_cluster_installs_the_project_and_mounts_shared_storage(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert cluster["file_mounts"] == {"~/imm-ray": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert ".gitignore" in cluster["rsync_filter"]
    assert "torch==2.13.0" in setup and '-e "$HOME/imm-ray[dev,vllm]"' in setup
    # every package installed by name is pinned: the project's extras pin vLLM and Ray (with its job server)
    installs = [word for command in cluster["setup_commands"] if "uv pip install" in command
                for part in command.split("uv pip install")[1:] for word in part.split("&&")[0].split()
                if not word.startswith(("-", "https://", '"$HOME'))]
    assert all("==" in word for word in installs if word not in ("setuptools", "wheel", "boto3")), installs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["vllm"] == ["vllm==0.32.0"]
    assert "ray[default,train,data,tune]==2.60.0" in project["dependencies"]
    starts = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2  # token authentication on every node
    assert "mount -t nfs4" in setup and f":/ {SHARED_MOUNT})" in setup
    assert f"HF_HOME={SHARED_MOUNT}/" in setup  # a model the driver downloads is at the same path on the workers


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_has_the_papers_settings(name):
    setup = PAPER_CONFIGS[name]
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.path == cfg.model.resolved_path() == setup.model  # a hub id, fetched by the run
    assert cfg.model.resolved_teacher() == setup.teacher
    assert ("distillation" in cfg.experiment.strategies) == (setup.teacher is not None)
    assert "imm" in cfg.experiment.strategies
    assert cfg.data.train_set == setup.train_set and cfg.data.eval_sets == (setup.train_set, *OOD_SETS)
    assert cfg.data.train_limit is None and cfg.data.eval_limit is None
    assert cfg.generation.num_shots == 10 and cfg.eval.num_shots == 0  # exemplars steer sampling; eval is zero-shot
    assert cfg.data.chat_template == setup.chat_template
    generation = cfg.generation
    assert generation.engine == "vllm" and generation.samples_per_question == setup.k
    assert generation.temperatures == (0.2, 0.4, 0.6)
    assert cfg.merge.alpha == 0.5
    paper = SFTSection().model_dump(exclude={"max_length"})
    assert cfg.sft.model_dump(exclude={"max_length"}) == paper
    assert cfg.experiment.output_dir.startswith(f"{SHARED_MOUNT}/")


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_builds_the_zero3_job_the_loop_runs(name):
    cfg = load_config(ROOT / "configs" / name)
    job = _sft_job(cfg)
    expected = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    assert deepspeed_config(job) == expected
    assert job.use_gpu and job.num_workers == 8 and job.max_failures >= 1 and job.checkpoints


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_fits_the_gpu_group(name, cluster):
    cfg = load_config(ROOT / "configs" / name)
    res, generation = cfg.resources, cfg.generation
    instance, nodes = _gpu_group(cluster)

    # Generation: each vLLM actor holds its tensor-parallel GPUs on one node; all actors fit the group.
    assert res.gpus_per_generation_actor == generation.tensor_parallel_size <= instance.gpus
    per_node = instance.gpus // generation.tensor_parallel_size
    assert res.generation_actors <= per_node * nodes
    assert min(res.generation_actors, per_node) * res.cpus_per_generation_actor <= instance.cpus

    # SFT: one GPU per Ray Train worker, the workers of a node within its CPUs.
    assert res.use_gpu and res.sft_workers <= instance.gpus * nodes
    assert min(res.sft_workers, instance.gpus) * res.cpus_per_sft_worker <= instance.cpus
    assert res.merge_workers <= instance.cpus * nodes

    # Memory, roughly. ZeRO-3 with bf16 and AdamW keeps 16 bytes a parameter (bf16 weight and gradient, fp32
    # master, two fp32 moments) split over the workers: at most half a GPU, the rest for activations. vLLM's bf16
    # weights, split by tensor parallelism: at most half of its share of the GPU, the rest for the KV cache.
    gpu = instance.gpu_memory_gib * GIB
    assert 16 * PARAMETERS[cfg.model.path] / res.sft_workers <= 0.5 * gpu
    largest = max(PARAMETERS[m] for m in (cfg.model.path, cfg.model.teacher) if m is not None)
    assert 2 * largest / generation.tensor_parallel_size <= 0.5 * generation.gpu_memory_utilization * gpu


def _sft_job(cfg: ExperimentConfig) -> SFTJob:
    """The SFT job as imm_ray/steps.py's FineTune builds it from a config."""
    res = cfg.resources
    return SFTJob(
        model_path=cfg.model.resolved_path(), data_path="pairs.parquet", output_dir="sft", storage_path="ray",
        seed=cfg.experiment.seed, trust_remote_code=cfg.model.trust_remote_code, num_workers=res.sft_workers,
        min_workers=res.sft_min_workers, cpus_per_worker=res.cpus_per_sft_worker, use_gpu=res.use_gpu,
        max_failures=res.sft_max_failures, **cfg.sft.model_dump(),
    )
