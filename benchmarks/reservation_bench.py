"""Ray Data's operator resource reservation against none, on the generation pipeline's own tasks, alternated.

``actors.generation.generate_samples`` turns the reservation off for its one-operator dataset. This shows why: the
same stage (toy, the evaluation's shape: 450 toy_id questions x 2 samples, 128-question request groups, two task
workers on two cores, a fresh copy of the model per stage so every stage builds its engines) run as
``generate_samples`` runs it, with ``DataContext.op_resource_reservation_enabled`` on and off in turn on one Ray.
Each task reports when it started and ended, so the table shows when the second task of a stage started.

Usage: python benchmarks/reservation_bench.py [--stages N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed_batch(batch, spec):
    """generate_samples' task, with its start and end time and process."""
    import os
    import time

    from actors.generation import generate_batch

    started = time.time()
    generate_batch(batch, spec)
    return {"start": [started], "end": [time.time()], "pid": [os.getpid()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=7, help="stages after the first (which pays the imports)")
    args = parser.parse_args()

    import ray
    from ray.data import DataContext

    from actors.engines import EngineSpec
    from actors.generation import PoolSpec, SamplingPlan, actor_remote_args, build_request_groups
    from imm_ray.data.prompts import build_prompt
    from imm_ray.data.toy import load_toy
    from pipeline_bench import load

    before = load()
    problems = load_toy("toy_id", "test", n=450)
    prompts = [build_prompt(p.question) for p in problems]
    model = ROOT / "imm_ray" / "assets" / "toy"
    plan = SamplingPlan(samples_per_question=2, temperatures=(0.6,), max_new_tokens=96, questions_per_batch=128)
    groups = build_request_groups(problems, prompts, plan)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print("| stage | reservation | seconds | tasks: start-end s |\n|---:|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in range(args.stages + 1):
            reserve = stage % 2 == 1
            copy = shutil.copytree(model, Path(tmp) / f"model_{stage}")
            spec = EngineSpec(kind="transformers", model_path=str(copy)).model_dump(mode="json")
            started = time.time()
            dataset = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
                timed_batch, fn_kwargs={"spec": spec}, batch_size=1, compute=ray.data.TaskPoolStrategy(size=2),
                **actor_remote_args(PoolSpec(min_actors=2, max_actors=2)))
            dataset.context.op_resource_reservation_enabled = reserve
            rows = dataset.take_all()
            seconds = time.time() - started
            spans = ", ".join(f"{r['start'] - started:.1f}-{r['end'] - started:.1f}"
                              for r in sorted(rows, key=lambda r: r["start"]))
            print(f"| {stage}{' (imports)' if stage == 0 else ''} | {'on' if reserve else 'off'} | {seconds:.2f} | "
                  f"{spans} |", flush=True)
    ray.shutdown()
    print(f"load {before} before, {load()} after; Ray "
          f"{ray.__version__}; the driver's default is {DataContext.get_current().op_resource_reservation_enabled}")


if __name__ == "__main__":
    main()
