"""A worker node lost mid-stage on a real two-node Ray cluster (tests/integration/cluster_nodes.py): the stage
finishes on the node that is left and its output equals an undisturbed run's.

- Merge (actors.merging, Ray backend): one merge actor per node; the worker node's raylet group is killed while the
  actors write. The survivor redoes the lost actor's batches (a range's bytes depend only on the plan) and the
  files are byte for byte those of the undisturbed merge.
- Generation (actors.generation through Ray Data; on CPU the engine runs in Ray Data tasks): one task per node;
  the worker node is killed while a task samples there. Ray Data retries the lost tasks and rebuilds lost blocks
  on the head; every request group carries its own seed, so the samples equal the undisturbed run's.

SFT node loss is covered on one node by tests/actors/test_training_resilience.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from cluster_nodes import LocalCluster, Node, local_cluster
from imm_ray.data.records import Problem

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster():
    """A fresh cluster per test (nodes start in ~5 s)."""
    with local_cluster() as c:
        yield c


def _kill_when(condition, process: subprocess.Popen, node: Node, timeout: float) -> float:
    """Kill ``node`` once ``condition()`` holds while the driver still runs; return when (seconds after the call)."""
    started = time.time()
    while time.time() - started < timeout:
        if process.poll() is not None:
            pytest.fail("the stage finished before the node could be killed")
        if condition():
            node.kill()
            return time.time() - started
        time.sleep(0.1)
    pytest.fail("the stage never reached the point to kill the node")


# ---------------------------------------------------------------------------------------------------- merge


def _model(folder: Path, rng: np.random.Generator, base: dict | None = None) -> dict:
    """A plain safetensors model of 12 x 8M float32 entries (384 MiB); with ``base``, a perturbed copy of it."""
    folder.mkdir(parents=True)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": (
        rng.standard_normal((2048, 4096), dtype=np.float32) if base is None
        else base[f"model.layers.{i}.mlp.down_proj.weight"] + 0.01 * rng.standard_normal((2048, 4096), dtype=np.float32))
        for i in range(12)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "tie_word_embeddings": False}))
    return tensors


def _merge(cluster: LocalCluster, base: Path, ft: Path, out: Path) -> subprocess.Popen:
    options = {"base": str(base), "finetuned": [str(ft)], "out": str(out), "alpha": 0.5, "drop_rate": 0.3,
               "seed": 3, "chunk_elements": 1 << 16}
    spec = out.parent / f"{out.name}.json"
    spec.write_text(json.dumps(options))
    return cluster.driver("merge", str(spec), str(out.parent / f"{out.name}.record.json"))


def test_merge_survives_a_lost_worker_node_with_the_same_bytes(cluster):
    cluster.start_head(num_cpus=1)
    worker = cluster.add_worker(num_cpus=1)
    rng = np.random.default_rng(0)
    base = _model(cluster.root / "base", rng)
    _model(cluster.root / "ft", rng, base)
    del base

    started = time.time()
    cluster.finish(_merge(cluster, cluster.root / "base", cluster.root / "ft", cluster.root / "undisturbed"), 300)
    undisturbed_s = time.time() - started
    record = json.loads((cluster.root / "undisturbed.record.json").read_text())
    assert record["workers"] == 2  # one merge actor on each node

    out = cluster.root / "disturbed"
    earlier = worker.actor_logs("MergeWorker")
    process = _merge(cluster, cluster.root / "base", cluster.root / "ft", out)
    # the worker's new merge actor has started: it takes its first batches as soon as its constructor returns
    killed_at = _kill_when(lambda: worker.actor_logs("MergeWorker") - earlier, process, worker, 120)
    cluster.finish(process, 300)
    print(f"merge: undisturbed {undisturbed_s:.1f} s, worker node killed {killed_at:.1f} s after the start")
    assert killed_at < undisturbed_s  # while the merge ran (the driver was still running: _kill_when)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (cluster.root / "undisturbed").iterdir())
    for name in names:
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            assert (out / name).read_bytes() == (cluster.root / "undisturbed" / name).read_bytes(), name
    assert not list(cluster.root.glob(".*.partial-*"))  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------- generation


def _generation_spec(model: Path) -> dict:
    problems = [Problem(id=f"q{i}", set_name="toy_id", question=f"Tom has {i} apples and buys 2 more. How many?",
                        answer=str(i + 2), kind="numeric") for i in range(96)]
    return {
        "problems": [p.model_dump(mode="json") for p in problems],
        "prompts": [f"Instruction:\n{p.question}\n\nResponse: Let's think step by step.\n" for p in problems],
        "engine": {"kind": "transformers", "model_path": str(model)},
        "plan": {"samples_per_question": 2, "temperatures": [0.6], "max_new_tokens": 64, "questions_per_batch": 2,
                 "seed": 5},
        "pool": {"min_actors": 2, "max_actors": 2, "cpus_per_actor": 2},
    }


def _generate(cluster: LocalCluster, spec: dict, name: str) -> subprocess.Popen:
    path = cluster.root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return cluster.driver("generate", str(path), str(cluster.root / f"{name}.parquet"))


def test_generation_redoes_a_lost_nodes_groups_with_the_same_samples(cluster, tiny_model):
    """Each node has room for one generation task (2 CPUs each). Once a task runs on the worker node, the node is
    killed: the groups it was sampling, and those whose results were stored on it, are redone by Ray Data on the
    head (lost tasks are retried, lost blocks rebuilt from their lineage); every group carries its own seed, so
    the samples equal the undisturbed run's."""
    cluster.start_head(num_cpus=2)
    worker = cluster.add_worker(num_cpus=2)
    spec = _generation_spec(tiny_model)

    started = time.time()
    cluster.finish(_generate(cluster, spec, "undisturbed"), 300)
    undisturbed_s = time.time() - started

    process = _generate(cluster, spec, "disturbed")
    killed_at = _kill_when(lambda: bool(cluster.tasks_on(worker, "generate_batch")), process, worker, 120)
    cluster.finish(process, 300)

    undisturbed = pd.read_parquet(cluster.root / "undisturbed.parquet")
    disturbed = pd.read_parquet(cluster.root / "disturbed.parquet")
    assert len(undisturbed) == 96 * 2
    assert killed_at < undisturbed_s
    assert cluster.alive_nodes() == 1
    pd.testing.assert_frame_equal(disturbed, undisturbed)
    print(f"generation: undisturbed {undisturbed_s:.1f} s, worker node killed {killed_at:.1f} s after the start")
