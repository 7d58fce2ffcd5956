"""`ray job submit` of a toy run against a real two-node Ray cluster, exactly as docs/cluster.md tells a user.

A head (1 CPU, the dashboard and its job server) and a worker node (1 CPU) are started with `ray start`, each with
its own temp folder and ports, token authentication on (tests/integration/cluster_nodes.py). The job uploads the
repository (`--working-dir .`) and runs `imm-ray run` on the head as the job's driver. One CPU per node is what makes
the spread certain: the SFT stage's two Ray Train workers (1 CPU each) cannot both fit on one node, so one of them
runs on the worker node. The run folder must be complete: every stage recorded, the report written.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from cluster_nodes import BIN, local_cluster
from imm_ray.stages import RECORD_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TOY = [  # one iteration of IMM on a handful of questions (as tests/integration/test_loop.py, smaller)
    "experiment.iterations=1", "experiment.strategies=[imm]", "experiment.seeds=[0]", "experiment.name=job",
    "data.train_limit=16", "data.eval_limit=8", "generation.samples_per_question=2", "generation.temperatures=[0.6]",
    "eval.samples=1", "eval.k=[1]", "sft.epochs=1",
    "eval.analysis_cpus=1",  # the nodes have 1 CPU each (the toy config's 2 would be refused by the memory plan)
]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        c.start_head(num_cpus=1)
        c.add_worker(num_cpus=1)
        yield c


def test_submitted_toy_run_succeeds_and_leaves_a_complete_run_folder(cluster):
    runs = cluster.root / "runs"
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--",
               "imm-ray", "run", "configs/toy.yaml", *[f"--set={o}" for o in [*TOY, f"experiment.output_dir={runs}"]]]
    started = time.time()
    job = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    seconds = time.time() - started
    assert job.returncode == 0 and "succeeded" in job.stdout, f"{job.stdout[-4000:]}\n{job.stderr[-2000:]}\n{cluster.logs()}"
    print(f"job: {seconds:.0f} s from submit to success")

    run = runs / "job"
    records = {p.parent.name.split("-")[0] for p in (run / "_stages").glob(f"*/{RECORD_NAME}")}
    assert {"generate", "sft", "merge", "eval"} <= records
    samples = pd.read_parquet(run / "seed_0" / "imm" / "iter_0" / "generate" / "samples.parquet")
    assert len(samples) == 16 * 2
    log = json.loads((run / "seed_0" / "imm" / "iter_0" / "sft" / "training_log.json").read_text())
    assert log["world_size"] == 2
    for folder in ("sft", "merge"):
        assert list((run / "seed_0" / "imm" / "iter_0" / folder).glob("*.safetensors"))
    assert "IMM · Merge_0" in (run / "report.md").read_text()
    assert not list((run / "_stages").glob(".*.tmp-*")) and not list((run / "_stages").glob(".*.partial-*"))

    # the job's work reached the worker node: two 1-CPU Ray Train workers on two 1-CPU nodes
    assert cluster.nodes[1].actor_logs("RayTrainWorker")


def test_job_client_without_the_token_is_refused(cluster):
    """Token authentication is on: a client without the cluster's token cannot submit (docs/cluster.md)."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "0" * 32
    job = subprocess.run([str(BIN / "ray"), "job", "list"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert job.returncode != 0
    assert "auth" in (job.stdout + job.stderr).lower()
