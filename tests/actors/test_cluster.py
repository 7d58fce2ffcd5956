"""Ray's wrappers peeled off a worker's exception; the session's logs linked into a run's log folder."""

from __future__ import annotations

import os
from pathlib import Path

from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from actors.cluster import link_session_logs, root_cause
from imm_ray.data.registry import DataError


def test_root_cause_unwraps_task_errors_and_train_worker_groups():
    cause = DataError("gsm8k: no data file")
    task = RayTaskError("f", "Traceback ...", cause)
    assert root_cause(task) is cause
    group = WorkerGroupError("training failed", {1: ValueError("rank 1"), 0: RayTaskError("g", "tb", cause)})
    assert root_cause(group) is cause  # the lowest rank's failure, under its task error
    assert root_cause(ControllerError(task)) is cause
    plain = KeyError("not Ray's")
    assert root_cause(plain) is plain


def test_a_ray_started_here_runs_sft_without_the_preemption_watcher_a_cluster_keeps_it():
    from actors.cluster import WORKER_ENV, worker_env

    assert worker_env(None) == {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert worker_env("ray://head:10001") == WORKER_ENV


def test_session_logs_are_linked_where_they_exist(tmp_path):
    session = tmp_path / "session_1"
    (session / "logs").mkdir(parents=True)
    link = link_session_logs(session, tmp_path / "run" / "logs")
    assert link is not None and link.resolve() == (session / "logs").resolve()
    again = link_session_logs(session, tmp_path / "run" / "logs")  # a second invocation replaces the link
    assert again == link
    assert link_session_logs(tmp_path / "elsewhere", tmp_path / "run" / "logs") is None  # a remote head's path


WARM_WORKERS_SCRIPT = """
import os, time
import ray
from actors.cluster import ray_session

@ray.remote(num_cpus=0.5)  # four at once on two CPUs: four processes, two per pool
def pid():
    time.sleep(2)
    return os.getpid(), os.environ.get("IMM_RAY_TEST_POOL")

# tasks with a runtime_env of their own (vllm-cpu's, actors.generation.task_runtime_env) get worker processes of
# their own, which the soft limit counts with the job's
OWN_ENV = {"runtime_env": {"env_vars": {"IMM_RAY_TEST_POOL": "1"}}}


def workers():
    # (pid, pool) of the processes that ran two tasks of each pool at once
    return set(ray.get([pid.remote() for _ in range(2)] + [pid.options(**OWN_ENV).remote() for _ in range(2)]))

def alive(process):  # a killed worker its raylet has not reaped yet is a zombie: dead
    try:
        with open(f"/proc/{process}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

@ray.remote(num_cpus=1)
class Holder:  # an SFT worker or merge actor: holds a CPU while the task workers sit idle
    def ready(self):  # and sees the environment of a Ray started here (actors.cluster.LOCAL_SESSION_ENV)
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

with ray_session():
    before = workers()
    holders = [Holder.remote() for _ in range(2)]
    watcher = ray.get([h.ready.remote() for h in holders])
    time.sleep(3)  # Ray kills an idle worker over its soft limit after about 1 s
    kept = [process for process, _ in before if alive(process)]  # asked of the OS: which other tasks ran where varies
    print("SOFT_LIMIT", os.environ.get("RAY_num_workers_soft_limit"), "POOLS", len({pool for _, pool in before}),
          "KEPT", len(kept), "OF", len(before), "WATCHER", ",".join(map(str, watcher)))
"""


def test_a_local_ray_keeps_its_task_workers_while_actors_hold_the_cpus(tmp_path):
    """The task workers that ran generation survive an actor stage (actors.cluster.keep_warm_task_workers), so the
    next stage does not import torch and transformers (or build its vllm-cpu engine) again, the job's and those of
    a runtime_env of their own alike; without the setting Ray kills them (checked too)."""
    import subprocess
    import sys

    script = tmp_path / "warm.py"
    script.write_text(WARM_WORKERS_SCRIPT)
    root = Path(__file__).resolve().parents[2]

    def run(env_extra: dict[str, str]) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
        env.update(env_extra, PYTHONPATH=str(root))
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                              cwd=root)
        lines = [line for line in done.stdout.splitlines() if line.startswith("SOFT_LIMIT")]
        assert lines, done.stdout[-2000:] + done.stderr[-4000:]
        print(lines[0])  # shown with a failed assertion below
        return lines[0]

    line = run({})
    pools, kept, of = (int(word) for word in line.split()[3:8:2])
    assert (pools, kept, of) == (2, 4, 4)
    assert line.split()[-1] == "0,0"  # Ray Train's preemption watcher off on one machine
    # Ray's own default (-1: as many idle workers as CPUs are free, none while actors hold them); a user's value wins
    pools, kept, of = (int(word) for word in run({"RAY_num_workers_soft_limit": "-1"}).split()[3:8:2])
    assert (pools, kept, of) == (2, 0, 4)
